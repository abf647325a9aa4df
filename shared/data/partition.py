"""Cutting one dataset into client shards. A user lives in exactly one shard."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

import numpy as np

from shared.data.schema import AdCatalog, InteractionLog

log = logging.getLogger(__name__)

Scheme = Literal["merchant", "region", "iid", "dirichlet"]


class PartitionError(ValueError):
    pass


def _users_by_column(data: InteractionLog, column_name: str) -> dict[str, np.ndarray]:
    column = getattr(data, column_name)
    if column is None:
        raise PartitionError(f"partitioning by {column_name} needs a '{column_name}' column in {data.source}")
    # A user id seen under several merchants (or regions) is assigned to the one holding most
    # of their rows; the count of such users is logged, their rows are not dropped.
    counts: dict[str, Counter[str]] = {}
    for user, group in zip(data.user, column):
        counts.setdefault(user, Counter())[group] += 1
    owner = {user: c.most_common(1)[0][0] for user, c in counts.items()}
    split = sum(1 for c in counts.values() if len(c) > 1)
    if split:
        log.warning("%d users appear under several %s values; each is kept whole in its majority %s", split, column_name, column_name)
    groups: dict[str, list[str]] = {}
    for user, group in owner.items():
        groups.setdefault(group, []).append(user)
    return {g: np.array(sorted(us), dtype=object) for g, us in sorted(groups.items())}


def _dominant_category(data: InteractionLog, catalog: AdCatalog) -> dict[str, int]:
    codes, _ = catalog.category_codes()
    per_user: dict[str, Counter[int]] = {}
    for user, ad in zip(data.user, data.ad):
        per_user.setdefault(user, Counter())[int(codes[ad])] += 1
    return {u: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for u, c in per_user.items()}


def partition_users(
    data: InteractionLog,
    catalog: AdCatalog,
    scheme: Scheme,
    num_shards: int,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """User ids of each shard. Shards are disjoint, cover every user and are never empty."""
    if num_shards < 1:
        raise PartitionError(f"num_shards must be >= 1, got {num_shards}")
    users = np.array(sorted(set(data.user)), dtype=object)
    if num_shards > len(users):
        raise PartitionError(f"cannot cut {len(users)} users into {num_shards} non-empty shards")
    rng = np.random.default_rng(seed)

    if scheme in ("merchant", "region"):
        groups = _users_by_column(data, scheme)
        if len(groups) != num_shards:
            raise PartitionError(
                f"partitioning by {scheme}: the data has {len(groups)} {scheme}s ({', '.join(list(groups)[:8])}) "
                f"but {num_shards} shards were asked for; set the number of clients to {len(groups)}"
            )
        return list(groups.values())

    if scheme == "iid":
        return [np.array(sorted(s), dtype=object) for s in np.array_split(rng.permutation(users), num_shards)]

    if scheme == "dirichlet":
        if alpha <= 0:
            raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
        dominant = _dominant_category(data, catalog)
        by_category: dict[int, list[str]] = {}
        for user in users:
            by_category.setdefault(dominant[user], []).append(user)
        for _attempt in range(100):
            shards: list[list[str]] = [[] for _ in range(num_shards)]
            for category in sorted(by_category):
                members = rng.permutation(np.array(by_category[category], dtype=object))
                proportions = rng.dirichlet(np.full(num_shards, alpha))
                cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
                for shard, part in zip(shards, np.split(members, cuts)):
                    shard.extend(part)
            if all(shards):
                return [np.array(sorted(s), dtype=object) for s in shards]
        raise PartitionError(f"dirichlet(alpha={alpha}) left a shard empty 100 times; raise alpha or lower the shard count")

    raise PartitionError(f"unknown partitioning scheme {scheme!r}; use merchant, region, iid or dirichlet")


def shard_log(data: InteractionLog, shard_users: np.ndarray) -> InteractionLog:
    """The rows of `data` that belong to the users of one shard."""
    wanted = set(shard_users.tolist())  # np.isin on object arrays compares pairwise: seconds on Beauty
    return data.subset(np.flatnonzero(np.fromiter((user in wanted for user in data.user), dtype=bool, count=len(data))))
