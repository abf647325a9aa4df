"""The merchant's persistent privacy accountant: one per client, on the merchant's disk.

`privacy_ledger.json` in the node's state directory holds the Opacus RDP accountant's history
(every Gaussian release this client ever made: DP-SGD steps and noised metrics), the target
budget, the calibrated noise multiplier, the rounds trained, and a count of releases made
without DP. It is written atomically and carries a checksum of its content.

Fail closed: a ledger that is corrupt, or missing while the state directory shows the client
has trained before, makes the client refuse to train; it is never silently reset. A release
whose composition would exceed the target epsilon is refused before any work is done.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.accounting import Release, epsilon_of
from shared.storage import atomic_write_json

LEDGER_FILE = "privacy_ledger.json"
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

    # ---------------------------------------------------------------- loading
    @classmethod
    def open(cls, directory: str | Path, fail_closed: bool = True) -> PrivacyLedger:
        """The ledger of a state directory. With `fail_closed=False` (non-private training,
        which promises nothing) a missing or unreadable ledger starts afresh instead; the
        non-private releases it then records rule out any later DP claim for the directory."""
        try:
            return cls._open(Path(directory))
        except PrivacyRefusal:
            if fail_closed:
                raise
            return cls(Path(directory), LedgerState())

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
        if self.state.non_private_releases:
            return math.inf
        if self.state.delta is None:
            return 0.0
        return epsilon_of([*self.state.history, *(extra or [])], self.state.delta)

    def require(self, planned: list[Release], what: str) -> float:
        """Epsilon after `planned`; refuses when that passes the target."""
        if self.state.non_private_releases:
            raise PrivacyRefusal(
                f"{self.path}: this client has made {self.state.non_private_releases} release(s) without DP; "
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

    def record_exact_metrics(self) -> None:
        self.state.exact_metric_releases += 1
        self.save()

    # ---------------------------------------------------------------- report
    def summary(self) -> dict[str, Any]:
        """What was spent and what is left, for a person (`fedads-merchant budget`)."""
        s = self.state
        spent = self.epsilon()
        guarantee = s.non_private_releases == 0
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
