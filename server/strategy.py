"""FedAvg over the ad parameters, with reply validation, per-round checkpoints and resume.

Built on `flwr.serverapp.strategy.FedAvg` for sampling, weighting and aggregation; this adds:
- validation of every training reply (exactly the global keys, the catalog's shapes, finite
  values); an invalid reply is logged and left out of the average;
- per-client metrics kept by client name for the history;
- a round loop that can start at any round (resume) and calls back after each round.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared.model import check_global_arrays
from shared.records import digest, from_array_record

RoundCallback = Callable[[int, dict[str, np.ndarray], dict[str, Any]], None]


def _client_name(msg: Message) -> str:
    info = msg.content.config_records.get("client")
    return str(info["name"]) if info and "name" in info else f"node-{msg.metadata.src_node_id}"


def _plain(metrics: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if not isinstance(v, list)}


class FedAdsAvg(FedAvg):
    def __init__(self, num_ads: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_ads, self.dim = num_ads, dim
        self.client_metrics: dict[str, dict[str, float]] = {}
        self.refusals: dict[str, str] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = []
        for msg in replies:
            if msg.has_error():
                self.refusals[f"node-{msg.metadata.src_node_id}"] = msg.error.reason
                valid.append(msg)  # FedAvg logs errors and leaves them out
                continue
            try:
                check_global_arrays(from_array_record(msg.content[self.arrayrecord_key]), self.num_ads, self.dim)
            except (KeyError, ValueError) as exc:
                log(WARNING, "round %d: dropping the reply of %s: %s", server_round, _client_name(msg), exc)
                continue
            metrics = _plain(msg.content["metrics"])
            metrics["train-users"] = metrics.pop(self.weighted_by_key, 0.0)
            self.client_metrics.setdefault(_client_name(msg), {}).update(metrics)
            valid.append(msg)
        return super().aggregate_train(server_round, valid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                metrics = _plain(msg.content["metrics"])
                metrics["test-users"] = metrics.pop(self.weighted_by_key, 0.0)
                self.client_metrics.setdefault(_client_name(msg), {}).update(metrics)
        return super().aggregate_evaluate(server_round, replies)

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> dict[str, float]:
        replies = grid.send_and_receive(self.configure_evaluate(server_round, arrays, config, grid), timeout=timeout)
        return _plain(self.aggregate_evaluate(server_round, replies))

    def run_rounds(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        first_round: int,
        last_round: int,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
        on_round_end: RoundCallback,
        timeout: float = 3600,
    ) -> ArrayRecord:
        """Rounds first_round..last_round: train, aggregate, evaluate, then `on_round_end`."""
        for server_round in range(first_round, last_round + 1):
            started = time.perf_counter()
            start_digest = digest(from_array_record(arrays))
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, last_round)
            self.client_metrics, self.refusals = {}, {}
            replies = grid.send_and_receive(self.configure_train(server_round, arrays, train_config, grid), timeout=timeout)
            aggregated, train_metrics = self.aggregate_train(server_round, replies)
            if aggregated is None:
                log(WARNING, "round %d: no valid training reply; the global model is unchanged", server_round)
            else:
                arrays = aggregated
            evaluate_metrics = self.evaluate_round(grid, server_round, arrays, evaluate_config, timeout)
            record = {
                "round": server_round,
                "start_digest": start_digest,
                "train": _plain(train_metrics),
                "evaluate": evaluate_metrics,
                "clients": self.client_metrics,
                "round_seconds": time.perf_counter() - started,
            }
            spent = [m["dp-epsilon"] for m in self.client_metrics.values() if "dp-epsilon" in m]
            if spent:
                record["privacy"] = {"epsilon_max": max(spent), "epsilon_min": min(spent)}
            if self.refusals:
                record["refused"] = dict(self.refusals)
            on_round_end(server_round, from_array_record(arrays), record)
        return arrays
