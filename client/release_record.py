"""A merchant's record of its last release of each kind (train, evaluate), so that a message it
has already answered is answered again with the same release, not a new one.

Why: a server that crashes after the merchants' release and before its checkpoint resumes from
the round before and sends the same instruction again (same round, same global parameters,
same run config). A fresh answer would spend budget a second time for nothing; re-sending the
recorded answer is post-processing of a release already made and accounted, so it costs none.
The record is keyed by all the instruction holds: any difference is a new release.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.app_log import log
from shared.config import SERVER_BOOKKEEPING_KEYS
from shared.params import digest
from shared.storage import atomic_save_npz, load_npz
from shared.wire import Arrays

_KEY, _METRICS = "__release_key", "__release_metrics"


def release_key(kind: str, run_config: dict[str, Any], arrays: Arrays, server_round: int) -> str:
    """What the instruction asks, less the server's bookkeeping (a resume re-asks the same)."""
    asked = {key: value for key, value in run_config.items() if key not in SERVER_BOOKKEEPING_KEYS}
    text = json.dumps({"kind": kind, "round": server_round, "config": asked, "arrays": digest(arrays)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RecordedRelease:
    metrics: dict[str, float]
    arrays: Arrays | None


class ReleaseRecord:
    """One file per kind in the merchant's state dir; written after the ledger records the release."""

    def __init__(self, state_dir: Path, kind: str) -> None:
        self.path = state_dir / f"last_{kind}_release.npz"

    def load(self, key: str) -> RecordedRelease | None:
        if not self.path.is_file():
            return None
        try:
            stored = load_npz(self.path)
            if str(stored.pop(_KEY)) != key:
                return None
            metrics = json.loads(str(stored.pop(_METRICS)))
        except (OSError, ValueError, KeyError) as exc:
            # a damaged record only means a new release (accounted as usual), not a failed message
            log.warning("%s unreadable (%s): this instruction is released afresh", self.path, exc)
            return None
        return RecordedRelease(metrics, stored or None)

    def save(self, key: str, metrics: dict[str, float], arrays: Arrays | None) -> None:
        atomic_save_npz(self.path, **{_KEY: np.array(key), _METRICS: np.array(json.dumps(metrics))}, **(arrays or {}))
