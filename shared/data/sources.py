"""Which dataset a run uses, from its config: the full dataset, or just its public catalog."""

from __future__ import annotations

from pathlib import Path

from shared.config import RunConfig
from shared.data.loaders import load_catalog_file, load_log_file, load_log_with_own_catalog
from shared.data.partition import partition_users, shard_log
from shared.data.public_sets import load_amazon_catalog, load_amazon_sequences, load_movielens_100k, load_movielens_catalog
from shared.data.schema import AdCatalog, Dataset, InteractionLog
from shared.data.synthetic import SyntheticSpec, generate, synthetic_catalog


def synthetic_spec(cfg: RunConfig) -> SyntheticSpec:
    return SyntheticSpec(
        merchants=cfg.synthetic_merchants,
        users=cfg.synthetic_users,
        ads=cfg.synthetic_ads,
        categories=cfg.synthetic_categories,
        seed=cfg.seed,
    )


def load_dataset(cfg: RunConfig) -> Dataset:
    if cfg.dataset == "synthetic":
        return generate(synthetic_spec(cfg))[0]
    if cfg.dataset == "movielens-100k":
        return load_movielens_100k(cfg.data_path)
    if cfg.dataset == "amazon-seq":
        return load_amazon_sequences(cfg.data_path, cfg.catalog_path)
    if not cfg.data_path:
        raise ValueError("dataset 'logs' in a simulation needs data-path (the log to cut shards from); "
                         "deployed merchants name theirs in their node config")
    if not cfg.catalog_path:
        return load_log_with_own_catalog(cfg.data_path)
    catalog = load_catalog_file(cfg.catalog_path)
    return Dataset(Path(cfg.data_path).name, catalog, load_log_file(cfg.data_path, catalog))


def load_catalog(cfg: RunConfig) -> AdCatalog:
    """The public catalog only: what the server needs to shape the global parameters."""
    if cfg.dataset == "synthetic":
        return synthetic_catalog(synthetic_spec(cfg))
    if cfg.dataset == "movielens-100k":
        return load_movielens_catalog(cfg.data_path)
    if cfg.dataset == "amazon-seq":
        return load_amazon_catalog(cfg.catalog_path)
    if not cfg.catalog_path:  # a simulation's log without a catalog (RunConfig allows no other): its own ads
        return load_log_with_own_catalog(cfg.data_path).catalog
    return load_catalog_file(cfg.catalog_path)


def simulated_shards(cfg: RunConfig, dataset: Dataset, count: int) -> list[tuple[str, InteractionLog]]:
    """The run's shards of `dataset`, each with the name its client reports (its merchant or
    region for those schemes, else partition-N): how simulated nodes and baselines cut data."""
    users = partition_users(dataset.log, dataset.catalog, cfg.partitioning, count, cfg.dirichlet_alpha, cfg.seed)
    shards = []
    for pid, members in enumerate(users):
        shard = shard_log(dataset.log, members)
        by_column = cfg.partitioning in ("merchant", "region")
        shards.append((str(getattr(shard, cfg.partitioning)[0]) if by_column else f"partition-{pid}", shard))
    return shards
