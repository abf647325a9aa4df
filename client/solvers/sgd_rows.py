"""The SGD solver's training rows (torch): one padded row set per user.

A user's rows: their training positives (at most `max_positives`, sampled anew each epoch),
`negatives` sampled negatives per positive (ads without a training positive of that user) and
the user's impressions that never turned into a click (explicit negatives), padded to one
[users, rows] tensor. The user step, the ad step and DP-SGD all read them.

Every random draw of a user (which positives the cap keeps, which negatives) comes from that
user's own stream, keyed by a base drawn once per call from the caller's Generator and the
user's id (shared/data/split.user_keys), never from a stream shared with other users: removing
or adding one user must not change anyone else's rows, factors or metric values (the per-user
sensitivity that DP and the released metric sums rely on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from shared.data.split import UserSplit

# Several simulated clients share the machine's cores: one torch thread each unless told otherwise.
torch.set_num_threads(int(os.environ.get("FEDADS_TORCH_THREADS", "1")))


@dataclass
class UserRows:
    ads: torch.Tensor  # long [U, L]
    labels: torch.Tensor  # float [U, L]
    mask: torch.Tensor  # bool [U, L]

    def target(self) -> torch.Tensor:
        """Labels with -1 on padding: the per-user loss's target."""
        return torch.where(self.mask, self.labels, torch.tensor(-1.0))

    def take(self, users: torch.Tensor) -> UserRows:
        mask = self.mask[users]
        width = max(int(mask.sum(dim=1).max()), 1) if len(users) else 1
        return UserRows(self.ads[users, :width], self.labels[users, :width], mask[:, :width])


def _rank_within_groups(groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal, sorted group ids."""
    starts = np.r_[0, np.flatnonzero(groups[1:] != groups[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(groups)])
    return np.arange(len(groups)) - np.repeat(starts, lengths)


# A counter-based generator: draw `counter` of a stream is SplitMix64's output at that position of the
# stream seeded by `seed`. Every draw of every user is computed at once (numpy, no per-user loop),
# and a draw depends on its own (seed, counter) only. uint64 arithmetic wraps, as SplitMix64 wants.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ROUND_SHIFT = np.uint64(40)  # counter = round << 40 | the draw's index among its user's draws of that round
_CAP_ROUND = 0  # round 0: the cap's sort keys; rounds 1.. : negatives, a slot's redraws in later rounds
_NEGATIVE_TRIES = 11  # draws per negative slot before it is dropped (a user who likes nearly every ad)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _draws(seeds: np.ndarray, round_: int, index: np.ndarray) -> np.ndarray:
    """uint64 draws of the streams `seeds` at (round_, index): distinct counters within a stream give distinct draws."""
    counter = (np.uint64(round_) << _ROUND_SHIFT) | index.astype(np.uint64)
    return _mix(seeds + (counter + np.uint64(1)) * _GAMMA)


def _below(draws: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lemire's multiply-shift on the draws' high 32 bits: values in [0, n), exactly uniform over the
    draws marked ok (the rest, under n / 2**32 of them, are redrawn like a clash)."""
    product = (draws >> np.uint64(32)) * np.uint64(n)
    ok = (product & np.uint64(0xFFFFFFFF)) >= np.uint64((1 << 32) % n)
    return (product >> np.uint64(32)).astype(np.int64), ok


def build_user_rows(split: UserSplit, rng: np.random.Generator, negatives: int, max_positives: int | None) -> UserRows:
    """One padded row set per user (see module docstring). Draws one number from `rng`, whoever the users are."""
    num_users, num_ads = split.num_users, split.num_ads
    assert num_ads < 1 << 32, "ads are drawn from 32 random bits"
    base = rng.integers(0, 1 << 64, dtype=np.uint64)
    seeds = _mix(split.stream_keys ^ base)  # one stream per user: its key and this call's base, nothing else
    pos_user, pos_ad = split.positive_user_index(), split.pos_ads
    if max_positives is not None and len(pos_ad):
        # a random order of each user's positives (sort keys from its own stream), the first max_positives kept
        sort_keys = _draws(seeds[pos_user], _CAP_ROUND, _rank_within_groups(pos_user))
        order = np.lexsort((sort_keys, pos_user))
        keep = order[_rank_within_groups(pos_user[order]) < max_positives]
        pos_user, pos_ad = pos_user[keep], pos_ad[keep]

    # negatives: uniform over the catalog, rejecting the user's training positives; slot k of a user
    # draws its candidates at index k of rounds 1, 2, ... of the user's stream, until one is not a positive
    positive_keys = np.sort(split.positive_user_index() * num_ads + split.pos_ads)
    neg_user = np.repeat(pos_user, negatives)
    slot = _rank_within_groups(neg_user) if len(neg_user) else np.zeros(0, dtype=np.int64)
    neg_ad = np.zeros(len(neg_user), dtype=np.int64)
    pending = np.arange(len(neg_user))
    for round_ in range(1, _NEGATIVE_TRIES + 1):
        if not len(pending):
            break
        slot_users = neg_user[pending]
        slot_ads, ok = _below(_draws(seeds[slot_users], round_, slot[pending]), num_ads)
        neg_ad[pending] = slot_ads
        keys = slot_users * num_ads + slot_ads
        where = np.searchsorted(positive_keys, keys)
        clash = (where < len(positive_keys)) & (positive_keys[np.minimum(where, len(positive_keys) - 1)] == keys)
        pending = pending[clash | ~ok]
    if len(pending):
        kept = np.ones(len(neg_user), dtype=bool)
        kept[pending] = False
        neg_user, neg_ad = neg_user[kept], neg_ad[kept]

    imp_user, imp_ad = split.impression_user_index(), split.imp_ads
    users = np.concatenate([pos_user, neg_user, imp_user])
    ads = np.concatenate([pos_ad, neg_ad, imp_ad])
    labels = np.concatenate([np.ones(len(pos_ad)), np.zeros(len(neg_ad) + len(imp_ad))])
    order = np.argsort(users, kind="stable")
    users, ads, labels = users[order], ads[order], labels[order]
    column = _rank_within_groups(users) if len(users) else np.zeros(0, dtype=np.int64)
    width = int(column.max()) + 1 if len(column) else 1
    padded_ads = np.zeros((num_users, width), dtype=np.int64)
    padded_labels = np.zeros((num_users, width), dtype=np.float32)
    mask = np.zeros((num_users, width), dtype=bool)
    padded_ads[users, column] = ads
    padded_labels[users, column] = labels
    mask[users, column] = True
    return UserRows(torch.from_numpy(padded_ads), torch.from_numpy(padded_labels), torch.from_numpy(mask))
