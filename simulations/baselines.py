"""In-process baselines with the same model, trainer and metric code as the federated runs.

- TopPop: rank every ad by its training popularity over all users.
- Centralized: all users pooled in one place, trained by the very `LocalTrainer` a client uses
  (user step, then ad step), one "round" = the same local epochs a client runs per round;
  with mf-solver = "als", one exact ALS round (the server's solve on the pooled statistics).
- Local-only: each merchant trains alone on its own shard, same trainer and rounds.
- DP popularity: every merchant releases its ads' (user-weighted) positive counts once with
  Gaussian noise at the target epsilon (the same per-user bound as private ALS: a user's rows
  weigh min(1, sqrt(k / rows))); the server ranks by the summed noisy counts. The floor any
  private model must beat.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from client.trainer import LocalTrainer
from shared.als import ALSSettings, solve_ads
from shared.config import RunConfig
from shared.data.schema import AdCatalog, Dataset
from shared.data.sources import simulated_shards
from shared.metrics import METRIC_NAMES, toppop_score_fn
from shared.metrics import evaluate as evaluate_ranking
from shared.params import initial_arrays
from shared.privacy import calibrate_noise_multiplier, default_delta


def pooled_trainer(cfg: RunConfig, dataset: Dataset) -> LocalTrainer:
    return LocalTrainer.for_log(cfg, dataset.log, len(dataset.catalog))


def toppop(cfg: RunConfig, dataset: Dataset) -> dict[str, float]:
    return pooled_trainer(cfg, dataset).evaluate_toppop()


def centralized(
    cfg: RunConfig, dataset: Dataset, on_round: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Per-round metrics of centralized training, round 0 being the initial model."""
    return train_alone(cfg, pooled_trainer(cfg, dataset), dataset.catalog, on_round)


def local_only(cfg: RunConfig, dataset: Dataset, num_clients: int) -> dict[str, list[dict[str, Any]]]:
    """Per-merchant histories of training alone, shards cut exactly as the federated run cuts them."""
    return {
        name: train_alone(cfg, LocalTrainer.for_log(cfg, shard, len(dataset.catalog)), dataset.catalog)
        for name, shard in simulated_shards(cfg, dataset, num_clients)
    }


def train_alone(
    cfg: RunConfig, trainer: LocalTrainer, catalog: AdCatalog, on_round: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    arrays = initial_arrays(cfg.init, catalog.category_codes()[0], cfg.factors, cfg.seed)
    als = ALSSettings.from_config(cfg) if cfg.mf_solver == "als" else None
    user_factors: np.ndarray | None = None
    history = []
    for server_round in range(cfg.num_rounds + 1):
        started = time.perf_counter()
        stats: dict[str, float] = {}
        rng = np.random.default_rng([cfg.seed, server_round, 0])
        if server_round > 0 and als is not None:
            arrays = solve_ads(trainer.als_statistics(trainer.fit_users_als(arrays, als), als), als)
        elif server_round > 0:
            user_factors = trainer.fit_users(arrays, rng, user_factors)
            arrays, stats = trainer.train_ads(arrays, user_factors, rng)
        rng = np.random.default_rng([cfg.seed, server_round, 1])
        user_factors = trainer.fit_users_als(arrays, als) if als is not None else trainer.fit_users(arrays, rng, user_factors)
        record = {"round": server_round, "train": stats, "evaluate": trainer.evaluate(arrays, user_factors),
                  "round_seconds": time.perf_counter() - started}
        history.append(record)
        if on_round:
            on_round(record)
    return history


def dp_popularity(cfg: RunConfig, dataset: Dataset, num_clients: int, epsilons: list[float]) -> dict[str, dict[str, float]]:
    """Metrics (weighted by test users) of ranking by noisy summed counts, per target epsilon."""
    trainers = [LocalTrainer.for_log(cfg, shard, len(dataset.catalog)) for _, shard in simulated_shards(cfg, dataset, num_clients)]
    counts = []
    for trainer in trainers:
        rows = trainer.als_rows
        weight = rows.user_weights(cfg.als_max_rows)[rows.user] * rows.label
        counts.append(np.bincount(rows.ad, weights=weight, minlength=trainer.split.num_ads))
    rng = np.random.default_rng([cfg.seed, 7])
    results = {}
    for epsilon in epsilons:
        noisy = np.zeros(len(dataset.catalog))
        for trainer, count in zip(trainers, counts):
            delta = cfg.target_delta or default_delta(trainer.split.num_users)
            sigma = calibrate_noise_multiplier(epsilon, delta, 1.0, steps=1)
            noisy += count + rng.normal(0.0, sigma * np.sqrt(cfg.als_max_rows), size=len(count))  # sensitivity sqrt(k)
        per_client = [evaluate_ranking(toppop_score_fn(noisy), t.split, t.eval_negatives) for t in trainers]
        total = sum(m["num-test-users"] for m in per_client) or 1.0
        results[f"{epsilon:g}"] = {k: sum(m[k] * m["num-test-users"] for m in per_client) / total for k in METRIC_NAMES}
    return results
