"""Differential-privacy accounting arithmetic shared by clients, baselines and the docs.

A client's history is a list of (noise multiplier, sample rate, steps) Gaussian releases, as
Opacus' accountants keep it. Its epsilon at delta is the tighter of two valid bounds:
- where every release is unsampled (sample rate 1: private ALS's statistics, noised metrics),
  the exact curve of their composition: a Gaussian release of sensitivity 1 and noise sigma is
  exactly (1/sigma)-Gaussian DP, k of them compose exactly to mu = sqrt(sum k / sigma^2)-GDP
  (Dong, Roth and Su 2022, Cor. 3.3), whose (epsilon, delta) curve is Balle and Wang's analytic
  Gaussian (ICML 2018), solved with scipy as Opacus' `analysis.gdp.eps_from_mu` solves it (equal
  to 1e-9, tested; Opacus' package would import torch into every private-ALS ClientApp process).
  Being exact, it is never above RDP's bound, which is loose by 10-18% in noise variance there
  (docs/PRIVACY.md);
- otherwise (DP-SGD's Poisson-subsampled steps) Opacus' RDP accountant
  (`opacus.accountants.RDPAccountant`): Renyi DP composed over every release, converted to
  (epsilon, delta), each release's per-step curve computed once per process.
A client's whole training (DP-SGD steps of the ad step and any noised metric releases) is
planned up front: the DP-SGD noise multiplier is calibrated so the planned releases compose to
the target epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as in Opacus' history

# Sum of per-user metric values (6 metrics, each in [0, 1]) and the user's count of 1: the L2
# sensitivity of the released vector of sums when one user is added or removed.
METRIC_SENSITIVITY = math.sqrt(6 + 1)


class CalibrationError(ValueError):
    pass


def epsilon_of(history: Sequence[Release], delta: float) -> float:
    """Epsilon at `delta` of the composition of `history` (0 for an empty history)."""
    if not history:
        return 0.0
    exact = unsampled_gaussian_epsilon(history, delta)
    if exact is not None:
        # the exact curve of the composition: never above RDP's bound of it (tested), and
        # without Opacus, whose import (torch with it) costs seconds in every ClientApp process
        # a deployed SuperNode starts for a private-ALS message
        return exact
    return renyi_epsilon(history, delta)


def renyi_epsilon(history: Sequence[Release], delta: float) -> float:
    """Opacus' RDP bound of the composition of `history` at `delta`: what its `RDPAccountant`
    computes, with each release's per-step RDP curve computed once per process."""
    # imported here: `import opacus` costs about 2.5 s (torch.distributed, scipy.stats), and the
    # server and non-private clients import this module without ever composing a release
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    rdp = np.sum([steps * _step_rdp(sigma, rate) for sigma, rate, steps in history], axis=0)
    epsilon, _ = get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
    return float(epsilon)


@functools.cache
def _rdp_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _step_rdp(sigma: float, rate: float) -> np.ndarray:
    """One step's RDP at every order. Opacus' `compute_rdp` is linear in the steps, and its
    fractional orders cost a slow series (0.45 s per call): the ledger asks twice per round for
    the same (sigma, rate), which made the accountant most of a small merchant's DP epoch."""
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = np.asarray(compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=list(_rdp_orders())), dtype=np.float64)
    curve.setflags(write=False)
    return curve


def unsampled_gaussian_epsilon(history: Sequence[Release], delta: float) -> float | None:
    """The exact epsilon at `delta` of a composition of unsampled Gaussian releases (None if some
    release is subsampled, or where the root finder cannot bracket it: RDP's bound then stands)."""
    if any(rate != 1.0 for _, rate, _ in history):
        return None
    from scipy.optimize import brentq

    mu = math.sqrt(sum(steps / sigma**2 for sigma, _, steps in history))
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    try:  # as Opacus' `analysis.gdp.eps_from_mu` (equal to 1e-9, tested), whose package imports torch
        return float(brentq(lambda eps: gaussian_delta(eps, mu) - delta, 0.0, 500.0))
    except (ValueError, FloatingPointError):  # no sign change in [0, 500]: mu is beyond any useful budget
        return None


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-GDP, the exact curve of a Gaussian mechanism (Dong, Roth and Su 2022,
    Cor. 2.13; Balle and Wang 2018, Thm. 8)."""
    from scipy.special import ndtr

    return float(ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * ndtr(-epsilon / mu - mu / 2))


def default_delta(num_users: int) -> float:
    """Well below 1/n: a mechanism may not afford to reveal any one user outright."""
    return 0.1 / max(num_users, 1)


def sgd_steps_per_epoch(sample_rate: float) -> int:
    """Opacus' Poisson data loader runs int(1 / sample_rate) steps per epoch."""
    return int(1 / sample_rate)


def user_sample_rate(batch_users: int, num_users: int) -> float:
    """The Poisson rate Opacus derives from a loader of `batch_users`: 1 / number of batches."""
    return 1.0 / math.ceil(num_users / batch_users)


def batch_size_for(sample_rate: float, num_users: int) -> int:
    """The loader batch size from which Opacus derives `sample_rate` for `num_users`."""
    return math.ceil(num_users / round(1.0 / sample_rate))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    fixed: Sequence[Release] = (),
    tolerance: float = 1e-3,
) -> float:
    """Smallest DP-SGD noise multiplier with epsilon(steps at it + fixed releases) <= target."""
    if target_epsilon <= 0:
        raise CalibrationError(f"target epsilon must be > 0, got {target_epsilon}")
    if epsilon_of(fixed, delta) >= target_epsilon:
        raise CalibrationError(
            f"the fixed releases alone spend epsilon {epsilon_of(fixed, delta):.3f} >= target {target_epsilon}"
        )

    def spent(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps), *fixed], delta)

    low, high = 0.05, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e5:
            raise CalibrationError(f"no noise multiplier below 1e5 reaches epsilon {target_epsilon}")
    if spent(low) <= target_epsilon:
        return low
    while high - low > tolerance * low:
        middle = (low + high) / 2
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
