"""Checkpoint files: atomic, complete, resumable, refusing what cannot be resumed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.checkpoint import Checkpointer, CheckpointError, history_to_csv
from shared.storage import load_npz


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ad_factors": rng.normal(size=(5, 3)).astype(np.float32), "ad_bias": rng.normal(size=5).astype(np.float32)}


def test_latest_returns_the_last_saved_round(tmp_path):
    ckpt = Checkpointer(tmp_path)
    history = []
    for r in range(3):
        history.append({"round": r, "train": {"train-loss": 1.0 / (r + 1)}, "evaluate": {"hr10_sampled": 0.1 * r}, "clients": {}})
        ckpt.save_round(r, _arrays(r), history, {"num-rounds": 5})
    done, arrays, saved_history, config = ckpt.latest()
    assert done == 2
    np.testing.assert_array_equal(arrays["ad_factors"], _arrays(2)["ad_factors"])
    assert saved_history == history and config == {"num-rounds": 5}
    assert not list(tmp_path.rglob("*.tmp"))  # no leftovers of the atomic writes


def test_history_beyond_the_pointer_is_not_resumed(tmp_path):
    """A crash after history.json but before latest.json: resume from what latest.json names."""
    ckpt = Checkpointer(tmp_path)
    history = [{"round": 0, "clients": {}}, {"round": 1, "clients": {}}]
    ckpt.save_round(1, _arrays(1), history, {})
    (tmp_path / "history.json").write_text(json.dumps(history + [{"round": 2, "clients": {}}]))
    done, _, saved_history, _ = ckpt.latest()
    assert done == 1 and [h["round"] for h in saved_history] == [0, 1]


def test_missing_or_corrupt_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Checkpointer(tmp_path).latest()
    ckpt = Checkpointer(tmp_path)
    ckpt.save_round(0, _arrays(0), [{"round": 0, "clients": {}}], {})
    (tmp_path / "checkpoints" / "round-0000.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot resume"):
        ckpt.latest()


def test_export_and_csv(tmp_path):
    ckpt = Checkpointer(tmp_path)
    path = ckpt.export_model(_arrays(4), ("a", "b", "c", "d", "e"), {"rounds": 4})
    exported = load_npz(path)
    assert exported["ad_ids"].tolist() == ["a", "b", "c", "d", "e"]
    assert json.loads((tmp_path / "model" / "model.json").read_text())["rounds"] == 4
    csv_text = history_to_csv([
        {"round": 1, "round_seconds": 2.0, "train": {"train-loss": 0.5}, "evaluate": {"hr10_sampled": 0.3},
         "clients": {"merchant-1": {"hr10_sampled": 0.2}, "merchant-0": {"hr10_sampled": 0.4}}},
    ])
    lines = csv_text.strip().splitlines()
    assert lines[0].split(",")[:3] == ["round", "round_seconds", "client"]
    assert [line.split(",")[2] for line in lines[1:]] == ["aggregate", "merchant-0", "merchant-1"]
