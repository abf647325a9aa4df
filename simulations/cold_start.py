"""Cold-start ads (issue 17, item 3): ads nobody has interacted with, ranked by content alone.

A random share of the catalog (10% by default) is held out of training entirely: every row on
those ads leaves the log the model trains on. The model trains on the rest (the warm ads); then
each held-out ad gets factors and a bias from its public content through a ridge map fitted on
the warm ads' trained parameters (shared/content.fit_content_projection). Every user with a
positive on a held-out ad is a test user: their earliest such ad is the target, ranked among
all held-out ads except their other held-out positives (full ranking within the cold ads), by
- "content": the user's own factors (fitted on warm ads, as the merchant fits them) against the
  projected cold-ad parameters;
- "category-popularity": the share of warm training positives of the ad's category;
- "random": a seeded random score per (user, ad).
Metrics: HR@10 and NDCG@10 (ties count half, as shared/metrics.py counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.content import ContentFeatures, fit_content_projection
from shared.data.schema import AdCatalog, InteractionLog
from shared.params import score_all
from shared.wire import AD_BIAS, AD_FACTORS, NEUMF_GMF, NEUMF_MLP, Arrays

COLD_SHARE = 0.1
# ridge of the content map: each ad's feature row has squared norm <= 5 (five unit blocks); 10 beat 0.1
# and 1 on the synthetic market (NDCG@10 among cold ads 0.214 vs 0.193 and 0.202)
PROJECTION_L2 = 10.0


@dataclass(frozen=True)
class ColdSplit:
    cold: np.ndarray  # bool [ads]: held out of training entirely
    warm_log: InteractionLog  # every row on a warm ad
    test_users: np.ndarray  # object: users with a positive on a cold ad
    target: np.ndarray  # int64 [test users]: each one's earliest cold positive
    excluded: list[np.ndarray]  # per test user: their other cold positives (not candidates)


SAMPLED_COLD = 99  # the NCF protocol's sampled candidates beside the target, here drawn among the cold ads


def cold_split(log: InteractionLog, num_ads: int, share: float = COLD_SHARE, seed: int = 0) -> ColdSplit:
    rng = np.random.default_rng([seed, 17])
    cold = np.zeros(num_ads, dtype=bool)
    cold[rng.choice(num_ads, size=max(1, round(share * num_ads)), replace=False)] = True
    on_cold = cold[log.ad]
    positive = log.event >= 1  # click or purchase (shared/data/schema.Event)
    rows = np.flatnonzero(on_cold & positive)
    rows = rows[np.lexsort((log.timestamp[rows], log.user[rows].astype(str)))]
    users, first = np.unique(log.user[rows].astype(str), return_index=True)
    bounds = np.append(first, len(rows))
    targets, excluded = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ads = log.ad[rows[start:stop]]
        targets.append(ads[0])
        excluded.append(np.setdiff1d(ads, ads[:1]))
    return ColdSplit(cold, log.subset(np.flatnonzero(~on_cold)), users.astype(object), np.array(targets, dtype=np.int64), excluded)


def cold_ad_parameters(features: ContentFeatures, split: ColdSplit, arrays: Arrays, l2: float = PROJECTION_L2) -> Arrays:
    """The model's parameters with every cold ad's factors and bias replaced by its content's."""
    targets = np.hstack([arrays[AD_FACTORS], arrays[AD_BIAS][:, None]]).astype(np.float64)
    projected = features.matrix @ fit_content_projection(features.matrix, ~split.cold, targets, l2)
    factors, bias = arrays[AD_FACTORS].copy(), arrays[AD_BIAS].copy()
    factors[split.cold] = projected[split.cold, :-1]
    bias[split.cold] = projected[split.cold, -1]
    return {**arrays, AD_FACTORS: factors, AD_BIAS: bias}


def cold_neumf_parameters(arrays: Arrays, split: ColdSplit) -> Arrays:
    """NeuMF's parameters with every cold ad's own embeddings and bias at zero: an ad nobody has
    seen has none trained (under DP-SGD its rows hold only noise), so its content tower alone
    places it (shared/neumf_arrays.py; without the tower, such an ad scores as the average ad)."""
    out = dict(arrays)
    for key in (NEUMF_GMF, NEUMF_MLP, AD_BIAS):
        out[key] = arrays[key].copy()
        out[key][split.cold] = 0.0
    return out


