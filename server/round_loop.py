"""The server's round loop over a Flower strategy (server/strategies.py): ALS aggregation,
FedAvg, or FedAvg inside Flower's client-level DP wrapper.

Sampling, weighting, aggregation (and, for privacy = "client", clipping, noise and accounting)
are the strategy's, from `flwr.serverapp.strategy`. This loop adds what fedads needs around it:
- screening of every reply: it must answer this round (stale replies are dropped), once per
  node (duplicates are dropped), and a training reply must hold exactly the global keys, or
  with ALS the statistics' keys, the catalog's shapes, finite values within the protocol's
  bounds, and its weight; what fails is logged and left out, with its reason;
- a quorum: a round with fewer valid training replies than `min-replies` is asked again
  (`round-retries`), then the run stops short, saying why (`RunOutcome`);
- per-round records of who was asked, who replied and who failed or refused, and why, by
  merchant name and in one line;
- per-client metrics kept by client name, and the maximum epsilon reported by clients;
- rounds that can start anywhere (resume), with a callback after each (checkpoint, table);
- with carry-evaluation, a round's model evaluated by the next round's training messages (one
  exchange per round): its record is checkpointed marked EVALUATION_PENDING, filled when those
  replies come (`on_evaluated`), and the last model is evaluated in an exchange of its own.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies, PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from server.secure_round import SecureTraining
from shared.app_log import log
from shared.envelope import opened, sealed
from shared.neumf_arrays import Shapes
from shared.params import PUBLIC_CONSTANT_KEYS, check_global_arrays, digest, with_public_constants
from shared.wire import (
    ARRAYS,
    CLIENT,
    DP_EPSILON,
    EVALUATE_FIRST,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY_REFUSED,
    STATISTICS,
    Arrays,
    answered_round,
    array_names,
    client_name,
    error_sender,
    from_array_record,
    packed_keys,
    plain_metrics,
    split_evaluation,
    to_array_record,
)

RoundCallback = Callable[[int, Arrays, dict[str, Any]], None]
# in a round record: its model's evaluation comes with the next round's training replies
EVALUATION_PENDING = "evaluation_pending"
EVALUATED_WITH = "evaluated_with"  # in a round record: the round whose training messages carried its evaluation
# a client's weight in history.json, by the kind of reply it came with
TRAIN_USERS, TEST_USERS = "train-users", "test-users"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MAX_REASON_CHARS = 300


def awaiting_evaluation(history: list[dict[str, Any]], carry_evaluation: bool) -> dict[str, Any] | None:
    """The last record of a run's history if its model's evaluation is still to be asked for:
    pending, or (carrying) filled by the next round's messages in a run that did not get past that
    round (short of its quorum, or stopped before its checkpoint). That round's messages then ask
    again, the same question, and the merchants answer with the releases they recorded."""
    if not history:
        return None
    last = history[-1]
    if EVALUATION_PENDING in last or (carry_evaluation and last.get(EVALUATED_WITH) == last["round"] + 1):
        return last
    return None


def _user_privacy(clients: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """A round's user-level privacy from its merchants' reports: the epsilons spent after it."""
    spent = [m[DP_EPSILON] for m in clients.values() if DP_EPSILON in m]
    if not spent:
        return None
    # an exact release reports epsilon infinite: no DP claim then, whatever the others say
    level = "user" if all(math.isfinite(e) for e in spent) else "none"
    return {"level": level, "epsilon_max": max(spent), "epsilon_min": min(spent)}


def one_line(reason: str | None) -> str:
    """A failure's reason as one readable line: ANSI colours stripped, a traceback reduced to
    its last line (the exception), and bounded in length."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", reason or "").splitlines() if line.strip()]
    text = lines[-1] if lines else "no reason given"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


