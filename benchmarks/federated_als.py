"""Federated ALS in-process with the very code of a Flower run, for benchmarks that need the
trained model itself (benchmarks/implicit_vs_federated.py, benchmarks/cold_start.py).

Each merchant's ALSSolver fits its users and computes its ad statistics; under DP each adds the
Gaussian noise of its round's release (every merchant the full noise: plain aggregation, the
conservative path; sigma calibrated per merchant as client/privacy/private_als.py plans it); the
run's strategy (server/strategies.build_strategy) checks each reply as the round loop does, sums
and solves. The experiments' cells are read from the shipped experiment files.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict

from client.node_data import NodeData
from client.privacy.plan import WITHOUT_DP, wire_dtype
from client.solvers.als import ALSSolver
from server.als_aggregation import ALSAggregation
from server.strategies import build_strategy
from shared.accounting import calibrate_noise_multiplier
from shared.als import release_budget_shares
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.params import initial_arrays
from shared.privacy_policy import PrivacyPolicy
from shared.wire import Arrays, PrivacyReport, TrainReply, from_array_record
from simulations.experiment import expand_cells, load_experiment
from simulations.in_process import private_als_round

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"ml100k": ROOT / "experiments" / "ml100k.toml", "beauty": ROOT / "experiments" / "beauty.toml"}
CLIENTS = 5


def experiment_cell(name: str, epsilon: float | None = None) -> RunConfig:
    """The experiment's ALS cell at 5 merchants: without DP (the federated base cell), or private ALS at `epsilon`."""
    cells = [c.config for c in expand_cells(load_experiment(EXPERIMENTS[name])) if c.clients == CLIENTS and c.config.mf_solver == "als"
             and (c.config.privacy == "none" if epsilon is None else c.config.privacy == "user" and c.config.target_epsilon == epsilon)]
    if not cells:
        raise SystemExit(f"{name}'s experiment has no ALS cell at {'no DP' if epsilon is None else f'epsilon {epsilon:g}'}")
    return cells[0]


def _reply(client: str, stats: Arrays, privacy: PrivacyReport) -> Message:
    request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    return TrainReply(client, wire_dtype(stats), None, {}, privacy).to_message(request)


def train(cfg: RunConfig, catalog: AdCatalog, shards: list[NodeData]) -> tuple[Arrays, list[np.ndarray]]:
    """The global model after the run's rounds, and each merchant's users fitted on it."""
    solvers = [ALSSolver(cfg, data) for data in shards]
    strategy, _ = build_strategy(cfg, len(shards), catalog)
    assert isinstance(strategy, ALSAggregation), "mf-solver als"
    arrays = initial_arrays(cfg.init, catalog, cfg.factors, cfg.seed)
    # the solver interface takes a generator; ALS's user step and statistics are exact and draw nothing from it
    rng = np.random.default_rng(cfg.seed)
    noise_rng = np.random.default_rng(secrets.randbits(128))  # DP noise: never from the public run seed
    private = cfg.privacy == "user"
    sigma = 0.0
    if private:
        delta = PrivacyPolicy.for_simulation(cfg).delta_for(cfg)  # public, as the merchants' own
        sigma = calibrate_noise_multiplier(cfg.target_epsilon, delta, 1.0, steps=1)
    shares = release_budget_shares(cfg.num_rounds, cfg.als_budget_growth)
    for server_round in range(1, cfg.num_rounds + 1):
        if private:  # the round's share of the budget: Gaussian releases compose as sum of 1 / sigma^2
            round_sigma = sigma / float(np.sqrt(shares[server_round - 1]))
            arrays = private_als_round(strategy, solvers, arrays, server_round, round_sigma, noise_rng)
            continue
        replies = []
        for pid, solver in enumerate(solvers):
            stats = solver.local_update(arrays, solver.fit_users(arrays, rng, None), rng).arrays
            reply = _reply(f"partition-{pid}", stats, WITHOUT_DP)
            received = TrainReply.from_message(reply)
            strategy.check_reply(received.arrays, received.metric_record())  # what the round loop checks first
            replies.append(reply)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        assert aggregated is not None, "every reply is valid here"
        arrays = from_array_record(aggregated)
    return arrays, [solver.fit_users(arrays, rng, None) for solver in solvers]