def category_popularity(catalog: AdCatalog, warm_log: InteractionLog) -> np.ndarray:
    """Each ad's score: the share of warm training positives that fell on its category."""
    codes, names = catalog.category_codes()
    positive = warm_log.event >= 1
    per_category = np.bincount(codes[warm_log.ad[positive]], minlength=len(names)).astype(np.float64)
    return per_category[codes] / max(per_category.sum(), 1.0)


def rank_cold(scores: np.ndarray, split: ColdSplit, k: int = 10, sampled: int | None = None, seed: int = 0) -> dict[str, float]:
    """HR@k and NDCG@k of each test user's target among the cold ads ([test users, ads] scores):
    among all of them, or (`sampled`, the NCF protocol) among that many cold ads drawn for each
    user (without their other cold positives; one draw per user, the same for every ranker with
    the same seed). Ties are broken uniformly at random, in expectation: a target tied with t
    others below g higher-scored ads is at each rank g..g+t with probability 1 / (t + 1)
    (category popularity ties whole categories, where the expected rank alone would never count
    a hit)."""
    cold_ads = np.flatnonzero(split.cold)
    gain_at = np.where(np.arange(len(cold_ads) + 1) < k, 1.0 / np.log2(np.arange(len(cold_ads) + 1) + 2.0), 0.0)
    gain_sums = np.concatenate([[0.0], np.cumsum(gain_at)])  # gain_sums[r] = sum of gains of ranks below r
    rng = np.random.default_rng([seed, 19])
    hits, gains = [], []
    for row, (target, other) in enumerate(zip(split.target, split.excluded)):
        candidates = np.setdiff1d(cold_ads, np.append(other, target))
        if sampled is not None and len(candidates) > sampled:
            candidates = rng.choice(candidates, size=sampled, replace=False)
        candidate_scores = scores[row, candidates]
        greater = int(np.sum(candidate_scores > scores[row, target]))
        tied = int(np.sum(candidate_scores == scores[row, target]))
        positions = tied + 1
        hits.append(max(0, min(k, greater + positions) - greater) / positions)
        gains.append((gain_sums[greater + positions] - gain_sums[greater]) / positions)
    return {"hr10_cold": float(np.mean(hits)) if hits else 0.0, "ndcg10_cold": float(np.mean(gains)) if gains else 0.0,
            "cold_test_users": float(len(hits))}


def evaluate_cold_start(
    catalog: AdCatalog, features: ContentFeatures, split: ColdSplit, arrays: Arrays, user_ids: np.ndarray,
    user_factors: np.ndarray, seed: int = 0, l2: float = PROJECTION_L2,
) -> dict[str, dict[str, float]]:
    """The three rankers' metrics, among all cold ads and sampled (SAMPLED_COLD); `user_factors` rows belong to `user_ids` (users never seen
    on a warm ad have no factors and are left out)."""
    lookup = {str(user): row for row, user in enumerate(user_ids)}
    known = np.array([str(user) in lookup for user in split.test_users], dtype=bool)
    kept = ColdSplit(split.cold, split.warm_log, split.test_users[known], split.target[known],
                     [other for other, keep in zip(split.excluded, known) if keep])
    vectors = user_factors[[lookup[str(user)] for user in kept.test_users]]
    # MF: the cold ads' factors mapped from content; NeuMF: its own content tower (none: the average ad)
    cold_arrays = cold_neumf_parameters(arrays, kept) if NEUMF_GMF in arrays else cold_ad_parameters(features, kept, arrays, l2)
    content = score_all(vectors, cold_arrays)
    popularity = np.broadcast_to(category_popularity(catalog, split.warm_log), content.shape)
    noise = np.random.default_rng([seed, 18]).random(content.shape)

    def both(scores: np.ndarray) -> dict[str, float]:
        sampled = rank_cold(scores, kept, sampled=SAMPLED_COLD, seed=seed)
        return {**rank_cold(scores, kept), "hr10_cold_sampled": sampled["hr10_cold"], "ndcg10_cold_sampled": sampled["ndcg10_cold"]}

    return {"content": both(content), "category-popularity": both(popularity), "random": both(noise)}
