"""The SGD solver's training rows (torch): one padded row set per user.

A user's rows: their training positives (at most `max_positives`, sampled anew each epoch),
`negatives` sampled negatives per positive (ads without a training positive of that user) and
the user's impressions that never turned into a click (explicit negatives), padded to one
[users, rows] tensor. The user step, the ad step and DP-SGD all read them.
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


def build_user_rows(split: UserSplit, rng: np.random.Generator, negatives: int, max_positives: int | None) -> UserRows:
    """One padded row set per user (see module docstring)."""
    num_users, num_ads = split.num_users, split.num_ads
    pos_user, pos_ad = split.positive_user_index(), split.pos_ads
    if max_positives is not None and len(pos_ad):
        order = np.lexsort((rng.random(len(pos_ad)), pos_user))
        keep = order[_rank_within_groups(pos_user[order]) < max_positives]
        pos_user, pos_ad = pos_user[keep], pos_ad[keep]

    # negatives: uniform over the catalog, rejecting the user's training positives
    positive_keys = np.sort(split.positive_user_index() * num_ads + split.pos_ads)
    neg_user = np.repeat(pos_user, negatives)
    neg_ad = rng.integers(num_ads, size=len(neg_user))
    for _ in range(10):
        keys = neg_user * num_ads + neg_ad
        where = np.searchsorted(positive_keys, keys)
        clash = (where < len(positive_keys)) & (positive_keys[np.minimum(where, len(positive_keys) - 1)] == keys)
        if not clash.any():
            break
        neg_ad[clash] = rng.integers(num_ads, size=int(clash.sum()))
    else:
        neg_user, neg_ad = neg_user[~clash], neg_ad[~clash]  # a user who likes nearly every ad

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
