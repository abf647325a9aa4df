"""The server's round loop over a Flower strategy (server/strategies.py): ALS aggregation,
FedAvg, or FedAvg inside Flower's client-level DP wrapper.

Sampling, weighting, aggregation (and, for privacy = "client", clipping, noise and accounting)
are the strategy's, from `flwr.serverapp.strategy`. This loop adds what fedads needs around it:
- validation of every training reply before aggregation (exactly the global keys, or with
  ALS the statistics' keys, the catalog's shapes, finite values, and its weight); an invalid
  reply is logged and left out;
- error replies (a merchant refusing under its privacy budget) recorded with their reason;
- per-client metrics kept by client name, and the maximum epsilon reported by clients;
- rounds that can start anywhere (resume), with a callback after each (checkpoint, table).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from shared.app_log import log
from shared.params import check_global_arrays, digest
from shared.wire import ARRAYS, DP_EPSILON, METRICS, NUM_EXAMPLES, Arrays, client_name, from_array_record, plain_metrics

RoundCallback = Callable[[int, Arrays, dict[str, Any]], None]
# a client's weight in history.json, by the kind of reply it came with
TRAIN_USERS, TEST_USERS = "train-users", "test-users"


@dataclass
class RoundLog:
    """What one round's replies said, client by client."""

    clients: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def add(self, msg: Message, renamed_weight: str) -> None:
        metrics = plain_metrics(msg.content.metric_records[METRICS])
        if NUM_EXAMPLES in metrics:
            metrics[renamed_weight] = metrics.pop(NUM_EXAMPLES)
        self.clients.setdefault(client_name(msg), {}).update(metrics)


class RoundLoop:
    def __init__(self, strategy: Strategy, grid: Grid, num_ads: int, dim: int, timeout: float = 3600) -> None:
        self.strategy, self.grid = strategy, grid
        self.num_ads, self.dim, self.timeout = num_ads, dim, timeout
        # what a training reply must hold: the global parameters, or (ALS) the strategy's statistics
        # FedAvg weighs each reply by its NUM_EXAMPLES; ALS sums statistics and needs none
        self.needs_weights: bool = getattr(strategy, "needs_weights", True)
        self.check_reply: Callable[[Arrays], None] = getattr(
            strategy, "check_reply", lambda arrays: check_global_arrays(arrays, num_ads, dim)
        )

    def _train_replies(self, server_round: int, replies: Iterable[Message], round_log: RoundLog) -> list[Message]:
        valid = []
        for msg in replies:
            if msg.has_error():
                round_log.refused[f"node-{msg.metadata.src_node_id}"] = msg.error.reason or ""
                valid.append(msg)  # the strategy logs error replies and leaves them out
                continue
            try:
                self.check_reply(from_array_record(msg.content.array_records[ARRAYS]))
                if self.needs_weights and NUM_EXAMPLES not in msg.content.metric_records[METRICS]:
                    raise KeyError(f"its '{METRICS}' record holds no '{NUM_EXAMPLES}'")
            except (KeyError, ValueError) as exc:
                log.warning("round %d: dropping the reply of %s: %s", server_round, client_name(msg), exc)
                continue
            round_log.add(msg, TRAIN_USERS)
            valid.append(msg)
        return valid

    def evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, round_log: RoundLog) -> dict[str, float]:
        messages = self.strategy.configure_evaluate(server_round, arrays, config, self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        for msg in replies:
            if not msg.has_error():
                round_log.add(msg, TEST_USERS)
        return plain_metrics(self.strategy.aggregate_evaluate(server_round, replies))

    def run(
        self,
        arrays: ArrayRecord,
        first_round: int,
        last_round: int,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        on_round_end: RoundCallback,
        privacy_spent: Callable[[], float | None] = lambda: None,
    ) -> ArrayRecord:
        """Rounds first_round..last_round: train, aggregate, evaluate, then `on_round_end`."""
        for server_round in range(first_round, last_round + 1):
            started = time.perf_counter()
            start_digest = digest(from_array_record(arrays))
            round_log = RoundLog()
            log.info("")
            log.info("[ROUND %s/%s]", server_round, last_round)
            try:
                messages = self.strategy.configure_train(server_round, arrays, train_config, self.grid)
            except PrivacyBudgetExhausted as exhausted:  # client-level DP: the server's own budget
                log.warning("round %d: not trained: %s", server_round, exhausted)
                break
            replies = self.grid.send_and_receive(messages, timeout=self.timeout)
            aggregated, train_metrics = self.strategy.aggregate_train(
                server_round, self._train_replies(server_round, replies, round_log)
            )
            if aggregated is None:
                log.warning("round %d: no valid training reply; the global model is unchanged", server_round)
            else:
                arrays = aggregated
            evaluate_started = time.perf_counter()
            evaluate_metrics = self.evaluate(server_round, arrays, evaluate_config, round_log)
            evaluate_seconds = time.perf_counter() - evaluate_started
            record: dict[str, Any] = {
                "round": server_round,
                "start_digest": start_digest,
                "train": plain_metrics(train_metrics),
                "evaluate": evaluate_metrics,
                "clients": round_log.clients,
                "round_seconds": time.perf_counter() - started,
                "evaluate_seconds": evaluate_seconds,
            }
            spent = [m[DP_EPSILON] for m in round_log.clients.values() if DP_EPSILON in m]
            if spent:
                # an exact release reports epsilon infinite: no DP claim then, whatever the others say
                level = "user" if all(math.isfinite(e) for e in spent) else "none"
                record["privacy"] = {"level": level, "epsilon_max": max(spent), "epsilon_min": min(spent)}
            if (server_epsilon := privacy_spent()) is not None:
                record["privacy"] = {"level": "client", "epsilon_max": server_epsilon}
            if round_log.refused:
                record["refused"] = dict(round_log.refused)
                for node, reason in round_log.refused.items():
                    log.warning("round %d: %s sent no update: %s", server_round, node, reason)
            on_round_end(server_round, from_array_record(arrays), record)
        return arrays
