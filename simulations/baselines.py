"""In-process baselines with the same data, solver and metric code as the federated runs.

- TopPop: rank every ad by its training popularity over all users (the round log's
  merchant-pop columns are another floor: each merchant ranking by its own shard's popularity).
- Centralized: all users pooled in one place, trained by the very solver a client uses
  (client/solvers: user step, then the ad step's update and the server's step on it alone),
  one "round" = the same local epochs a client runs per round; with mf-solver = "als", one
  exact ALS round (the server's solve on the pooled statistics).
- Local-only: each merchant trains alone on its own shard, same solver and rounds.
- DP popularity: every merchant releases its ads' (user-weighted) positive counts once with
  Gaussian noise at the target epsilon (the same per-user bound as private ALS: a user's rows
  weigh min(1, sqrt(k / rows))); the server ranks by the summed noisy counts. The floor any
  private model must beat.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from client.node_data import NodeData
from client.solvers.registry import solver_for
from shared.accounting import calibrate_noise_multiplier
from shared.als import popularity_statistics
from shared.catalog_features import normalized_tag_features
from shared.config import RunConfig
from shared.content_affinity import ContentBlend
from shared.data.schema import AdCatalog, Dataset
from shared.data.sources import simulated_shards
from shared.metrics import METRIC_NAMES, NUM_TEST_USERS, toppop_score_fn
from shared.metrics import evaluate as evaluate_ranking
from shared.params import initial_model
from shared.privacy_policy import PrivacyPolicy
from shared.wire import ALS_POSITIVES


def pooled_data(cfg: RunConfig, dataset: Dataset) -> NodeData:
    return NodeData.prepare(dataset.log, dataset.catalog, cfg.seed)


def shard_data(cfg: RunConfig, dataset: Dataset, num_clients: int) -> list[tuple[str, NodeData]]:
    """Every simulated merchant's data, cut exactly as the federated run cuts it."""
    features = normalized_tag_features(dataset.catalog)
    return [(name, NodeData.prepare(shard, dataset.catalog, cfg.seed, features)) for name, shard in simulated_shards(cfg, dataset, num_clients)]


def toppop(cfg: RunConfig, dataset: Dataset) -> dict[str, float]:
    return pooled_data(cfg, dataset).evaluate_popularity()


def centralized(
    cfg: RunConfig, dataset: Dataset, on_round: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Per-round metrics of centralized training, round 0 being the initial model."""
    return train_alone(cfg, pooled_data(cfg, dataset), dataset.catalog, on_round)


def local_only(cfg: RunConfig, dataset: Dataset, num_clients: int) -> dict[str, list[dict[str, Any]]]:
    """Per-merchant histories of training alone, shards cut exactly as the federated run cuts them."""
    return {name: train_alone(cfg, data, dataset.catalog) for name, data in shard_data(cfg, dataset, num_clients)}


def train_alone(
    cfg: RunConfig, data: NodeData, catalog: AdCatalog, on_round: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Rounds of the run's solver on one data set alone, round 0 being the initial model."""
    solver = solver_for(cfg, data)
    arrays = initial_model(cfg, catalog)
    user_factors: np.ndarray | None = None
    history = []
    for server_round in range(cfg.num_rounds + 1):
        started = time.perf_counter()
        stats: dict[str, float] = {}
        if server_round > 0:
            rng = np.random.default_rng([cfg.seed, server_round, 0])
            user_factors = solver.fit_users(arrays, rng, user_factors if solver.warm_starts_users else None)
            update = solver.local_update(arrays, user_factors, rng)
            arrays, stats = solver.solve_alone(update), update.metrics
        rng = np.random.default_rng([cfg.seed, server_round, 1])
        user_factors = solver.fit_users(arrays, rng, user_factors if solver.warm_starts_users else None)
        record = {"round": server_round, "train": stats, "evaluate": data.evaluate(arrays, user_factors, ContentBlend.from_config(cfg)),
                  "round_seconds": time.perf_counter() - started}
        history.append(record)
        if on_round:
            on_round(record)
    return history


def dp_popularity(cfg: RunConfig, dataset: Dataset, num_clients: int, epsilons: list[float]) -> dict[str, dict[str, float]]:
    """Metrics (weighted by test users) of ranking by noisy summed counts, per target epsilon."""
    shards = [data for _, data in shard_data(cfg, dataset, num_clients)]
    # the counts private ALS's popularity release makes (its fallback is this floor's mechanism)
    counts = [popularity_statistics(data.rows, data.num_ads, cfg.als_max_rows)[ALS_POSITIVES] for data in shards]
    rng = np.random.default_rng(secrets.randbits(128))  # DP noise: never from the public run seed
    delta = PrivacyPolicy.for_simulation(cfg).delta_for(cfg)  # public, as the merchants' own
    results = {}
    for epsilon in epsilons:
        noisy = np.zeros(len(dataset.catalog))
        sigma = calibrate_noise_multiplier(epsilon, delta, 1.0, steps=1)
        for count in counts:
            noisy += count + rng.normal(0.0, sigma * np.sqrt(cfg.als_max_rows), size=len(count))  # sensitivity sqrt(k)
        per_client = [evaluate_ranking(toppop_score_fn(noisy), d.split, d.eval_negatives) for d in shards]
        total = sum(m[NUM_TEST_USERS] for m in per_client) or 1.0
        results[f"{epsilon:g}"] = {k: sum(m[k] * m[NUM_TEST_USERS] for m in per_client) / total for k in METRIC_NAMES}
    return results
