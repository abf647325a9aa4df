"""A deployed merchant's prepared shard is cached in its state directory in binary form: a
SuperNode starts a ClientApp process per message, and each would otherwise re-read the CSV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import client.node_data
from client.node_data import SHARD_CACHE_DIR, load_node
from shared.config import RunConfig
from shared.data.loaders import write_catalog_csv, write_log_csv
from shared.data.synthetic import SyntheticSpec, generate
from shared.node_config import NodeConfig


@pytest.fixture
def merchant(tmp_path: Path) -> tuple[RunConfig, NodeConfig]:
    dataset, _ = generate(SyntheticSpec(users=120, ads=60, merchants=1, seed=3))
    write_log_csv(tmp_path / "log.csv", dataset)
    write_catalog_csv(tmp_path / "catalog.csv", dataset.catalog)
    node = NodeConfig.model_validate({"data-path": str(tmp_path / "log.csv"), "catalog-path": str(tmp_path / "catalog.csv"),
                                      "state-dir": str(tmp_path / "state"), "merchant-id": "m0"})
    return RunConfig.from_flower({"dataset": "logs", "catalog-path": str(tmp_path / "catalog.csv")}), node


def _fresh_process() -> None:
    client.node_data._deployed_data.cache_clear()  # what a new ClientApp process starts with


def _same(a: client.node_data.NodeData, b: client.node_data.NodeData) -> None:
    for field in ("pos_offsets", "pos_ads", "imp_offsets", "imp_ads", "test_ad"):
        np.testing.assert_array_equal(getattr(a.split, field), getattr(b.split, field))
    assert a.split.user_ids.tolist() == b.split.user_ids.tolist() and a.split.num_ads == b.split.num_ads
    np.testing.assert_array_equal(a.eval_negatives, b.eval_negatives)


def test_a_new_process_reads_the_shard_from_its_cache_not_the_log(merchant, monkeypatch):
    cfg, node = merchant
    _fresh_process()
    first = load_node(cfg, node).data
    assert len(list((Path(node.state_dir) / SHARD_CACHE_DIR).glob("shard-*.npz"))) == 1
    _fresh_process()

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the log was parsed again")

    monkeypatch.setattr(client.node_data, "load_log_file", no_parsing)
    _same(load_node(cfg, node).data, first)


def test_a_changed_log_or_a_damaged_cache_is_read_afresh(merchant, caplog):
    cfg, node = merchant
    _fresh_process()
    first = load_node(cfg, node).data
    log = Path(node.data_path)
    kept = log.read_text().splitlines()
    log.write_text("\n".join(kept[:-5]) + "\n")  # the merchant's log changed: fewer rows
    os.utime(log, ns=(1, 1))
    _fresh_process()
    changed = load_node(cfg, node).data
    assert len(changed.split.pos_ads) + len(changed.split.imp_ads) < len(first.split.pos_ads) + len(first.split.imp_ads)
    caches = list((Path(node.state_dir) / SHARD_CACHE_DIR).glob("shard-*.npz"))
    assert len(caches) == 1  # the stale one is gone
    good = caches[0].read_bytes()
    for damaged in (b"not an npz", good[: len(good) // 2], b""):  # malformed, cut short, empty
        caplog.clear()
        caches[0].write_bytes(damaged)
        _fresh_process()
        _same(load_node(cfg, node).data, changed)
        assert "unreadable" in caplog.text
