"""What a merchant keeps on its own disk, in the node's state directory.

- `user_factors.npz`: the user id -> factor rows of this merchant's users. Created, trained
  and read only here; never sent anywhere.
- `global_model.npz`: the latest global ad parameters received, with the round they belong to
  and the run's user step (for serving and folding in users without the server).
Every write is atomic.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from shared.storage import atomic_save_npz, load_npz

log = logging.getLogger(__name__)

USER_FACTORS_FILE = "user_factors.npz"
GLOBAL_MODEL_FILE = "global_model.npz"


class NodeState:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def user_factors_path(self) -> Path:
        return self.directory / USER_FACTORS_FILE

    def save_user_factors(self, user_ids: np.ndarray, factors: np.ndarray) -> None:
        atomic_save_npz(self.user_factors_path, user_ids=np.asarray(user_ids, dtype=str), factors=factors.astype(np.float32))

    def load_user_factors(self, user_ids: np.ndarray, dim: int) -> np.ndarray | None:
        """Stored factors aligned to `user_ids` (users not stored yet start at zero), or None."""
        if not self.user_factors_path.is_file():
            return None
        stored = load_npz(self.user_factors_path)
        if stored["factors"].shape[1] != dim:
            log.warning("%s holds %d-dim factors, the model has %d: starting users afresh", self.user_factors_path, stored["factors"].shape[1], dim)
            return None
        row_of = {uid: i for i, uid in enumerate(stored["user_ids"].tolist())}
        out = np.zeros((len(user_ids), dim), dtype=np.float32)
        for i, uid in enumerate(user_ids):
            j = row_of.get(str(uid))
            if j is not None:
                out[i] = stored["factors"][j]
        return out

    def save_global_model(self, arrays: dict[str, np.ndarray], server_round: int, user_step: dict[str, Any] | None = None) -> None:
        """`user_step`: how this run solves a user's factors from the model (solver and its
        settings), so serving folds new users in exactly as training would."""
        extra = {"user_step": np.array(json.dumps(user_step))} if user_step is not None else {}
        atomic_save_npz(self.directory / GLOBAL_MODEL_FILE, server_round=np.array(server_round), **extra, **arrays)

    def load_global_model(self) -> tuple[dict[str, np.ndarray], int] | None:
        path = self.directory / GLOBAL_MODEL_FILE
        if not path.is_file():
            return None
        stored = load_npz(path)
        server_round = int(stored.pop("server_round"))
        stored.pop("user_step", None)
        return stored, server_round

    def load_user_step(self) -> dict[str, Any] | None:
        """The user step recorded with the latest global model (None: not recorded)."""
        path = self.directory / GLOBAL_MODEL_FILE
        if not path.is_file():
            return None
        stored = load_npz(path)
        return json.loads(str(stored["user_step"])) if "user_step" in stored else None
