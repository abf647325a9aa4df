"""This node's data: where it comes from, its one-time preparation, and its evaluation.

A deployed merchant names its own log (and optionally its catalog and state directory) in its
node config (shared/node_config.py). In simulation, Flower gives each virtual node a
`partition-id` out of `num-partitions`, and the node cuts its shard from the run's dataset.
Loading, validation, the leave-last-out split and the evaluation negatives happen once per
process and data, and are cached: a simulation's actors serve many runs of one dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from client.node_state import NodeState
from shared.als import Rows
from shared.app_log import log
from shared.catalog_features import normalized_tag_features
from shared.config import RunConfig
from shared.content_affinity import ContentBlend
from shared.data.loaders import load_catalog_file, load_log_file
from shared.data.schema import AdCatalog, InteractionLog
from shared.data.sources import load_catalog, load_dataset, simulated_shards
from shared.data.split import UserSplit, leave_last_out, sample_eval_negatives
from shared.metrics import ScoreFn, toppop_score_fn
from shared.metrics import evaluate as evaluate_ranking
from shared.node_config import NodeConfig
from shared.params import score_all
from shared.storage import atomic_save_npz, load_npz
from shared.wire import Arrays

EVAL_NEGATIVES = 99  # the NCF protocol
SHARD_CACHE_DIR = "shard-cache"  # in the merchant's state directory: its prepared shard, binary
SHARD_CACHE_FORMAT = 2  # raised whenever what the cache holds, or how the shard is prepared, changes


@dataclass(frozen=True, eq=False)
class NodeData:
    """One shard, prepared: its leave-last-out split, fixed evaluation negatives, and the
    catalog's public tags as content affinity reads them."""

    split: UserSplit
    eval_negatives: np.ndarray
    ad_features: sp.csr_array  # [ads, tags]: shared/catalog_features.normalized_tag_features

    @classmethod
    def prepare(cls, log: InteractionLog, catalog: AdCatalog, seed: int, ad_features: sp.csr_array | None = None) -> NodeData:
        """`ad_features`: the catalog's, when the caller already has them (many shards, one catalog)."""
        split = leave_last_out(log, len(catalog))
        features = normalized_tag_features(catalog) if ad_features is None else ad_features
        return cls(split, sample_eval_negatives(split, EVAL_NEGATIVES, seed), features)

    @property
    def num_users(self) -> int:
        return self.split.num_users

    @property
    def num_ads(self) -> int:
        return self.split.num_ads

    @property
    def user_ids(self) -> np.ndarray:
        return self.split.user_ids

    @cached_property
    def rows(self) -> Rows:
        """The observed (user, ad, label) rows, grouped by user (ALS and its statistics)."""
        return Rows.from_split(self.split)

    def score_fn(self, arrays: Arrays, user_factors: np.ndarray, blend: ContentBlend | None) -> ScoreFn:
        """How this merchant ranks ads for its users: the model's scores, blended with content
        affinity from each user's own training positives when `blend` is set."""
        split, features = self.split, self.ad_features

        def scores(users: np.ndarray) -> np.ndarray:
            model = score_all(user_factors[users], arrays)
            return model if blend is None else blend.scores(model, split.pos_offsets, split.pos_ads, users, features)

        return scores

    def evaluate(self, arrays: Arrays, user_factors: np.ndarray, blend: ContentBlend | None) -> dict[str, float]:
        """Ranking metrics of the held-out interactions (shared/metrics.py), with their number of
        test users, ranked as `score_fn` ranks (`blend`: the run's ContentBlend.from_config)."""
        return evaluate_ranking(self.score_fn(arrays, user_factors, blend), self.split, self.eval_negatives)

    @cached_property
    def _popularity(self) -> dict[str, float]:
        return evaluate_ranking(toppop_score_fn(self.split.ad_popularity()), self.split, self.eval_negatives)

    def evaluate_popularity(self) -> dict[str, float]:
        """The same metrics of ranking every ad by this data's own training popularity: the
        floor any model should beat. Of a merchant's shard: its merchant popularity; of the
        pooled data: the global TopPop baseline."""
        return dict(self._popularity)


@dataclass(frozen=True)
class Node:
    name: str  # in replies: the merchant id, or the simulated shard's merchant, region or partition
    data: NodeData
    state: NodeState


def load_node(cfg: RunConfig, node_config: NodeConfig) -> Node:
    """The node's data (cached) and its state directory."""
    if node_config.simulated:
        assert node_config.partition_id is not None and node_config.num_partitions is not None
        name, data = _simulated_node(cfg.data_config(), node_config.num_partitions, node_config.partition_id)
    else:
        name = node_config.name
        versions = tuple(_file_version(p) for p in (node_config.data_path, node_config.catalog_path))
        data = _deployed_data(name, node_config.data_path, node_config.catalog_path, cfg.data_config(), versions,
                              node_config.state_path(cfg) / SHARD_CACHE_DIR)
    return Node(name, data, NodeState(node_config.state_path(cfg)))


