"""Canary users for a privacy audit, and the dataset with those drawn "in" added to it.

Canary i is a synthetic user `canary-user-i` with its own new ad `canary-ad-i` (category
"canary") in a copy of the catalog. Its rows: a click on its canary ad, then clicks on a few
ordinary ads drawn by popularity (so that it looks like a user), one second apart, so that the
latest ordinary ad is its held-out test ad and the canary ad is always a training positive
(shared/data/split.py holds out the most recent distinct positive; without ordinary ads the
canary ad is the user's only positive and trains). Each canary is in the training data
independently with probability 1/2 from the audit's own seeded RNG, recorded; an excluded
canary has no rows, but its ad stays in the catalog: the catalog is public and fixed before
training, so the server learns nothing from which ads it lists.

The shards are cut before any canary is added (`pin_shards`): every ordinary user gets the
merchant its run's partitioning gives it, written as the log's merchant column, and each canary
one of those merchants at random, independently of its inclusion; the runs then partition by
that column. So whether canary i is in changes merchant j's data by that one user only, as the
per-merchant guarantee's adjacency says. (Partitioning the augmented log afresh, "iid" or
"dirichlet", would reshuffle every shard with each canary, which no merchant's guarantee covers.)

The augmented dataset is written as a generic "logs" dataset (log CSV + catalog CSV) for the
federated runs to read (dataset = "logs", data-path, catalog-path). That format keeps an ad's
category and brand but not a public set's richer tags (all MovieLens genres, all Amazon
attributes): those matter only to `als-catalog-prior` (public tags: post-processing, which
cannot weaken the guarantee the audit tests).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import RunConfig
from shared.data.loaders import write_catalog_csv, write_log_csv
from shared.data.schema import AdCatalog, Dataset, Event, InteractionLog
from shared.data.sources import simulated_shards

USER_PREFIX = "canary-user-"
AD_PREFIX = "canary-ad-"
CATEGORY = "canary"
LOG_FILE = "log.csv"
CATALOG_FILE = "catalog.csv"


@dataclass(frozen=True)
class Canaries:
    user_ids: tuple[str, ...]
    ad_ids: tuple[str, ...]
    included: np.ndarray  # bool [m]: S_i, the canary's rows are in the training data
    seed: int
    ordinary: int  # ordinary positives per canary besides its canary ad
    rows: InteractionLog  # every canary's rows, included or not (ads as rows of the augmented catalog)

    def __len__(self) -> int:
        return len(self.ad_ids)


def pin_shards(dataset: Dataset, cfg: RunConfig, clients: int) -> Dataset:
    """The dataset with a merchant column naming each user's shard, as `cfg`'s partitioning cuts
    it into `clients` shards (partitioning = "merchant" then reproduces those shards)."""
    shard_of = {str(user): name for name, shard in simulated_shards(cfg, dataset, clients) for user in np.unique(shard.user)}
    log = dataset.log
    merchant = np.array([shard_of[str(user)] for user in log.user], dtype=object)
    pinned = InteractionLog(user=log.user, ad=log.ad, timestamp=log.timestamp, event=log.event, merchant=merchant,
                            region=log.region, source=log.source, rejected=log.rejected, warnings=log.warnings)
    return Dataset(dataset.name, dataset.catalog, pinned)


def draw_canaries(dataset: Dataset, count: int, seed: int, ordinary: int = 3) -> tuple[Dataset, Canaries]:
    """The dataset with `count` canary ads in its catalog and the rows of the canaries drawn
    "in" appended to its log; and the canaries with their inclusion."""
    if count < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {count}")
    if ordinary < 0:
        raise ValueError(f"ordinary must be >= 0, got {ordinary}")
    catalog, log = dataset.catalog, dataset.log
    width = len(str(count - 1))
    user_ids = tuple(f"{USER_PREFIX}{i:0{width}d}" for i in range(count))
    ad_ids = tuple(f"{AD_PREFIX}{i:0{width}d}" for i in range(count))
    clashes = (set(ad_ids) & set(catalog.ad_ids)) | (set(user_ids) & set(log.user.tolist()))
    if clashes:
        raise ValueError(f"the dataset already holds canary ids: {sorted(clashes)[:3]}")
    # the audit's own seeded stream: inclusion first, so that it does not depend on `ordinary`
    rng = np.random.default_rng([seed, count])
    included = rng.random(count) < 0.5
    augmented = AdCatalog(
        ad_ids=catalog.ad_ids + ad_ids,
        categories=catalog.categories + (CATEGORY,) * count,
        brands=catalog.brands + (None,) * count,
        titles=catalog.titles + (None,) * count,
        source=f"{catalog.source} + {count} canary ads",
        tags=catalog.tags + ((CATEGORY,),) * count,
    )
    # every canary's rows are fixed before inclusion is looked at: the auditor knows them all
    rows = _canary_rows(log, len(catalog), user_ids, ordinary, rng)
    members = np.flatnonzero(np.isin(rows.user, np.asarray(user_ids, dtype=object)[included]))
    added = rows.subset(members)
    merged = InteractionLog(
        user=np.concatenate([log.user, added.user]),
        ad=np.concatenate([log.ad, added.ad]),
        timestamp=np.concatenate([log.timestamp, added.timestamp]),
        event=np.concatenate([log.event, added.event]),
        merchant=None if log.merchant is None or added.merchant is None else np.concatenate([log.merchant, added.merchant]),
        region=None if log.region is None or added.region is None else np.concatenate([log.region, added.region]),
        source=f"{log.source} + canaries", warnings=log.warnings,
    )
    return Dataset(dataset.name, augmented, merged), Canaries(user_ids, ad_ids, included, seed, ordinary, rows)


def _canary_rows(
    log: InteractionLog, first_canary_row: int, user_ids: tuple[str, ...], ordinary: int, rng: np.random.Generator,
) -> InteractionLog:
    """Every canary's rows: its canary ad first, then `ordinary` distinct ordinary ads."""
    positives = log.ad[log.event >= Event.CLICK]
    popular, counts = np.unique(positives, return_counts=True)
    if ordinary > len(popular):
        raise ValueError(f"cannot draw {ordinary} distinct ordinary ads from {len(popular)} with positives")
    low, high = (int(log.timestamp.min()), int(log.timestamp.max())) if len(log) else (0, 0)
    users: list[str] = []
    ads: list[int] = []
    times: list[int] = []
    for i in range(len(user_ids)):
        picked = rng.choice(popular, size=ordinary, replace=False, p=counts / counts.sum()) if ordinary else np.zeros(0, np.int64)
        start = int(rng.integers(low, high + 1))
        users += [user_ids[i]] * (ordinary + 1)
        ads += [first_canary_row + int(i), *(int(a) for a in picked)]
        times += list(range(start, start + ordinary + 1))
    n = len(users)

    def column(values: np.ndarray | None) -> np.ndarray | None:
        if values is None:
            return None
        choices = np.unique(values)
        return np.repeat(rng.choice(choices, size=len(user_ids)), ordinary + 1).astype(object)

    return InteractionLog(
        user=np.array(users, dtype=object),
        ad=np.array(ads, dtype=np.int64).reshape(n),
        timestamp=np.array(times, dtype=np.int64).reshape(n),
        event=np.full(n, int(Event.CLICK), dtype=np.int8),
        merchant=column(log.merchant),
        region=column(log.region),
    )


def write_dataset(dataset: Dataset, folder: Path) -> tuple[Path, Path, str]:
    """The dataset as a generic "logs" dataset in `folder`: log path, catalog path, and a digest
    of both files (what a cached audit run was trained on)."""
    folder.mkdir(parents=True, exist_ok=True)
    log_path, catalog_path = folder / LOG_FILE, folder / CATALOG_FILE
    write_log_csv(log_path, dataset)
    write_catalog_csv(catalog_path, dataset.catalog)
    digest = hashlib.sha256(log_path.read_bytes() + b"\0" + catalog_path.read_bytes()).hexdigest()
    return log_path, catalog_path, digest
