"""Leave-last-out split of a shard into per-user training sets and held-out test ads.

Per user: the positive ads (click, purchase) deduplicated at their first occurrence, ordered
by time (ties keep file order); the most recent distinct positive ad is held out for testing,
the rest train. A user with fewer than two distinct positive ads is kept for training and has
no test ad. Impressions that never became a positive are kept as explicit negatives.

Evaluation negatives (the NCF protocol) are drawn once per user, seeded by the user id, from
ads the user never had a positive interaction with, so a user's negatives are the same however
the data is sharded.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from shared.data.schema import Event, InteractionLog

NO_TEST = -1


@dataclass
class UserSplit:
    """One shard's users, in sorted id order, with CSR-packed training positives."""

    user_ids: np.ndarray  # object (str), sorted
    num_ads: int
    pos_offsets: np.ndarray  # int64 [U + 1]
    pos_ads: np.ndarray  # int64, training positives, grouped by user
    imp_offsets: np.ndarray  # int64 [U + 1]
    imp_ads: np.ndarray  # int64, impressions without a positive
    test_ad: np.ndarray  # int64 [U], NO_TEST where the user has no held-out ad

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def positives(self, u: int) -> np.ndarray:
        return self.pos_ads[self.pos_offsets[u] : self.pos_offsets[u + 1]]

    def positive_counts(self) -> np.ndarray:
        return np.diff(self.pos_offsets)

    def positive_user_index(self) -> np.ndarray:
        """User row of every entry of `pos_ads`."""
        return np.repeat(np.arange(self.num_users), self.positive_counts())

    def impression_user_index(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_users), np.diff(self.imp_offsets))

    def ad_popularity(self) -> np.ndarray:
        """Training-positive count per ad: the TopPop score."""
        return np.bincount(self.pos_ads, minlength=self.num_ads).astype(np.float64)

    @property
    def test_users(self) -> np.ndarray:
        return np.flatnonzero(self.test_ad != NO_TEST)

    @cached_property
    def stream_keys(self) -> np.ndarray:
        """uint64 [U]: each user's key for its own random streams (`user_keys`), hashed once per split."""
        return user_keys(self.user_ids)


def _csr(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(g) for g in groups])
    values = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64)
    return offsets, values


def leave_last_out(data: InteractionLog, num_ads: int) -> UserSplit:
    order = np.lexsort((np.arange(len(data)), data.timestamp, data.user.astype(str)))
    users_sorted = data.user[order]
    boundaries = np.flatnonzero(users_sorted[1:] != users_sorted[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(order)]])
    user_ids, train_groups, imp_groups, test = [], [], [], []
    positive = data.event >= Event.CLICK
    for start, end in zip(starts, ends):
        rows = order[start:end]
        user_ids.append(users_sorted[start])
        pos_rows = rows[positive[rows]]
        ads_in_time = data.ad[pos_rows]
        _, first = np.unique(ads_in_time, return_index=True)
        distinct = ads_in_time[np.sort(first)]  # distinct positive ads, in order of first occurrence
        if len(distinct) >= 2:
            train_groups.append(distinct[:-1])
            test.append(int(distinct[-1]))
        else:
            train_groups.append(distinct)
            test.append(NO_TEST)
        impressions = np.unique(data.ad[rows[~positive[rows]]])
        imp_groups.append(np.setdiff1d(impressions, distinct, assume_unique=True))
    pos_offsets, pos_ads = _csr(train_groups)
    imp_offsets, imp_ads = _csr(imp_groups)
    return UserSplit(
        user_ids=np.array(user_ids, dtype=object),
        num_ads=num_ads,
        pos_offsets=pos_offsets,
        pos_ads=pos_ads,
        imp_offsets=imp_offsets,
        imp_ads=imp_ads,
        test_ad=np.array(test, dtype=np.int64),
    )


def user_seed(seed: int, user_id: str) -> list[int]:
    return [seed, zlib.crc32(str(user_id).encode("utf-8"))]


def user_keys(user_ids: np.ndarray) -> np.ndarray:
    """A 64-bit key per user (uint64) from the user's id alone: what a user's own random streams
    are keyed by, so that they do not depend on which other users are present. 64 bits, not the
    32 of `user_seed`'s crc32: two of a 20,000-user shard's users share a crc32 about one time in 20."""
    digests = b"".join(hashlib.blake2b(str(uid).encode("utf-8"), digest_size=8).digest() for uid in user_ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def sample_eval_negatives(split: UserSplit, num_negatives: int = 99, seed: int = 0) -> np.ndarray:
    """[U, num_negatives] ads each user never interacted with positively (-1 pads users without a test ad)."""
    out = np.full((split.num_users, num_negatives), -1, dtype=np.int64)
    for u in split.test_users:
        # a mask, not np.setdiff1d (which re-sorts the whole catalog per user): the same sorted ads
        allowed_mask = np.ones(split.num_ads, dtype=bool)
        allowed_mask[split.positives(u)] = False
        allowed_mask[split.test_ad[u]] = False
        allowed = np.flatnonzero(allowed_mask)
        rng = np.random.default_rng(user_seed(seed, split.user_ids[u]))
        take = min(num_negatives, len(allowed))
        out[u, :take] = rng.choice(allowed, size=take, replace=False)
    return out
