"""Checkpoints of a run: global parameters and metrics after every round, final model export.

output-dir/
  checkpoints/round-NNNN.npz   global ad parameters after round N (0 = initial)
  checkpoints/server-state-NNNN.npz  what the strategy remembers after round N (private ALS:
                               the pooled noisy counts and the popularity rule's decision)
  checkpoints/latest.json      the last complete round, its file, the run config and the
                               catalog's identity (its ad count, digests of its ids in order and
                               of their content)
  checkpoints/config.json      the run config alone (resume reads it if latest.json is damaged)
  checkpoints/catalog.json     the catalog's identity alone (the same fallback)
  history.json                 every round's aggregated and per-client metrics
  metrics.csv                  the same, one row per (round, client or "aggregate")
  model/global_model.npz       final export: ad ids, ad factors, ad biases
  model/model.json             what the export is: rounds, config, final metrics
  run_status.json              how the run ended: complete, or short of its plan and why
  .serverapp.lock              held (flock) by the ServerApp writing the folder, with its run id
One ServerApp writes a folder at a time: a second one (a resume submitted twice, a run nobody
stopped) stops before writing anything, naming the run that holds it. The lock goes with the
holder's process, however it ends.
All writes are atomic: a crash leaves the previous checkpoint intact. A checkpoint damaged
afterwards (disk, a hand edit) is named and skipped: resume falls back to the newest good round.
A resume whose run config differs from the checkpoint's is refused, naming the keys, unless
`resume-accept-changes` names them; so is a resume whose catalog is not the one the run
started with: always when its ads or their order differ (row i of the parameters belongs to the
catalog's i-th ad), and when only their content (titles, categories, brands, tags) differs
unless `resume-accept-changes` names `catalog`.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared.app_log import log
from shared.config import SERVER_BOOKKEEPING_KEYS
from shared.data.schema import AdCatalog
from shared.storage import atomic_save_npz, atomic_write_bytes, atomic_write_json, load_npz

# keys a resume may change without saying so: extending the plan, moving the folder
RESUMABLE_KEYS = SERVER_BOOKKEEPING_KEYS | {"num-rounds"}
# keys added after runs were checkpointed, with the value such a run had: a checkpoint without
# the key compares as that value (the catalog prior lent its tags' factors at full weight; merchants
# ranked by the model alone, without content affinity)
KEYS_ADDED_LATER = {"als-catalog-prior-weight": 1.0, "content-affinity": 0.0, "content-affinity-halflife": 3.0}
CATALOG_FILE = "catalog.json"
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.npz$")


class CheckpointError(RuntimeError):
    pass


LOCK_FILE = ".serverapp.lock"


class OutputDirBusy(RuntimeError):
    """Another ServerApp holds the run folder."""


@contextmanager
def exclusive_output(root: Path, run_id: int) -> Iterator[None]:
    """Hold `root` for this ServerApp while the block runs: an exclusive flock on
    root/.serverapp.lock (which then names `run_id`), released when the block ends or the
    process dies, SIGKILL included. Raises OutputDirBusy, naming the holder, if another process
    (or another ServerApp in this one) holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock: per open file, so two ServerApps of one process exclude each other too
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise OutputDirBusy(f"{root} is being written by another ServerApp (Flower run {holder}): two runs must not write "
                                "one folder; stop that run first (`flwr stop`), then resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{run_id}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.checkpoints = self.root / "checkpoints"
        self._config_saved = False  # config.json and catalog.json: the same every round of a run

    def save_round(self, server_round: int, arrays: dict[str, np.ndarray], history: list[dict[str, Any]], config: dict[str, Any],
                   server_state: dict[str, np.ndarray] | None = None, catalog: dict[str, Any] | None = None) -> None:
        """`catalog`: the identity of the catalog the parameters' rows belong to (`catalog_identity`)."""
        name = f"round-{server_round:04d}.npz"
        atomic_save_npz(self.checkpoints / name, **arrays)
        if server_state:
            atomic_save_npz(self._server_state_path(server_round), **server_state)
        self.save_history(history)
        if not self._config_saved:
            atomic_write_json(self.checkpoints / "config.json", config)
            if catalog is not None:
                atomic_write_json(self.checkpoints / CATALOG_FILE, catalog)
            self._config_saved = True
        # the pointer is written last: it only ever names a complete checkpoint
        pointer: dict[str, Any] = {"round": server_round, "file": name, "config": config}
        if catalog is not None:
            pointer["catalog"] = catalog
        atomic_write_json(self.checkpoints / "latest.json", pointer)

    def save_history(self, history: list[dict[str, Any]]) -> None:
        """history.json and metrics.csv: also on their own, when a round's evaluation came after
        its checkpoint (carry-evaluation)."""
        atomic_write_json(self.root / "history.json", history)
        atomic_write_bytes(self.root / "metrics.csv", history_to_csv(history).encode())

    def latest(self) -> tuple[int, dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
        """The newest round whose checkpoint loads, its arrays, the history up to it and the run
        config. A damaged file is named in the log and skipped, never silently."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.is_file():
            raise CheckpointError(f"nothing to resume from: {pointer} does not exist")
        newest, config = self._read_pointer(pointer)
        skipped: list[str] = []
        for server_round, path in self._round_files(up_to=newest):
            try:
                arrays = load_npz(path)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                skipped.append(f"{path} ({type(exc).__name__}: {exc})")
                log.warning("fedads: checkpoint %s is damaged (%s: %s); trying the round before", path, type(exc).__name__, exc)
                continue
            history = self._history(up_to=server_round)
            if skipped:
                log.warning("fedads: resuming from round %d (%s), the newest good checkpoint", server_round, path)
            return server_round, arrays, history, config
        raise CheckpointError(f"cannot resume from {self.checkpoints}: no checkpoint loads"
                              + (": " + "; ".join(skipped) if skipped else ""))

    def catalog(self) -> dict[str, Any] | None:
        """The identity of the catalog the checkpoint's parameters belong to, as latest.json
        records it, or catalog.json when latest.json is damaged (None: a checkpoint written
        before fedads recorded it). Raises CheckpointError when catalog.json is there but
        neither file can be read: the resume could not check that the rows are the catalog's."""
        backup = self.checkpoints / CATALOG_FILE
        for path, key in ((self.checkpoints / "latest.json", "catalog"), (backup, None)):
            try:
                stored = json.loads(path.read_text())
                stored = stored.get(key) if key is not None else stored
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(stored, dict):
                return dict(stored)
        if backup.exists():
            raise CheckpointError(f"resume refused: the checkpoint recorded its catalog, but {backup} is unreadable and "
                                  "latest.json holds no readable record of it: the catalog the parameters' rows belong to "
                                  "cannot be checked; restore the file, or start a new output-dir")
        return None

    def server_state(self, server_round: int) -> dict[str, np.ndarray] | None:
        """What the strategy remembered after `server_round`, if it kept anything (None when not,
        or when the file is damaged: named in the log, and the strategy starts afresh)."""
        path = self._server_state_path(server_round)
        if not path.is_file():
            return None
        try:
            return load_npz(path)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            log.warning("fedads: %s is damaged (%s: %s); the strategy resumes without it", path, type(exc).__name__, exc)
            return None

    def _server_state_path(self, server_round: int) -> Path:
        return self.checkpoints / f"server-state-{server_round:04d}.npz"

    def _read_pointer(self, pointer: Path) -> tuple[int | None, dict[str, Any]]:
        """latest.json's round and config; if it is damaged, no round limit and config.json's."""
        try:
            latest = json.loads(pointer.read_text())
            return int(latest["round"]), dict(latest.get("config", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("fedads: %s is damaged (%s); looking for the newest good round file", pointer, exc)
        try:
            return None, dict(json.loads((self.checkpoints / "config.json").read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot resume from {self.checkpoints}: {pointer} is damaged and "
                                  f"{self.checkpoints / 'config.json'} unreadable ({exc})") from exc

    def _round_files(self, up_to: int | None) -> list[tuple[int, Path]]:
        """Round checkpoints on disk, newest first, none after `up_to` (they were never complete)."""
        found = []
        for path in self.checkpoints.glob("round-*.npz"):
            match = _ROUND_FILE.match(path.name)
            if match and (up_to is None or int(match.group(1)) <= up_to):
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def _history(self, up_to: int) -> list[dict[str, Any]]:
        path = self.root / "history.json"
        try:
            history = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot resume from {self.checkpoints}: {path}: {exc}") from exc
        return [h for h in history if h["round"] <= up_to]

    def save_status(self, status: dict[str, Any]) -> None:
        atomic_write_json(self.status_path, status)

    @property
    def status_path(self) -> Path:
        return self.root / "run_status.json"

    def export_model(self, arrays: dict[str, np.ndarray], ad_ids: tuple[str, ...], summary: dict[str, Any]) -> Path:
        model_dir = self.root / "model"
        atomic_save_npz(model_dir / "global_model.npz", ad_ids=np.asarray(ad_ids, dtype=str), **arrays)
        summary = {"exported_at": datetime.now(UTC).isoformat(timespec="seconds"), **summary}
        atomic_write_json(model_dir / "model.json", summary)
        return model_dir / "global_model.npz"


class RunStatus:
    """run_status.json, kept current: "running" from the start (with Flower's run id, so that an
    operator, or `deploy.superlink resume`, can tell which run wrote this folder), the rounds
    completed after each round, then how the run ended: "complete", "ended-short" (with the
    reason and the failed round) or "failed" (the ServerApp raised). A ServerApp killed outright
    (or its SuperLink) leaves "running"."""

    def __init__(self, checkpointer: Checkpointer, flower_run_id: int, rounds_planned: int, rounds_completed: int) -> None:
        self._checkpointer = checkpointer
        self._status: dict[str, Any] = {"status": "running", "flower_run_id": flower_run_id, "rounds_planned": rounds_planned,
                                        "rounds_completed": rounds_completed, "reason": None, "failed_round": None}
        checkpointer.save_status(self._status)

    def update(self, **changes: Any) -> None:
        self._status.update(changes)
        self._checkpointer.save_status(self._status)


def check_resume_config(stored: dict[str, Any], current: dict[str, Any], accepted: frozenset[str]) -> None:
    """A resume continues the run it resumes: any key that differs from the checkpoint's run
    config (other than extending the plan) is refused by name, unless the resume accepts it."""
    if not stored:
        raise CheckpointError("cannot resume: the checkpoint holds no run config to compare with")
    stored = {**{key: value for key, value in KEYS_ADDED_LATER.items() if key in current}, **stored}
    differing = sorted(
        key for key in set(stored) | set(current)
        if key not in RESUMABLE_KEYS and stored.get(key) != current.get(key)
    )
    refused = [key for key in differing if key not in accepted]
    if refused:
        changes = ", ".join(f"{key}: {stored.get(key)!r} -> {current.get(key)!r}" for key in refused)
        raise CheckpointError(
            f"resume refused: the run config differs from the checkpoint's in {changes}. "
            f"Resume with the checkpoint's values, start a new output-dir, or accept the change "
            f"with resume-accept-changes = \"{','.join(refused)}\"")
    for key in differing:
        log.warning("fedads: resuming with %s changed (%r -> %r), as resume-accept-changes allows",
                    key, stored.get(key), current.get(key))


def _digest(values: Iterable[object]) -> str:
    digest = hashlib.sha256()
    for value in values:
        digest.update(repr(value).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def catalog_identity(catalog: AdCatalog) -> dict[str, Any]:
    """What a checkpoint records of its catalog: the number of ads, a digest of their ids in order
    (what the parameters' rows mean) and one of their content (titles, categories, brands, tags:
    what the catalog prior and content affinity read). Only the catalog's own fields: a change in
    fedads' feature settings is not a change of catalog."""
    return {
        "ads": len(catalog),
        "ids": _digest(catalog.ad_ids),
        "content": _digest(zip(catalog.categories, catalog.brands, catalog.titles, catalog.tags)),
    }


CATALOG_CHANGE = "catalog"  # resume-accept-changes: the same ads in the same order, with changed content


def check_resume_catalog(stored: dict[str, Any] | None, current: dict[str, Any], source: str, accepted: frozenset[str]) -> None:
    """A resume continues on the catalog its checkpoint's rows belong to: one with other ads or
    another order is refused; one whose ads only have other content (new titles, tags) is
    refused unless the resume accepts `catalog`."""
    if stored is None or "ids" not in stored:
        log.warning("fedads: the checkpoint does not record its catalog (written before fedads did): "
                    "resuming on %s unchecked", source)
        return
    if stored.get("ads") != current["ads"] or stored.get("ids") != current["ids"]:
        raise CheckpointError(
            f"resume refused: the catalog ({source}, {current['ads']} ads) does not hold the ads the checkpoint's "
            f"parameters belong to, in their order ({stored.get('ads')} ads, ids digest {str(stored.get('ids'))[:12]} -> "
            f"{current['ids'][:12]}): row i of the model is the catalog's i-th ad. Resume with the run's catalog, "
            f"or start a new output-dir")
    if stored.get("content") == current["content"]:
        return
    if CATALOG_CHANGE not in accepted:
        raise CheckpointError(
            f"resume refused: the catalog ({source}) holds the same ads in the same order, but their content "
            f"(titles, categories, brands or tags) differs from the checkpoint's, and the catalog prior and "
            f"content affinity read it. Resume with the run's catalog, start a new output-dir, or accept the "
            f"change with resume-accept-changes = \"{CATALOG_CHANGE}\"")
    log.warning("fedads: resuming on %s with its ads' content changed, as resume-accept-changes allows", source)


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
