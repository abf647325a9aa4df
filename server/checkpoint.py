"""Checkpoints of a run: global parameters and metrics after every round, final model export.

output-dir/
  checkpoints/round-NNNN.npz   global ad parameters after round N (0 = initial)
  checkpoints/latest.json      the last complete round, its file, and the run config
  history.json                 every round's aggregated and per-client metrics
  metrics.csv                  the same, one row per (round, client or "aggregate")
  model/global_model.npz       final export: ad ids, ad factors, ad biases
  model/model.json             what the export is: rounds, config, final metrics
All writes are atomic: a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.storage import atomic_save_npz, atomic_write_bytes, atomic_write_json, load_npz


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.checkpoints = self.root / "checkpoints"

    def save_round(self, server_round: int, arrays: dict[str, np.ndarray], history: list[dict[str, Any]], config: dict[str, Any]) -> None:
        name = f"round-{server_round:04d}.npz"
        atomic_save_npz(self.checkpoints / name, **arrays)
        atomic_write_json(self.root / "history.json", history)
        atomic_write_bytes(self.root / "metrics.csv", history_to_csv(history).encode())
        # the pointer is written last: it only ever names a complete checkpoint
        atomic_write_json(self.checkpoints / "latest.json", {"round": server_round, "file": name, "config": config})

    def latest(self) -> tuple[int, dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
        pointer = self.checkpoints / "latest.json"
        if not pointer.is_file():
            raise CheckpointError(f"nothing to resume from: {pointer} does not exist")
        try:
            latest = json.loads(pointer.read_text())
            arrays = load_npz(self.checkpoints / latest["file"])
            history = json.loads((self.root / "history.json").read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot resume from {self.checkpoints}: {exc}") from exc
        history = [h for h in history if h["round"] <= latest["round"]]
        return int(latest["round"]), arrays, history, latest.get("config", {})

    def export_model(self, arrays: dict[str, np.ndarray], ad_ids: tuple[str, ...], summary: dict[str, Any]) -> Path:
        model_dir = self.root / "model"
        atomic_save_npz(model_dir / "global_model.npz", ad_ids=np.asarray(ad_ids, dtype=str), **arrays)
        summary = {"exported_at": datetime.now(UTC).isoformat(timespec="seconds"), **summary}
        atomic_write_json(model_dir / "model.json", summary)
        return model_dir / "global_model.npz"


def history_to_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in history:
        base = {"round": record["round"], "round_seconds": record.get("round_seconds")}
        rows.append({**base, "client": "aggregate", **record.get("train", {}), **record.get("evaluate", {})})
        for name, metrics in sorted(record.get("clients", {}).items()):
            rows.append({**base, "client": name, **metrics})
    return rows


def history_to_csv(history: list[dict[str, Any]]) -> str:
    rows = history_to_rows(history)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
