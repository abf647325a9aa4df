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
if larger, x the median over merchants of their mean ad norm over the ads any merchant has a
value on (an ad only one merchant saw has median 0; it keeps a typical ad's weight). With m >= 3 merchants one merchant cannot move
a median beyond the honest merchants' range, so whatever it sends it adds at most factor x
max(the largest honest norm of that block, the largest honest mean ad norm) to any block.
"""

from __future__ import annotations

import math

import numpy as np

from shared.als import ALSSettings, over_union, packed_gram_traces, packed_norm_weights, unpacked_chunks
from shared.wire import ALS_ADS, ALS_COUNT, ALS_GRAM, ALS_GRAM_UPPER, ALS_POSITIVES, ALS_TARGET, ALS_USER_GRAM, STATISTICS, Arrays

FAILURE_PROBABILITY = 1e-9  # of an honest reply's noise exceeding its allowance
NON_NEGATIVE = (ALS_COUNT, ALS_POSITIVES)
PER_AD_PSD = (ALS_GRAM, ALS_GRAM_UPPER)  # the latter packed (als-gram "sparse")
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
        if key == ALS_ADS:  # indices, checked by shared/als.check_statistics
            continue
        value = value.astype(np.float64)
        std = stds.get(key, 0.0)
        z = _z(value.size)
        scale = float(np.abs(value).max(initial=0.0))
        slack = SCALE_TOLERANCE * scale
        if key in NON_NEGATIVE and (lowest := float(value.min(initial=0.0))) < -(z * std + slack):
            problems.append(f"{key} has a negative value {lowest:.4g} (allowance {z * std:.3g})")
        if key in PER_AD_PSD or key in PSD:
            dim = value.shape[-1] if key != ALS_GRAM_UPPER else stats[ALS_TARGET].shape[1] + 1
            shortfall, lowest = _psd_shortfall(value, key, dim)
            if shortfall < -(2.0 * math.sqrt(dim) + z) * std:
                problems.append(f"{key} is not positive semi-definite (eigenvalue {lowest:.4g})")
        gram_key = ALS_GRAM if ALS_GRAM in stats else ALS_GRAM_UPPER
        if key == ALS_TARGET and not stds and gram_key in stats and ALS_POSITIVES in stats:
            gram = stats[gram_key].astype(np.float64)
            dim = value.shape[1]
            traces = np.trace(gram[:, :dim, :dim], axis1=1, axis2=2) if gram_key == ALS_GRAM else packed_gram_traces(gram, dim)
            problems += _target_consistency(value, traces, stats[ALS_POSITIVES].astype(np.float64), gram_key,
                                          stats.get(ALS_ADS))
        if settings.max_rows is not None:  # clipped users: each one's term has norm <= the sensitivity
            limit = max_users * settings.sensitivities()[key] + (math.sqrt(value.size) + z) * std
            if (norm := float(np.linalg.norm(value))) > limit:
                problems.append(f"{key} has norm {norm:.4g}, more than {max_users} users can reach ({limit:.4g})")
    return problems


def _psd_shortfall(value: np.ndarray, key: str, dim: int) -> tuple[float, float]:
    """Over a PSD statistic's matrices (packed ones unpacked a chunk at a time), the lowest of
    (a matrix's lowest eigenvalue + its own float-rounding slack, SCALE_TOLERANCE x its largest
    entry), and that eigenvalue. The slack is each matrix's own: one inflated ad must not widen
    every other ad's."""
    def worst(matrices: np.ndarray) -> tuple[float, float]:
        lowest = np.linalg.eigvalsh(matrices).min(axis=1)
        margin = lowest + SCALE_TOLERANCE * np.abs(matrices).max(axis=(1, 2))
        at = int(np.argmin(margin))
        return float(margin[at]), float(lowest[at])

    chunks = unpacked_chunks(value, dim) if key == ALS_GRAM_UPPER else iter([value if key in PER_AD_PSD else value[None]])
    return min((worst(chunk) for chunk in chunks if len(chunk)), default=(0.0, 0.0))


def _target_consistency(
    target: np.ndarray, traces: np.ndarray, positives: np.ndarray, gram_key: str, ads: np.ndarray | None = None
) -> list[str]:
    """Exact per-ad statistics are sums over the same users: by Cauchy-Schwarz,
    ||t_a||^2 = max_v (sum_u c_u r_ua v.p_u)^2 <= m_a * tr(A_a's factor block), with r in {0, 1}.
    A target inflated on its own (the probe's x1e6) breaks it; scaling everything does not.
    `traces`: each row's tr(A_a's factor block); `ads`: a sparse release's ad per row."""
    bound = positives * traces
    squared = (target**2).sum(axis=1)
    bad = np.flatnonzero(squared > bound * (1 + 1e-4) + SCALE_TOLERANCE * max(float(squared.max(initial=0.0)), 1.0))
    if not len(bad):
        return []
    first = int(bad[0] if ads is None else ads[bad[0]])
    return [f"{ALS_TARGET} is inconsistent with {gram_key} and {ALS_POSITIVES} for {len(bad)} ads (Cauchy-Schwarz; ad {first})"]


def median_clip(contributions: list[Arrays], factor: float) -> list[Arrays]:
    """Each merchant's blocks scaled down to at most `factor` x the median norm of that block
    over merchants (per ad for per-ad statistics; the whole array otherwise); sparse releases
    come back over the union of their ads (shared/als.over_union)."""
    if len(contributions) < 3:
        return contributions  # no median to trust: one of two merchants could set it
    if ALS_ADS in contributions[0]:  # sparse releases: compared ad by ad over the union of their ads
        contributions = over_union(contributions)
    clipped: list[Arrays] = [dict(c) for c in contributions]
    for key in contributions[0]:
        if key == ALS_ADS:  # a sparse release's indices (over_union: the same for every merchant)
            continue
        stack = np.stack([c[key].astype(np.float64) for c in contributions])
        per_ad = key != ALS_USER_GRAM
        norms = _block_norms(stack if key != ALS_GRAM_UPPER else stack * packed_norm_weights(stack.shape[-1]), per_ad)
        bound = factor * np.median(norms, axis=0)
        if per_ad:  # an ad most merchants never saw has median 0: its floor is a typical ad's norm
            # (the mean over the ads some merchant has a value on: a catalog's untouched ads, which a
            # sparse release leaves out, must not dilute it)
            active = (norms > 0).any(axis=0)
            bound = np.maximum(bound, factor * np.median(norms[:, active].mean(axis=1) if active.any() else 0.0))
        scale = np.ones_like(norms)
        np.divide(bound, norms, out=scale, where=norms > bound)
        scaled = stack * scale.reshape(scale.shape + (1,) * (stack.ndim - scale.ndim))
        for merchant, value in enumerate(scaled):
            clipped[merchant][key] = value
    return clipped


def _block_norms(stack: np.ndarray, per_ad: bool) -> np.ndarray:
    """(merchants,) norms of whole arrays, or (merchants, ads) norms of each ad's slice."""
    if per_ad:  # explicit sizes: a reshape with -1 fails on zero ads
        return np.sqrt((stack.reshape(stack.shape[0], stack.shape[1], math.prod(stack.shape[2:])) ** 2).sum(axis=2))
    return np.sqrt((stack.reshape(stack.shape[0], -1) ** 2).sum(axis=1))
