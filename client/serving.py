"""Serving on the merchant's machine: top-K unseen ads per user, and folding new users in.

As implicit's `recommend` and `recalculate_user` belong to the model, ranking and fold-in live
here, beside the state they read, and the merchant agent (client/merchant_cli.py) only parses
and prints. Nothing here talks to the network or touches the privacy ledger: the user step and
ranking are local computations on the merchant's own data with a model already public to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.user_step import AnyUserStep
from shared.catalog_features import normalized_tag_features
from shared.content_affinity import ContentBlend, standardized
from shared.data.schema import AdCatalog, Event, InteractionLog
from shared.data.split import NO_TEST, UserSplit, leave_last_out
from shared.params import score_all
from shared.wire import AD_BIAS, Arrays


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    rank: int  # 1-based
    ad_id: str
    score: float  # what the ad was ranked by: the model's score, or its blend with content affinity
    model_score: float | None = None  # with content affinity: the model's own score (MF: p_u . q_a + b_a); None: `score` is it
    affinity: float = 0.0  # with content affinity: its term of `score` (weight x concentration x standardized affinity)


def seen_ads(log: InteractionLog, positives_only: bool = False) -> dict[str, set[int]]:
    """Catalog rows each user has a log row for (only clicks and purchases with positives_only)."""
    keep = log.event >= Event.CLICK if positives_only else np.ones(len(log), dtype=bool)
    seen: dict[str, set[int]] = {}
    for user, ad in zip(log.user[keep].tolist(), log.ad[keep].tolist()):
        seen.setdefault(str(user), set()).add(int(ad))
    return seen


def top_k(scores: np.ndarray, excluded: set[int], k: int) -> np.ndarray:
    """Rows of the k best scores outside `excluded`, best first; ties go to the lower row."""
    candidates = np.setdiff1d(np.arange(len(scores)), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


def recommend(
    user_ids: Sequence[str], factors: dict[str, np.ndarray], arrays: Arrays,
    catalog: AdCatalog, seen: dict[str, set[int]], k: int, blend: ContentBlend | None = None, log: InteractionLog | None = None,
) -> list[Recommendation]:
    """Top-k ads per user by the model's score (MF: p_u . q_a + b_a; NeuMF: shared/neumf_arrays.py),
    leaving out the ads in `seen`; with `blend` (the run's, recorded with the model), blended with
    content affinity to each user's own positives in `log`, as the run's evaluation ranked."""
    if not user_ids:
        return []
    model = score_all(np.stack([factors[u] for u in user_ids]), arrays)
    scores, affinity = model, np.zeros_like(model)
    if blend is not None:
        if log is None:
            raise ValueError("ranking with content affinity needs the users' log")
        offsets, history = user_positives(log, user_ids, len(catalog))
        scores = blend.scores(model, offsets, history, np.arange(len(user_ids)), normalized_tag_features(catalog))
        affinity = scores - standardized(model.astype(np.float64))  # as the blend standardizes: exactly 0 without a history
    out: list[Recommendation] = []
    for i, (user, row) in enumerate(zip(user_ids, scores)):
        for rank, ad in enumerate(top_k(row, seen.get(user, set()), k), start=1):
            own = float(model[i, ad]) if blend is not None else None
            out.append(Recommendation(user, rank, catalog.ad_ids[ad], float(row[ad]), own, float(affinity[i, ad])))
    return out


def user_positives(log: InteractionLog, user_ids: Sequence[str], num_ads: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, ads) of each of `user_ids`' distinct positive ads in `log`, in the order of
    their first click or purchase, the latest last (as training reads them: serving_split); a user
    without rows in `log` has none."""
    split = serving_split(log, num_ads)
    row_of = {str(uid): row for row, uid in enumerate(split.user_ids.tolist())}
    groups = [split.positives(row_of[user]) if user in row_of else np.zeros(0, dtype=np.int64) for user in user_ids]
    offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(g) for g in groups])
    return offsets, (np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64))


def serving_split(log: InteractionLog, num_ads: int) -> UserSplit:
    """The training split's per-user rows (deduplicated positives, impressions without a
    positive as explicit negatives) with nothing held out: fold-in serves users, it does not
    evaluate them, and a user's latest positive is the most telling one."""
    split = leave_last_out(log, num_ads)
    groups = [
        np.append(split.positives(u), split.test_ad[u]) if split.test_ad[u] != NO_TEST else split.positives(u)
        for u in range(split.num_users)
    ]
    offsets = np.zeros(split.num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(g) for g in groups])
    pos_ads = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64)
    return UserSplit(
        user_ids=split.user_ids, num_ads=num_ads, pos_offsets=offsets, pos_ads=pos_ads,
        imp_offsets=split.imp_offsets, imp_ads=split.imp_ads, test_ad=np.full(split.num_users, NO_TEST, dtype=np.int64),
    )


def fold_in(
    log: InteractionLog, arrays: Arrays, users: Sequence[str], step: AnyUserStep, seed: int,
) -> dict[str, np.ndarray]:
    """Factors of `users` from their rows of `log`, against the frozen global parameters, with
    the user step training used (recorded with the global model); an SGD step samples its
    negatives with `seed` and starts from zero, as training starts a user it has no factors for."""
    rows = np.flatnonzero(np.isin(log.user.astype(str), np.asarray(list(users), dtype=str)))
    split = serving_split(log.subset(rows), arrays[AD_BIAS].shape[0])
    factors = step.fit(split, arrays, np.random.default_rng(seed))
    return {str(uid): factors[i] for i, uid in enumerate(split.user_ids.tolist())}