def _file_version(path: str) -> tuple[int, int] | None:
    """(modification time, size): a merchant who rewrites its log is read afresh."""
    try:
        stat = os.stat(path)
    except OSError:
        return None  # loading says what is wrong with it
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=8)
def _deployed_data(
    name: str, data_path: str, catalog_path: str, data: RunConfig, versions: tuple[object, ...], cache_dir: Path,
) -> NodeData:
    """The merchant's prepared shard: from its binary cache in the state directory when the log,
    the catalog (their modification times and sizes) and the data settings are those it was
    made from, else parsed, validated and split afresh and cached. A ClientApp in a process of
    its own for each message (Flower's, or forked: deploy/warm_clientapp.py) would re-read the
    CSV every time without the file; one in the SuperNode's warm process keeps the shard in
    memory (this cache) for the next message while the files are unchanged."""
    key = hashlib.sha256(json.dumps([SHARD_CACHE_FORMAT, os.path.abspath(data_path), os.path.abspath(catalog_path) if catalog_path else "",
                                     versions, data.model_dump(mode="json")], sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir / f"shard-{key}.npz"
    cached = _read_shard_cache(path)
    if cached is not None:
        return cached
    catalog = load_catalog_file(catalog_path) if catalog_path else load_catalog(data)
    node_data = NodeData.prepare(load_log_file(data_path, catalog), catalog, data.seed)
    _log_shard(name, node_data)
    _write_shard_cache(path, node_data)
    return node_data


def _read_shard_cache(path: Path) -> NodeData | None:
    if not path.is_file():
        return None
    try:
        arrays = load_npz(path)
        split = UserSplit(user_ids=arrays["user_ids"].astype(object), num_ads=int(arrays["num_ads"]), pos_offsets=arrays["pos_offsets"],
                          pos_ads=arrays["pos_ads"], imp_offsets=arrays["imp_offsets"], imp_ads=arrays["imp_ads"], test_ad=arrays["test_ad"])
        features = sp.csr_array((arrays["feature_data"], arrays["feature_indices"], arrays["feature_indptr"]),
                                shape=tuple(int(n) for n in arrays["feature_shape"]))
        return NodeData(split, arrays["eval_negatives"], features)
    except (OSError, ValueError, KeyError) as exc:  # a damaged cache is rebuilt from the log
        log.warning("shard cache %s unreadable (%s): reading the log again", path, exc)
        return None


def _write_shard_cache(path: Path, data: NodeData) -> None:
    split = data.split
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(path, user_ids=split.user_ids.astype(str), num_ads=np.asarray(split.num_ads), pos_offsets=split.pos_offsets,
                        pos_ads=split.pos_ads, imp_offsets=split.imp_offsets, imp_ads=split.imp_ads, test_ad=split.test_ad,
                        eval_negatives=data.eval_negatives, feature_data=data.ad_features.data,
                        feature_indices=data.ad_features.indices, feature_indptr=data.ad_features.indptr,
                        feature_shape=np.asarray(data.ad_features.shape))
        for stale in path.parent.glob("shard-*.npz"):  # one cache: the log it was made from has changed
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as exc:  # the cache only saves time
        log.warning("shard cache %s not written (%s)", path, exc)


@lru_cache(maxsize=4)
def _simulated_shards(data: RunConfig, count: int) -> tuple[AdCatalog, sp.csr_array, list[tuple[str, InteractionLog]]]:
    """The run's dataset, its catalog's tag features and all its shards, built once per process
    and data (`data`: the run's `data_config()`): Flower's simulation does not pin a virtual
    node to an actor (each actor builds most of the nodes), and the harness's actors serve many
    runs of one dataset."""
    dataset = load_dataset(data)
    return dataset.catalog, normalized_tag_features(dataset.catalog), simulated_shards(data, dataset, count)


@lru_cache(maxsize=64)
def _simulated_node(data: RunConfig, count: int, pid: int) -> tuple[str, NodeData]:
    """A simulated node's name and prepared data: they depend on the data's config only."""
    catalog, features, shards = _simulated_shards(data, count)
    name, shard = shards[pid]
    node_data = NodeData.prepare(shard, catalog, data.seed, features)
    _log_shard(name, node_data)
    return name, node_data


def _log_shard(name: str, data: NodeData) -> None:
    split = data.split
    log.info("node %s: %d users, %d training positives, %d test users", name, split.num_users, len(split.pos_ads), len(split.test_users))


def prepare_simulated_nodes(data: RunConfig, count: int) -> None:
    """Build a simulation's dataset and every node's data ahead of the nodes' first messages
    (the harness's actors do it as they start, while the harness is busy elsewhere)."""
    data = data.data_config()
    for pid in range(count):
        _simulated_node(data, count, pid)
