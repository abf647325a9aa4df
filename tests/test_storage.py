"""File writes (shared/storage.py): what is synced to disk and what a merchant keeps as a cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from client.node_state import NodeState
from shared.params import init_global_arrays
from shared.storage import atomic_save_cache_npz, atomic_save_npz, load_npz
from tests.conftest import client_call, small_run_config


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every file or directory synced."""
    calls: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_a_durable_write_syncs_the_file_and_its_directory_and_a_cache_write_neither(tmp_path, fsyncs):
    atomic_save_npz(tmp_path / "durable.npz", a=np.arange(3))
    assert len(fsyncs) == 2
    atomic_save_cache_npz(tmp_path / "cache.npz", a=np.arange(4))
    assert len(fsyncs) == 2
    np.testing.assert_array_equal(load_npz(tmp_path / "cache.npz")["a"], np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz", "durable.npz"]  # no temporary file left


def test_a_private_training_message_syncs_its_privacy_records_not_its_caches(tmp_path, fsyncs, as_server):
    """The ledger and the release record are on disk before the release leaves; the user
    factors and the model copy are rewritten by every message and are not synced."""
    cfg = small_run_config(tmp_path, privacy="user")
    state = tmp_path / "out" / "state" / "partition-0"
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, cfg.seed)
    client_call("train", cfg, arrays, server_round=2)  # a statistics release (round 1 asks for popularity)
    assert (state / "user_factors.npz").is_file() and (state / "global_model.npz").is_file()
    assert any(name.startswith(".privacy_ledger.json.") for name in fsyncs)
    assert any(name.startswith(".last_train_release.npz.") for name in fsyncs)
    assert not any(name.startswith((".user_factors.npz.", ".global_model.npz.")) for name in fsyncs)


def test_damaged_user_factors_start_the_users_afresh(tmp_path, caplog):
    state = NodeState(tmp_path)
    state.save_user_factors(np.array(["u1", "u2"]), np.ones((2, 3), dtype=np.float32))
    np.testing.assert_array_equal(state.load_user_factors(np.array(["u2", "u3"]), 3), [[1, 1, 1], [0, 0, 0]])
    state.user_factors_path.write_bytes(b"")  # what a power loss before the writeback can leave
    with caplog.at_level("WARNING", logger="flwr.fedads"):
        assert state.load_user_factors(np.array(["u2"]), 3) is None
    assert "damaged or unreadable" in caplog.text and "starting users afresh" in caplog.text


@pytest.mark.parametrize("content", ["no factors", "mismatched", "not a zip"])
def test_any_unreadable_user_factors_start_the_users_afresh(tmp_path, caplog, content):
    """Whatever a damaged file holds (a member missing, shapes that disagree, bytes numpy cannot
    read), the cache is absent and the round goes on."""
    state = NodeState(tmp_path)
    if content == "no factors":
        atomic_save_npz(state.user_factors_path, user_ids=np.array(["u1"]))
    elif content == "mismatched":
        atomic_save_npz(state.user_factors_path, user_ids=np.array(["u1", "u2"]), factors=np.ones((3, 4), dtype=np.float32))
    else:
        state.user_factors_path.write_bytes(b"PK\x03\x04" + bytes(100))
    with caplog.at_level("WARNING", logger="flwr.fedads"):
        assert state.load_user_factors(np.array(["u1"]), 4) is None
    assert "starting users afresh" in caplog.text
