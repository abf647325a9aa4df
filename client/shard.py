"""This node's data: where it comes from and its one-time preparation.

A deployed merchant names its own log file in its node config (`data-path`, and optionally
`catalog-path`, `state-dir`, `merchant-id`). In simulation, Flower gives each virtual node a
`partition-id` out of `num-partitions`, and the node cuts its shard from the run's dataset.
Loading, validation and the leave-last-out split happen once per process and are cached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client.node_state import NodeState
from client.trainer import LocalTrainer, TrainSettings
from shared.config import RunConfig
from shared.data.loaders import load_catalog_file, load_log_file
from shared.data.schema import AdCatalog, InteractionLog
from shared.data.split import UserSplit
from shared.data.sources import load_catalog, load_dataset, simulated_shards

log = logging.getLogger(__name__)


@dataclass
class NodeRuntime:
    name: str
    trainer: LocalTrainer
    state: NodeState

    @property
    def user_ids(self) -> np.ndarray:
        return self.trainer.split.user_ids


def _node_source(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[str, str, str | None, int | None, int | None]:
    """(name, state dir, deployed data path, partition id, partition count)."""
    if "data-path" in node_config:
        name = str(node_config.get("merchant-id", Path(str(node_config["data-path"])).stem))
        state_dir = str(node_config.get("state-dir", Path(cfg.state_dir) / name))
        return name, state_dir, str(node_config["data-path"]), None, None
    if "partition-id" not in node_config:
        raise ValueError("node config has neither data-path (deployment) nor partition-id (simulation)")
    pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    return f"partition-{pid}", str(Path(cfg.state_dir) / f"partition-{pid}"), None, pid, count


def node_runtime(cfg: RunConfig, node_config: Mapping[str, Any]) -> NodeRuntime:
    name, state_dir, data_path, pid, count = _node_source(cfg, node_config)
    catalog_path = str(node_config.get("catalog-path", ""))
    return _cached_runtime(cfg, name, state_dir, data_path, catalog_path, pid, count)


@lru_cache(maxsize=4)
def _simulated_shards(data: RunConfig, count: int) -> tuple[AdCatalog, list[tuple[str, InteractionLog]]]:
    """The run's dataset and all its shards, built once per process and data (`data`: the
    run's `data_config()`): Flower's simulation does not pin a virtual node to an actor (each
    actor builds most of the nodes), and the harness's actors serve many runs of one dataset."""
    dataset = load_dataset(data)
    return dataset.catalog, simulated_shards(data, dataset, count)


@lru_cache(maxsize=64)
def _simulated_node(data: RunConfig, count: int, pid: int) -> tuple[str, UserSplit, np.ndarray]:
    """A simulated node's name, split and evaluation negatives: they depend on the data only."""
    catalog, shards = _simulated_shards(data, count)
    name, shard = shards[pid]
    return (name, *LocalTrainer.prepare(shard, len(catalog), data.seed))


def prepare_simulated_nodes(data: RunConfig, count: int) -> None:
    """Build a simulation's dataset and every node's split ahead of the nodes' first messages
    (the harness's actors do it as they start, while the harness is busy elsewhere)."""
    data = data.data_config()
    for pid in range(count):
        _simulated_node(data, count, pid)


@lru_cache(maxsize=64)
def _cached_runtime(
    cfg: RunConfig, name: str, state_dir: str, data_path: str | None, catalog_path: str, pid: int | None, count: int | None
) -> NodeRuntime:
    if data_path is not None:
        catalog = load_catalog_file(catalog_path) if catalog_path else load_catalog(cfg)
        trainer = LocalTrainer.for_log(cfg, load_log_file(data_path, catalog), len(catalog))
    else:
        name, split, negatives = _simulated_node(cfg.data_config(), count, pid)
        trainer = LocalTrainer(split, negatives, TrainSettings.from_config(cfg))
    split = trainer.split
    log.info("node %s: %d users, %d training positives, %d test users", name, split.num_users, len(split.pos_ads), len(split.test_users))
    return NodeRuntime(name, trainer, NodeState(state_dir))