@dataclass
class RoundLog:
    """What one round's replies said, merchant by merchant."""

    clients: dict[str, dict[str, float]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # under the merchant's privacy policy or budget
    failed: dict[str, str] = field(default_factory=dict)  # no reply, an error, or a reply dropped by the screen
    secure: dict[str, Any] | None = None  # secure aggregation: the sum's guarantee (server/secure_round.py)

    def add(self, msg: Message, renamed_weight: str) -> None:
        metrics = plain_metrics(msg.content.metric_records[METRICS])
        if NUM_EXAMPLES in metrics:
            metrics[renamed_weight] = metrics.pop(NUM_EXAMPLES)
        self.clients.setdefault(client_name(msg), {}).update(metrics)

    def participants(self) -> dict[str, Any]:
        return {"asked": sorted(self.asked), "replied": sorted(self.replied), "refused": dict(self.refused), "failed": dict(self.failed)}


class RunEndedShort(RuntimeError):
    """The run stopped before its last planned round (the ServerApp fails, so the run's exit is non-zero)."""


@dataclass
class RunOutcome:
    """How the loop ended: the latest global parameters, the last round completed, and, when
    it stopped before its last round, why and the record of the round that failed."""

    arrays: ArrayRecord
    last_round: int
    short_reason: str | None = None
    failed_round: dict[str, Any] | None = None


def _adopt(aggregated: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """The round's new global parameters: the aggregate, with the public constants as sent."""
    if array_names(sent).isdisjoint(PUBLIC_CONSTANT_KEYS):
        return aggregated
    return to_array_record(with_public_constants(from_array_record(aggregated), from_array_record(sent)))


def _check_parameters(arrays: Arrays, shapes: Shapes) -> None:
    """A FedAvg reply: the global parameters' keys and shapes, finite, and float32, as every
    merchant sends them (shared/wire.py packs a record by dtype, and Flower's FedAvg ends the
    ServerApp when the replies' keys differ: one float64 reply would end the run)."""
    check_global_arrays(arrays, shapes)
    if wrong := sorted(key for key, value in arrays.items() if value.dtype != np.float32):
        raise ValueError(f"global parameters travel as float32, {wrong[0]} is {arrays[wrong[0]].dtype}")


class RoundLoop:
    def __init__(
        self, strategy: Strategy, grid: Grid, shapes: Shapes,
        timeout: float = 600.0, min_replies: int = 1, retries: int = 0, secure: SecureTraining | None = None,
        carry_evaluation: bool = False,
    ) -> None:
        self.strategy, self.grid, self.secure = strategy, grid, secure
        self.carry_evaluation = carry_evaluation and secure is None
        self.timeout = timeout
        self.min_replies, self.retries = min_replies, retries
        # merchant names by node id, learned from replies: a node that fails is named if it ever answered
        self.names: dict[int, str] = {}
        # what a training reply must hold: the global parameters, or (ALS) the strategy's statistics
        # FedAvg weighs each reply by its NUM_EXAMPLES; ALS sums statistics and needs none
        self.needs_weights: bool = getattr(strategy, "needs_weights", True)
        # (arrays, metrics) -> None, or ValueError naming what the protocol does not allow
        self.check_reply: Callable[[Arrays, dict[str, float]], None] = getattr(
            strategy, "check_reply", lambda arrays, metrics: _check_parameters(arrays, shapes)
        )

    def _name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def _learn_name(self, msg: Message) -> None:
        node = msg.metadata.src_node_id
        if not msg.has_error() and CLIENT in msg.content.config_records:
            self.names.setdefault(node, client_name(msg))
        elif msg.has_error() and (sender := error_sender(msg)):
            self.names.setdefault(node, sender)

    def _exchange(self, messages: Iterable[Message], round_log: RoundLog) -> list[Message]:
        """Send `messages` sealed (shared/envelope.py) and return the replies opened; a reply
        whose envelope cannot be opened is recorded as failed and left out."""
        messages = list(messages)
        replies: list[Message] = []
        unopened: dict[int, str] = {}
        for reply in self.grid.send_and_receive([sealed(msg) for msg in messages], timeout=self.timeout):
            try:
                replies.append(opened(reply))
            except ValueError as exc:
                unopened[reply.metadata.src_node_id] = f"reply dropped: {one_line(str(exc))}"
        for msg in replies:
            self._learn_name(msg)
        round_log.asked = [self._name(m.metadata.dst_node_id) for m in messages]
        answered = {m.metadata.src_node_id for m in replies} | unopened.keys()
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                round_log.failed[self._name(msg.metadata.dst_node_id)] = f"no reply within {self.timeout:g} s"
        for node, reason in unopened.items():
            log.warning("%s: %s", self._name(node), reason)
            round_log.failed[self._name(node)] = reason
        return replies

    def _screen(self, server_round: int, replies: Iterable[Message], round_log: RoundLog, check_arrays: bool) -> list[Message]:
        """The replies the strategy may use: error replies (recorded; the strategy leaves them
        out) and well-formed replies to this round, one per node."""
        kept: list[Message] = []
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            self._learn_name(msg)
            name = self._name(node)
            if node in seen:
                log.warning("round %d: dropping a duplicate reply of %s", server_round, name)
                continue
            seen.add(node)
            if msg.has_error():
                target = round_log.refused if msg.error.code == PRIVACY_REFUSED else round_log.failed
                target[name] = one_line(msg.error.reason)
                kept.append(msg)
                continue
            try:
                if (answers := answered_round(msg)) != server_round:
                    raise ValueError(f"a stale reply: it answers round {answers}, not {server_round}")
                if check_arrays:
                    record = msg.content.array_records[ARRAYS]
                    arrays = from_array_record(record)
                    # packed as shared/wire.py packs them, no more and no less: Flower's FedAvg
                    # ends the ServerApp on replies whose keys differ (InconsistentMessageReplies)
                    if list(record.keys()) != packed_keys(arrays):
                        raise ValueError("its arrays are not packed as the wire packs them")
                    self.check_reply(arrays, plain_metrics(msg.content.metric_records.get(METRICS)))
                    if self.needs_weights and NUM_EXAMPLES not in msg.content.metric_records[METRICS]:
                        raise KeyError(f"its '{METRICS}' record holds no '{NUM_EXAMPLES}'")
            except (KeyError, ValueError) as exc:
                reason = one_line(str(exc).strip("'\""))
                log.warning("round %d: dropping the reply of %s: %s", server_round, name, reason)
                round_log.failed[name] = f"reply dropped: {reason}"
                continue
            round_log.replied.append(name)
            kept.append(msg)
        return kept

    def _train_replies(self, server_round: int, replies: Iterable[Message], round_log: RoundLog) -> list[Message]:
        kept = self._screen(server_round, replies, round_log, check_arrays=True)
        for msg in kept:
            if not msg.has_error():
                round_log.add(msg, TRAIN_USERS)
        return kept

    def evaluate(self, record: dict[str, Any], arrays: ArrayRecord, config: ConfigRecord) -> None:
        """Evaluate `arrays`, the model of round record["round"], in an exchange of its own, and
        fill `record` with it."""
        started = time.perf_counter()
        messages = self.strategy.configure_evaluate(record["round"], arrays, config, self.grid)
        evaluate_log = RoundLog()
        self._fill_evaluation(record, self._exchange(messages, evaluate_log), evaluate_log, record["round"])
        record["evaluate_seconds"] = time.perf_counter() - started

    def _fill_evaluation(self, record: dict[str, Any], replies: list[Message], evaluate_log: RoundLog, answering: int) -> None:
        """`record`'s evaluation from evaluate replies (to round `answering`'s messages): the
        aggregate, each merchant's metrics, and who failed or refused it."""
        kept = self._screen(answering, replies, evaluate_log, check_arrays=False)
        failed = record["participants"]["failed"]
        for name in [name for name in failed if name.endswith(" (evaluate)")]:  # asked again (a resume): the new answers
            del failed[name]
        evaluated = RoundLog()
        for msg in kept:
            if not msg.has_error():
                evaluated.add(msg, TEST_USERS)
        for name, metrics in evaluated.clients.items():
            record["clients"].setdefault(name, {}).update(metrics)
        for name, reason in {**evaluate_log.refused, **evaluate_log.failed}.items():
            failed.setdefault(f"{name} (evaluate)", reason)
        record["evaluate"] = plain_metrics(self.strategy.aggregate_evaluate(record["round"], kept))
        record.pop(EVALUATION_PENDING, None)
        # a carried evaluation's release came after the round's record was made (client-level DP:
        # the server's own account, unchanged)
        if record.get("privacy", {}).get("level") in ("user", "none"):
            record["privacy"] = _user_privacy(record["clients"])

    def _fill_carried_evaluation(self, record: dict[str, Any], carried: list[Message], round_log: RoundLog, server_round: int) -> None:
        """`record` (the previous round's) filled with the evaluations round `server_round`'s
        training replies carried; a merchant asked whose reply carried none is named, with its
        training reply's refusal or failure where it had one."""
        carried_log = RoundLog()
        answered = {client_name(msg) for msg in carried}
        for name in round_log.asked:
            if name not in answered:
                carried_log.failed[name] = round_log.refused.get(name) or round_log.failed.get(name) or "no evaluation in its reply"
        self._fill_evaluation(record, carried, carried_log, server_round)
        record[EVALUATED_WITH] = server_round

    def _train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> tuple[list[Message], RoundLog, list[Message]]:
        """One round's training exchange, asked again while it is short of its quorum and
        something other than a refusal (which would only be repeated) failed. Also returns the
        evaluations the replies carried (EVALUATE_FIRST), each merchant's latest."""
        carried: dict[int, Message] = {}
        for attempt in range(self.retries + 1):
            round_log = RoundLog()
            messages = self.strategy.configure_train(server_round, arrays, config, self.grid)
            trained: list[Message] = []
            for reply in self._exchange(messages, round_log):
                training, evaluation = split_evaluation(reply)
                trained.append(training)
                if evaluation is not None:
                    carried[evaluation.metadata.src_node_id] = evaluation
            kept = self._train_replies(server_round, trained, round_log)
            valid = sum(not msg.has_error() for msg in kept)
            if valid >= self.min_replies or not round_log.failed or attempt == self.retries:
                return kept, round_log, list(carried.values())
            log.warning("round %d: %d valid replies of %d asked, below the quorum of %d: asking again (%d of %d)",
                        server_round, valid, len(round_log.asked), self.min_replies, attempt + 1, self.retries)
        raise AssertionError("unreachable")

    def _secure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> tuple[list[Message], RoundLog, Arrays | None]:
        """One round's training through secure aggregation, asked again (a new protocol
        instance, new releases) while it is short of its quorum and something other than a
        refusal failed. Returns the contributors' replies, the round's record and the sum."""
        assert self.secure is not None
        for attempt in range(self.retries + 1):
            round_log = RoundLog()
            sampled = [msg.metadata.dst_node_id for msg in self.strategy.configure_train(server_round, arrays, config, self.grid)]
            # what the round asks for and the model it trains from: set by configure_train (ALSAggregation)
            release = getattr(self.strategy, "release", STATISTICS)
            trains_from = getattr(self.strategy, "sent", None) or from_array_record(arrays)
            outcome = self.secure.exchange(self.grid, server_round, trains_from, sampled, release)
            round_log.asked = [self._name(node) for node in sampled]
            for stage, msg in outcome.errors:
                self._learn_name(msg)
                target = round_log.refused if msg.error.code == PRIVACY_REFUSED else round_log.failed
                target[self._name(msg.metadata.src_node_id)] = f"{stage}: {one_line(msg.error.reason)}"
            kept = self._screen(server_round, outcome.contributions, round_log, check_arrays=False)
            for msg in kept:
                round_log.add(msg, TRAIN_USERS)
            accounted = {msg.metadata.src_node_id for _, msg in outcome.errors} | {msg.metadata.src_node_id for msg in kept}
            for node in sampled:
                if node not in accounted:
                    round_log.failed[self._name(node)] = f"left the secure round (no reply within {self.timeout:g} s at one of its stages)"
            if outcome.total is None:
                round_log.failed["secure sum"] = "not unmasked: fewer live merchants than its threshold"
            total = outcome.total
            round_log.secure = self.secure.guarantee(outcome)
            if total is not None and len(kept) != len(outcome.contributions):
                total = None  # a contributor's reply failed the screen: the sum cannot be split
            if total is not None and (problems := self.secure.check_sum(total, round_log.secure)):
                reason = one_line("; ".join(problems))
                log.warning("round %d: dropping the secure sum: %s", server_round, reason)
                round_log.failed["secure sum"] = f"dropped: {reason}"
                total = None
            valid = len(kept) if total is not None else 0
            if valid >= self.min_replies or not round_log.failed or attempt == self.retries:
                return kept if total is not None else [], round_log, total
            log.warning("round %d: %d merchants in the secure sum of %d asked, below the quorum of %d: asking again (%d of %d)",
                        server_round, valid, len(sampled), self.min_replies, attempt + 1, self.retries)
        raise AssertionError("unreachable")

    def run(
        self,
        arrays: ArrayRecord,
        first_round: int,
        last_round: int,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        on_round_end: RoundCallback,
        privacy_spent: Callable[[], float | None] = lambda: None,
        pending: dict[str, Any] | None = None,
        on_evaluated: Callable[[dict[str, Any]], None] = lambda record: None,
    ) -> RunOutcome:
        """Rounds first_round..last_round: train, aggregate, evaluate, then `on_round_end`; it
        stops short at a round without its quorum (or past the server's DP budget). `pending`:
        the record of round first_round - 1 if its model (`arrays`) awaits its evaluation; each
        record filled after its `on_round_end` goes to `on_evaluated`."""
        if not self.carry_evaluation:  # e.g. a resume with carry-evaluation now off
            self._evaluate_pending(pending, arrays, evaluate_config, on_evaluated)
            pending = None
        for server_round in range(first_round, last_round + 1):
            started = time.perf_counter()
            start_digest = digest(from_array_record(arrays))
            log.info("")
            log.info("[ROUND %s/%s]", server_round, last_round)
            secure_total: Arrays | None = None
            carried: list[Message] = []
            config = train_config if pending is None else ConfigRecord({**dict(train_config), EVALUATE_FIRST: True})
            try:
                if self.secure is None:
                    kept, round_log, carried = self._train(server_round, arrays, config)
                else:
                    kept, round_log, secure_total = self._secure_train(server_round, arrays, config)
            except PrivacyBudgetExhausted as exhausted:  # client-level DP: the server's own budget
                log.warning("round %d: not trained: %s", server_round, exhausted)
                self._evaluate_pending(pending, arrays, evaluate_config, on_evaluated)
                return RunOutcome(arrays, server_round - 1, f"round {server_round}: the server's DP budget is spent: {exhausted}")
            if pending is not None:
                self._fill_carried_evaluation(pending, carried, round_log, server_round)
                on_evaluated(pending)
                pending = None
            valid = sum(not msg.has_error() for msg in kept)
            for node, reason in {**round_log.refused, **round_log.failed}.items():
                log.warning("round %d: %s sent no update: %s", server_round, node, reason)
            if valid < self.min_replies:
                reason = (f"round {server_round}: {valid} valid training replies of {len(round_log.asked)} asked, "
                          f"below the quorum of {self.min_replies} (min-replies)")
                log.error("fedads: %s; the run stops short of its plan", reason)
                return RunOutcome(arrays, server_round - 1, reason, {"round": server_round, "participants": round_log.participants()})
            if secure_total is None:
                try:
                    aggregated, train_metrics = self.strategy.aggregate_train(server_round, kept)
                except InconsistentMessageReplies as inconsistent:  # e.g. metric records with other keys: no reply may end the run
                    log.warning("round %d: the strategy refused the replies: %s", server_round, inconsistent)
                    aggregated, train_metrics = None, None
            else:
                metrics = [plain_metrics(msg.content.metric_records.get(METRICS)) for msg in kept]
                aggregated, train_metrics = self.strategy.solve(secure_total, metrics)  # type: ignore[attr-defined]
            if aggregated is None:
                log.warning("round %d: the strategy aggregated nothing; the global model is unchanged", server_round)
            else:
                arrays = _adopt(aggregated, arrays)
            record: dict[str, Any] = {
                "round": server_round,
                "start_digest": start_digest,
                "train": plain_metrics(train_metrics),
                "evaluate": {},
                "clients": round_log.clients,
                "participants": round_log.participants(),
                EVALUATION_PENDING: True,
            }
            if not self.carry_evaluation:
                self.evaluate(record, arrays, evaluate_config)
            record["round_seconds"] = time.perf_counter() - started
            if (privacy := _user_privacy(round_log.clients)) is not None:
                record["privacy"] = privacy
            if (server_epsilon := privacy_spent()) is not None:
                record["privacy"] = {"level": "client", "epsilon_max": server_epsilon}
            if round_log.refused:
                record["refused"] = dict(round_log.refused)
            if round_log.secure is not None:
                record["secure"] = round_log.secure
            on_round_end(server_round, from_array_record(arrays), record)
            pending = record if EVALUATION_PENDING in record else None
        self._evaluate_pending(pending, arrays, evaluate_config, on_evaluated)
        return RunOutcome(arrays, last_round)

    def _evaluate_pending(self, pending: dict[str, Any] | None, arrays: ArrayRecord, config: ConfigRecord,
                          on_evaluated: Callable[[dict[str, Any]], None]) -> None:
        """The run ends with a model whose evaluation no next round will carry: its own exchange."""
        if pending is not None:
            self.evaluate(pending, arrays, config)
            on_evaluated(pending)
