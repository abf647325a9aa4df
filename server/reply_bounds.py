"""What one merchant can move: bounds on its ALS statistics, and a robust sum over merchants.

Bounds (a reply outside them is dropped with its reason, server/round_loop.py). Every
statistic is a sum over at most N users (`max-users-per-merchant`, public) of per-user terms:
- counts and weighted positives are non-negative, and per-ad Gramians and the user Gramian are
  positive semi-definite;
- under DP each user's term has L2 norm at most the statistic's sensitivity S (shared/als.py:
  clipped factors, down-weighted rows), so the whole statistic's norm is at most N x S;
- exact per-ad statistics (no DP: no norm bound) are sums over the same users, so each ad's
  target, Gramian and positives satisfy Cauchy-Schwarz: ||t_a||^2 <= m_a tr(A_a).
A private reply adds Gaussian noise of a public std per coordinate; the allowance is what that
noise reaches with probability 1 - 1e-9 (a coordinate: z std; a norm over K coordinates:
(sqrt(K) + z) std; a symmetric D x D noise matrix's eigenvalues: (2 sqrt(D) + z) std). The
noise multiplier comes from the reply itself; a merchant that claims more noise only widens its
own allowance, and the ad solve regularizes against the noise it claims.

Robust sum (`robust-aggregation = "median"`): the bounds stop what no honest merchant could
send, not a large merchant's plausible but poisoned statistics. The median clip scales each
merchant's block (one ad's slice of a statistic, or the whole user Gramian) down to at most
`robust-clip-factor` x the median over merchants of that block's norm, or for an ad's slice,
if larger, x the median over merchants of their mean ad norm (an ad only one merchant saw
has median 0; it keeps a typical ad's weight). With m >= 3 merchants one merchant cannot move
a median beyond the honest merchants' range, so whatever it sends it adds at most factor x
max(the largest honest norm of that block, the largest honest mean ad norm) to any block.
"""

from __future__ import annotations

import math

import numpy as np

from shared.als import ALSSettings
from shared.wire import ALS_COUNT, ALS_GRAM, ALS_POSITIVES, ALS_TARGET, ALS_USER_GRAM, STATISTICS, Arrays

FAILURE_PROBABILITY = 1e-9  # of an honest reply's noise exceeding its allowance
NON_NEGATIVE = (ALS_COUNT, ALS_POSITIVES)
PER_AD_PSD = (ALS_GRAM,)
PSD = (ALS_USER_GRAM,)
SCALE_TOLERANCE = 1e-6  # float rounding of exact sums, relative to their scale


def _z(coordinates: int) -> float:
    """A Gaussian quantile that no coordinate of `coordinates` exceeds, with high probability."""
    return math.sqrt(2.0 * math.log(2.0 * max(coordinates, 1) / FAILURE_PROBABILITY))


def als_violations(stats: Arrays, settings: ALSSettings, max_users: int, noise_multiplier: float, release: str = STATISTICS) -> list[str]:
    """Why these statistics (a `release` of them) cannot come from at most `max_users` users
    under the protocol (empty: they can)."""
    stds = settings.noise_stds(noise_multiplier, release) if noise_multiplier > 0 and settings.max_rows is not None else {}
    problems: list[str] = []
    for key, value in stats.items():
        value = value.astype(np.float64)
        std = stds.get(key, 0.0)
        z = _z(value.size)
        scale = float(np.abs(value).max(initial=0.0))
        slack = SCALE_TOLERANCE * scale
        if key in NON_NEGATIVE and (lowest := float(value.min(initial=0.0))) < -(z * std + slack):
            problems.append(f"{key} has a negative value {lowest:.4g} (allowance {z * std:.3g})")
        if key in PER_AD_PSD or key in PSD:
            dim = value.shape[-1]
            eigen = np.linalg.eigvalsh(value if key in PER_AD_PSD else value[None])
            if (lowest := float(eigen.min())) < -((2.0 * math.sqrt(dim) + z) * std + slack):
                problems.append(f"{key} is not positive semi-definite (eigenvalue {lowest:.4g})")
        if key == ALS_TARGET and not stds and ALS_GRAM in stats and ALS_POSITIVES in stats:
            problems += _target_consistency(value, stats[ALS_GRAM].astype(np.float64), stats[ALS_POSITIVES].astype(np.float64))
        if settings.max_rows is not None:  # clipped users: each one's term has norm <= the sensitivity
            limit = max_users * settings.sensitivities()[key] + (math.sqrt(value.size) + z) * std
            if (norm := float(np.linalg.norm(value))) > limit:
                problems.append(f"{key} has norm {norm:.4g}, more than {max_users} users can reach ({limit:.4g})")
    return problems


def _target_consistency(target: np.ndarray, gram: np.ndarray, positives: np.ndarray) -> list[str]:
    """Exact per-ad statistics are sums over the same users: by Cauchy-Schwarz,
    ||t_a||^2 = max_v (sum_u c_u r_ua v.p_u)^2 <= m_a * tr(A_a's factor block), with r in {0, 1}.
    A target inflated on its own (the probe's x1e6) breaks it; scaling everything does not."""
    dim = target.shape[1]
    bound = positives * np.trace(gram[:, :dim, :dim], axis1=1, axis2=2)
    squared = (target**2).sum(axis=1)
    bad = np.flatnonzero(squared > bound * (1 + 1e-4) + SCALE_TOLERANCE * max(float(squared.max(initial=0.0)), 1.0))
    if not len(bad):
        return []
    return [f"{ALS_TARGET} is inconsistent with {ALS_GRAM} and {ALS_POSITIVES} for {len(bad)} ads (Cauchy-Schwarz; ad {int(bad[0])})"]


def median_clip(contributions: list[Arrays], factor: float) -> list[Arrays]:
    """Each merchant's blocks scaled down to at most `factor` x the median norm of that block
    over merchants (per ad for per-ad statistics; the whole array otherwise)."""
    if len(contributions) < 3:
        return contributions  # no median to trust: one of two merchants could set it
    clipped: list[Arrays] = [dict(c) for c in contributions]
    for key in contributions[0]:
        stack = np.stack([c[key].astype(np.float64) for c in contributions])
        per_ad = key != ALS_USER_GRAM
        norms = _block_norms(stack, per_ad)
        bound = factor * np.median(norms, axis=0)
        if per_ad:  # an ad most merchants never saw has median 0: its floor is a typical ad's norm
            bound = np.maximum(bound, factor * np.median(norms.mean(axis=1)))
        scale = np.ones_like(norms)
        np.divide(bound, norms, out=scale, where=norms > bound)
        scaled = stack * scale.reshape(scale.shape + (1,) * (stack.ndim - scale.ndim))
        for merchant, value in enumerate(scaled):
            clipped[merchant][key] = value
    return clipped


def _block_norms(stack: np.ndarray, per_ad: bool) -> np.ndarray:
    """(merchants,) norms of whole arrays, or (merchants, ads) norms of each ad's slice."""
    if per_ad:
        return np.sqrt((stack.reshape(stack.shape[0], stack.shape[1], -1) ** 2).sum(axis=2))
    return np.sqrt((stack.reshape(stack.shape[0], -1) ** 2).sum(axis=1))
