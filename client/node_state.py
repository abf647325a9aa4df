"""What a merchant keeps on its own disk, in the node's state directory.

- `user_factors.npz`: the user id -> factor rows of this merchant's users. Created, trained
  and read only here; never sent anywhere.
- `global_model.npz`: the latest global ad parameters received, with the round they belong to
  the run's user step and its content-affinity blend (for serving and folding in users without
  the server).
Every write is atomic, and neither is synced to disk (shared/storage.py, atomic_save_cache_npz):
both are rebuilt from what the merchant holds (the user factors by the next user step, from the
model the next message carries; the model copy by the next message), and their syncs were two of
a carried private message's six (6-9 ms each on this VM; docs/BENCHMARKS.md, "Unsynced caches":
a few percent of a deployed round). A file left damaged by a power loss is read as absent
(the users start afresh; serving says the copy is unreadable until the next message). What must
survive a crash, the privacy ledger and the release records, is synced before anything leaves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.user_step import AnyUserStep, parse_user_step
from shared.app_log import log
from shared.content_affinity import ContentBlend
from shared.storage import atomic_save_cache_npz, load_npz
from shared.wire import Arrays

USER_FACTORS_FILE = "user_factors.npz"
GLOBAL_MODEL_FILE = "global_model.npz"
USER_STEP_KEY = "user_step"
CONTENT_BLEND_KEY = "content_blend"  # JSON of the ContentBlend, or "null": the run ranked by the model alone


class NodeState:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def user_factors_path(self) -> Path:
        return self.directory / USER_FACTORS_FILE

    def save_user_factors(self, user_ids: np.ndarray, factors: np.ndarray) -> None:
        atomic_save_cache_npz(self.user_factors_path, user_ids=np.asarray(user_ids, dtype=str), factors=factors.astype(np.float32))

    def load_user_factors(self, user_ids: np.ndarray, dim: int) -> np.ndarray | None:
        """Stored factors aligned to `user_ids` (users not stored yet start at zero), or None."""
        if not self.user_factors_path.is_file():
            return None
        try:
            stored = load_npz(self.user_factors_path)
            user_ids_stored, factors = stored["user_ids"], stored["factors"]
        except Exception as damaged:  # any unreadable cache (not synced to disk, above) is no cache: never a failed round
            log.warning("%s: damaged or unreadable (%s): starting users afresh", self.user_factors_path, type(damaged).__name__)
            return None
        if factors.ndim != 2 or factors.shape[0] != len(user_ids_stored):
            log.warning("%s holds %d user ids for factors of shape %s: starting users afresh", self.user_factors_path,
                        len(user_ids_stored), factors.shape)
            return None
        if factors.shape[1] != dim:
            log.warning("%s holds %d-dim factors, the model has %d: starting users afresh", self.user_factors_path, factors.shape[1], dim)
            return None
        row_of = {uid: i for i, uid in enumerate(user_ids_stored.tolist())}
        out = np.zeros((len(user_ids), dim), dtype=np.float32)
        for i, uid in enumerate(user_ids):
            j = row_of.get(str(uid))
            if j is not None:
                out[i] = factors[j]
        return out

    def save_global_model(self, arrays: Arrays, server_round: int, user_step: AnyUserStep | None = None,
                          blend: ContentBlend | None = None) -> None:
        """`user_step`: how this run solves a user's factors from the model (client/user_step.py),
        and `blend`, how it ranks with content affinity (None: by the model alone), recorded with
        the user step, so serving folds new users in and ranks exactly as the run did."""
        extra = {}
        if user_step is not None:
            extra[USER_STEP_KEY] = np.array(user_step.model_dump_json())
        if user_step is not None or blend is not None:
            extra[CONTENT_BLEND_KEY] = np.array(blend.model_dump_json() if blend is not None else "null")
        atomic_save_cache_npz(self.directory / GLOBAL_MODEL_FILE, server_round=np.array(server_round), **extra, **arrays)

    def load_global_model(self) -> tuple[Arrays, int] | None:
        path = self.directory / GLOBAL_MODEL_FILE
        if not path.is_file():
            return None
        stored = load_npz(path)
        server_round = int(stored.pop("server_round"))
        stored.pop(USER_STEP_KEY, None)
        stored.pop(CONTENT_BLEND_KEY, None)
        return stored, server_round

    def load_user_step(self) -> AnyUserStep | None:
        """The user step recorded with the latest global model (None: not recorded). Raises
        ValueError when the record is not a valid one."""
        path = self.directory / GLOBAL_MODEL_FILE
        if not path.is_file():
            return None
        stored = load_npz(path)
        return parse_user_step(str(stored[USER_STEP_KEY])) if USER_STEP_KEY in stored else None

    def load_content_blend(self) -> ContentBlend | None:
        """The content-affinity blend recorded with the latest global model (None: the model
        alone, or a model saved before the blend was recorded). Raises ValueError when the record
        is not a valid one."""
        path = self.directory / GLOBAL_MODEL_FILE
        if not path.is_file():
            return None
        stored = load_npz(path)
        text = str(stored[CONTENT_BLEND_KEY]) if CONTENT_BLEND_KEY in stored else "null"
        return None if text == "null" else ContentBlend.model_validate_json(text)
