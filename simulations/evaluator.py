"""The simulation's own evaluator: exact metrics of a run's global models, with all of the data.

A simulation's data scientist owns every shard, so the harness can evaluate each round's global
model exactly without asking the merchants, which under user-level DP release their metrics
noised or not at all. This is a simulation path, outside any privacy guarantee, and never a
deployed one: it reads the shards the harness cut, not anything a merchant sent. Each
merchant's users are refitted to each round's checkpoint with the run's user step, as the
merchant's own evaluation does (with the same random streams, and for solvers that warm-start
users, from the factors its training message of the round left), on the same split and
evaluation negatives: without DP, it gives the merchants' own metrics (tests/test_evaluator.py).

    exact_history.json   beside the run's history.json: per round, the aggregate (weighted by
                         test users, with each merchant's popularity ranking beside it) and every merchant's metrics
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from client.solvers.registry import solver_for
from server.checkpoint import Checkpointer
from server.round_loop import TEST_USERS
from shared.config import RunConfig
from shared.content_affinity import ContentBlend
from shared.data.sources import load_dataset
from shared.metrics import METRIC_NAMES, NUM_TEST_USERS
from shared.storage import atomic_write_json, load_npz
from shared.wire import MERCHANT_POP_PREFIX
from simulations.baselines import shard_data

EXACT_HISTORY = "exact_history.json"


def _weighted(per_merchant: list[dict[str, float]]) -> dict[str, float]:
    total = sum(m[NUM_TEST_USERS] for m in per_merchant) or 1.0
    return {name: sum(m[name] * m[NUM_TEST_USERS] for m in per_merchant) / total for name in METRIC_NAMES}


def exact_history(cfg: RunConfig, clients: int, output_dir: Path) -> list[dict[str, Any]]:
    """Every checkpointed round of the run in `output_dir`, evaluated exactly."""
    checkpoints = Checkpointer(output_dir).checkpoints
    rounds = sorted(int(path.stem.removeprefix("round-")) for path in checkpoints.glob("round-*.npz"))
    shards = shard_data(cfg, load_dataset(cfg), clients)
    solvers = [solver_for(cfg, data) for _, data in shards]
    blend = ContentBlend.from_config(cfg)  # each merchant ranks as its evaluate handler does
    merchant_popularity = _weighted([data.evaluate_popularity() for _, data in shards])
    stored: list[np.ndarray | None] = [None] * len(shards)  # each merchant's user factors on its disk
    received: dict[str, np.ndarray] | None = None  # the model the merchants trained from this round
    history = []
    for server_round in rounds:
        arrays = load_npz(checkpoints / f"round-{server_round:04d}.npz")
        per_merchant: dict[str, dict[str, float]] = {}
        for index, ((name, data), solver) in enumerate(zip(shards, solvers)):
            if solver.warm_starts_users and received is not None:
                # the merchant's training message of this round refitted its users to the model it received
                stored[index] = solver.fit_users(received, _rng(cfg, server_round, 0, name), stored[index])
            factors = solver.fit_users(arrays, _rng(cfg, server_round, 1, name), stored[index] if solver.warm_starts_users else None)
            stored[index] = factors
            per_merchant[name] = data.evaluate(arrays, factors, blend)
        aggregate = {**_weighted(list(per_merchant.values())), **{MERCHANT_POP_PREFIX + k: v for k, v in merchant_popularity.items()}}
        clients_metrics = {name: {**{k: m[k] for k in METRIC_NAMES}, TEST_USERS: m[NUM_TEST_USERS]} for name, m in per_merchant.items()}
        history.append({"round": server_round, "evaluate": aggregate, "clients": clients_metrics})
        received = arrays
    return history


def _rng(cfg: RunConfig, server_round: int, purpose: int, name: str) -> np.random.Generator:
    """The merchant's own stream of a round's message (client/handlers.py): 0 training, 1 evaluation."""
    return np.random.default_rng([cfg.seed, server_round, purpose, zlib.crc32(name.encode())])


def write_exact_history(cfg: RunConfig, clients: int, output_dir: Path) -> list[dict[str, Any]]:
    history = exact_history(cfg, clients, output_dir)
    atomic_write_json(output_dir / EXACT_HISTORY, history)
    return history


def with_exact_metrics(history: list[dict[str, Any]], exact: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's history with the exact evaluation's metrics in place of the merchants' own
    (noised or withheld under DP); everything else (epsilon, timings, refusals) is the run's."""
    by_round = {record["round"]: record for record in exact}
    merged = []
    for record in history:
        evaluated = by_round.get(record["round"])
        if evaluated is None:
            merged.append(record)
            continue
        clients = {name: {**record.get("clients", {}).get(name, {}), **metrics} for name, metrics in evaluated["clients"].items()}
        merged.append({**record, "evaluate": evaluated["evaluate"], "clients": clients})
    return merged
