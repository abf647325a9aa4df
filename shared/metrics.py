"""Leave-last-out ranking metrics: sampled (NCF protocol) and full ranking.

For each test user, the held-out ad is ranked
- against the user's 99 fixed sampled negatives: HR@10, NDCG@10 ("sampled");
- against every ad the user has no training positive for: HR@10, NDCG@10, Recall@20 and AUC
  ("full").
Ties count half (the expected rank under random tie-breaking), so a constant scorer gets the
chance level rather than a perfect score.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared.data.split import UserSplit

METRIC_NAMES = ("hr10_sampled", "ndcg10_sampled", "hr10_full", "ndcg10_full", "recall20_full", "auc_full")
NUM_TEST_USERS = "num-test-users"  # beside the metric means: how many users they average over

ScoreFn = Callable[[np.ndarray], np.ndarray]  # user rows [B] -> scores [B, num_ads]


def _expected_rank(candidate_scores: np.ndarray, valid: np.ndarray, target_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected 0-based rank of the target among valid candidates (the target excluded from them),
    and the number of valid candidates."""
    greater = ((candidate_scores > target_score[:, None]) & valid).sum(axis=1)
    ties = ((candidate_scores == target_score[:, None]) & valid).sum(axis=1)
    return greater + 0.5 * ties, valid.sum(axis=1)


def _hit_and_ndcg(rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    hit = rank < k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)


def rank_metrics(
    scores: np.ndarray, users: np.ndarray, split: UserSplit, eval_negatives: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-user metric values for `users` (rows of split with a test ad) given their full score rows."""
    target = split.test_ad[users]
    target_score = scores[np.arange(len(users)), target]

    neg = eval_negatives[users]
    neg_valid = neg >= 0
    neg_scores = np.take_along_axis(scores, np.where(neg_valid, neg, 0), axis=1)
    sampled_rank, _ = _expected_rank(neg_scores, neg_valid, target_score)

    candidates = np.ones_like(scores, dtype=bool)
    rows = np.repeat(np.arange(len(users)), [len(split.positives(u)) for u in users])
    cols = np.concatenate([split.positives(u) for u in users]) if len(users) else np.zeros(0, dtype=np.int64)
    candidates[rows, cols] = False
    candidates[np.arange(len(users)), target] = False
    full_rank, num_candidates = _expected_rank(scores, candidates, target_score)

    hr_s, ndcg_s = _hit_and_ndcg(sampled_rank, 10)
    hr_f, ndcg_f = _hit_and_ndcg(full_rank, 10)
    recall20 = (full_rank < 20).astype(np.float64)
    auc = 1.0 - full_rank / np.maximum(num_candidates, 1)
    return {
        "hr10_sampled": hr_s, "ndcg10_sampled": ndcg_s,
        "hr10_full": hr_f, "ndcg10_full": ndcg_f, "recall20_full": recall20, "auc_full": auc,
    }


def evaluate(score_fn: ScoreFn, split: UserSplit, eval_negatives: np.ndarray, chunk: int = 1024) -> dict[str, float]:
    """Mean of every metric over the split's test users, plus NUM_TEST_USERS."""
    users = split.test_users
    totals = {name: 0.0 for name in METRIC_NAMES}
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        values = rank_metrics(np.asarray(score_fn(batch), dtype=np.float64), batch, split, eval_negatives)
        for name in METRIC_NAMES:
            totals[name] += float(values[name].sum())
    count = len(users)
    result = {name: (totals[name] / count if count else 0.0) for name in METRIC_NAMES}
    result[NUM_TEST_USERS] = float(count)
    return result


def per_user_metrics(score_fn: ScoreFn, split: UserSplit, eval_negatives: np.ndarray, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Every metric of every test user, in `split.test_users` order (the rows under "user"): what
    `evaluate` averages, by the same batches and `rank_metrics`, for reports by user group.
    Each array's mean equals `evaluate`'s value up to the order of summation (exactly, within one chunk)."""
    users = split.test_users
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        values = rank_metrics(np.asarray(score_fn(batch), dtype=np.float64), batch, split, eval_negatives)
        for name in METRIC_NAMES:
            parts[name].append(values[name])
    result = {name: (np.concatenate(parts[name]) if parts[name] else np.zeros(0)) for name in METRIC_NAMES}
    result["user"] = users
    return result


def toppop_score_fn(popularity: np.ndarray) -> ScoreFn:
    """TopPop: every user gets the same ranking, by training popularity."""
    return lambda users: np.broadcast_to(popularity, (len(users), len(popularity)))
