"""The merchant's persistent privacy accountant: one per client, on the merchant's disk.

`privacy_ledger.json` in the node's state directory holds the Opacus RDP accountant's history
(every Gaussian release this client ever made: DP-SGD steps and noised metrics), the target
budget, the calibrated noise multiplier, the rounds trained, and a count of releases made
without DP. It is written atomically and carries a checksum of its content.

Fail closed: a ledger that is corrupt, or missing while the state directory shows the client
has trained before, makes the client refuse to train; it is never silently reset. A release
whose composition would exceed the target epsilon is refused before any work is done.

One message at a time per state directory: Flower's SuperNode launches a ClientApp process per
message without waiting for the previous one, so two messages of one node can run at once. Each
would read the ledger, pass the budget check and release, and the later write would drop the
earlier release from the record. `PrivacyLedger.lock` (an exclusive `flock` on
`privacy_ledger.lock`, there only while held) is held across read -> check -> release -> record
(client/handlers.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.accounting import Release, epsilon_of
from shared.storage import atomic_write_json

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"
LEDGER_VERSION = 1
# files whose presence shows this state directory has taken part in training
TRAINING_TRACES = ("user_factors.npz", "global_model.npz")


class PrivacyRefusal(RuntimeError):
    """The client will not release anything more; the message says why."""


@dataclass
class LedgerState:
    accountant: str = "rdp"
    history: list[Release] = field(default_factory=list)
    delta: float | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    mechanism: str | None = None  # what noise_multiplier was calibrated for: "dp-sgd" | "private-als"
    rounds_trained: int = 0
    non_private_releases: int = 0
    exact_metric_releases: int = 0


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class PrivacyLedger:
    def __init__(self, directory: str | Path, state: LedgerState) -> None:
        self.directory = Path(directory)
        self.state = state

    @property
    def path(self) -> Path:
        return self.directory / LEDGER_FILE

    # ---------------------------------------------------------------- locking
    @staticmethod
    @contextmanager
    def lock(directory: str | Path) -> Iterator[None]:
        """Exclusive use of a state directory's ledger across processes (and threads): blocks
        until no other holder is left. Hold it from `open` to the last `record` of a message.
        The kernel drops the lock when the holder's process dies, so a crash never leaves it held."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        while True:
            # flock, not lockf: flock locks belong to the open file, so two opens in one process exclude each other too
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            # the holder before us removed the file we waited on: a newcomer may hold a new one
            os.close(fd)
        try:
            yield
        finally:
            # removed while still held, so a refused message leaves nothing in the state directory
            path.unlink(missing_ok=True)
            os.close(fd)  # closing the file releases the lock

    # ---------------------------------------------------------------- loading
    @classmethod
    def open(cls, directory: str | Path) -> PrivacyLedger:
        """The ledger of a state directory; a fresh one where nothing was trained. Refuses
        (fail closed) when it is damaged, or missing where the directory has trained before:
        never silently reset, whatever a run asks for."""
        return cls._open(Path(directory))

    @classmethod
    def _open(cls, directory: Path) -> PrivacyLedger:
        path = directory / LEDGER_FILE
        if not path.is_file():
            traces = [name for name in TRAINING_TRACES if (directory / name).exists()]
            if traces:
                raise PrivacyRefusal(
                    f"{path} is missing but {directory} holds {', '.join(traces)} from earlier training: "
                    "the privacy spent so far is unknown, refusing to train (fail closed). "
                    "Restore the ledger, or start this merchant with a new state directory and a new budget."
                )
            return cls(directory, LedgerState())
        try:
            document = json.loads(path.read_text())
            payload = document["ledger"]
            if document.get("version") != LEDGER_VERSION:
                raise ValueError(f"unknown ledger version {document.get('version')!r}")
            if document.get("checksum") != _checksum(payload):
                raise ValueError("checksum mismatch: the file was altered or damaged")
            state = LedgerState(**payload)
            state.history = [(float(s), float(q), int(n)) for s, q, n in state.history]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyRefusal(f"{path} is unreadable ({exc}): refusing to train (fail closed)") from exc
        return cls(directory, state)

    def save(self) -> None:
        payload = asdict(self.state)
        payload["history"] = [list(h) for h in self.state.history]
        atomic_write_json(self.path, {"version": LEDGER_VERSION, "checksum": _checksum(payload), "ledger": payload})

    # ---------------------------------------------------------------- budget
    def bind(self, target_epsilon: float, delta: float) -> float:
        """Fix the budget on first use; a later run may not quietly change it. Returns the
        budget's epsilon (a later run may lower it, never raise it)."""
        s = self.state
        if s.target_epsilon is None:
            s.target_epsilon, s.delta = target_epsilon, delta
            return target_epsilon
        if not math.isclose(s.delta or 0.0, delta, rel_tol=1e-9):
            raise PrivacyRefusal(f"{self.path}: delta is bound to {s.delta}, this run asks for {delta}")
        if target_epsilon > s.target_epsilon:
            raise PrivacyRefusal(
                f"{self.path}: the budget is epsilon {s.target_epsilon}; this run asks for {target_epsilon}. "
                "A merchant's budget is not raised by a config change."
            )
        s.target_epsilon = min(s.target_epsilon, target_epsilon)
        return s.target_epsilon

    def epsilon(self, extra: list[Release] | None = None) -> float:
        """The epsilon of everything this state directory released: infinite once anything left
        it without DP (exact releases are outside any guarantee), wherever it is reported."""
        if self.state.non_private_releases or self.state.exact_metric_releases:
            return math.inf
        if self.state.delta is None:
            return 0.0
        return epsilon_of([*self.state.history, *(extra or [])], self.state.delta)

    def require(self, planned: list[Release], what: str) -> float:
        """Epsilon after `planned`; refuses when that passes the target."""
        without_dp = self.state.non_private_releases + self.state.exact_metric_releases
        if without_dp:
            raise PrivacyRefusal(
                f"{self.path}: this client has made {without_dp} release(s) without DP; "
                "no differential-privacy guarantee can be given for it any more"
            )
        assert self.state.target_epsilon is not None, "bind() the budget first"
        after = self.epsilon(planned)
        if after > self.state.target_epsilon * (1 + 1e-9):
            raise PrivacyRefusal(
                f"privacy budget exhausted: {what} would bring epsilon from {self.epsilon():.4f} to {after:.4f}, "
                f"past the budget of {self.state.target_epsilon} (delta {self.state.delta}); "
                f"rounds trained so far: {self.state.rounds_trained}"
            )
        return after

    def record(self, releases: list[Release], trained_round: bool = False) -> None:
        self.state.history.extend((float(s), float(q), int(n)) for s, q, n in releases)
        self.state.rounds_trained += int(trained_round)
        self.save()

    def record_non_private(self, trained_round: bool) -> None:
        self.state.non_private_releases += 1
        self.state.rounds_trained += int(trained_round)
        self.save()

    # ---------------------------------------------------------------- report
    def summary(self) -> dict[str, Any]:
        """What was spent and what is left, for a person (`fedads-merchant budget`)."""
        s = self.state
        spent = self.epsilon()
        guarantee = math.isfinite(spent)
        return {
            "dp_guarantee": guarantee,
            # JSON has no infinity: without a guarantee the spent epsilon is reported as null
            "epsilon_spent": spent if math.isfinite(spent) else None,
            "epsilon_remaining": None if s.target_epsilon is None or not guarantee else max(s.target_epsilon - spent, 0.0),
            "target_epsilon": s.target_epsilon,
            "delta": s.delta,
            "rounds_trained": s.rounds_trained,
            "noise_multiplier": s.noise_multiplier,
            # every DP-SGD step and every noised metric release is one Gaussian release; the
            # accountant merges runs of equal (noise, sample rate) into one history entry
            "releases": int(sum(n for _, _, n in s.history)),
            "accountant_entries": len(s.history),
            "non_private_releases": s.non_private_releases,
            "exact_metric_releases": s.exact_metric_releases,
            "accountant": s.accountant,
        }
