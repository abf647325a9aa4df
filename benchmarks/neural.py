"""MF against NeuMF, with and without ad content, without DP and under user-level DP (issue 17).

    .venv/bin/python benchmarks/neural.py [--datasets ml100k beauty] [--epsilons none 8] [--models ...] [--rounds N]

For each data set (its shipped experiment file's base cell: 5 IID merchants), each model trains
federated, in-process, with the very code of a Flower run: every merchant's solver fits its users
(local, never released) and its privacy plan releases the round's update (exactly, or under DP:
private ALS's noisy statistics, DP-SGD's Opacus steps with the merchant's persistent ledger in a
temporary state directory); the run's strategy (server/strategies.build_strategy) aggregates.
- mf-als: the default solver (benchmarks/federated_als.py; under DP its plain-aggregation noise);
- mf-sgd: logistic MF, DP-SGD with MF's closed-form per-user clipping;
- neumf: GMF + MLP towers (shared/neumf.py), DP-SGD with Opacus' per-user clipping (hooks or ghost);
- neumf-content: NeuMF whose ad embeddings add a learned projection of the catalog's content.
Two splits: "warm" (each user's last positive held out, the harness's protocol: NDCG@10 and HR@10
sampled against 100 negatives, NDCG@10 among all ads), and "cold-start" (10% of the ads held out of
training entirely, simulations/cold_start.py: each user's first held-out ad ranked among held-out
ads, all of them for ndcg10_full, 99 sampled ones for the sampled metrics; MF places a cold ad by a
ridge map from content to its trained factors, NeuMF + content by its own tower, plain NeuMF
cannot place it). Beside them the floors: popularity (warm), category popularity and random (cold).
epoch_seconds: the median over merchants and rounds of one merchant's ad step (one local epoch; for
ALS its statistics), so the DP overhead is the ratio of a model's private and non-private medians.

Writes benchmarks/results/neural.json: records with dataset, model, epsilon (null: no DP), split,
ndcg10_sampled, hr10_sampled, ndcg10_full, epoch_seconds.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

import federated_als  # noqa: E402
from flwr.app import Message, RecordDict  # noqa: E402
from results_file import merged, write_records  # noqa: E402

from client.node_data import NodeData  # noqa: E402
from client.privacy.registry import open_plan  # noqa: E402
from client.solvers.registry import solver_for  # noqa: E402
from server.strategies import build_strategy  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.content import content_features  # noqa: E402
from shared.data.schema import AdCatalog, Dataset  # noqa: E402
from shared.data.sources import load_dataset  # noqa: E402
from shared.flower_internals import server_identity  # noqa: E402
from shared.metrics import NUM_TEST_USERS  # noqa: E402
from shared.params import initial_model, with_public_constants  # noqa: E402
from shared.privacy_policy import PrivacyPolicy  # noqa: E402
from shared.wire import Arrays, from_array_record  # noqa: E402
from simulations.baselines import shard_data  # noqa: E402
from simulations.cold_start import cold_split, evaluate_cold_start  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "neural.json"
CLIENTS = federated_als.CLIENTS
MODELS = ("mf-als", "mf-sgd", "neumf", "neumf-content")
SOLVER_VALUES: dict[str, dict[str, Any]] = {
    "mf-sgd": {"mf_solver": "sgd"},
    "neumf": {"mf_solver": "neumf"},
    "neumf-content": {"mf_solver": "neumf", "neumf_content": True},
}
TRACE = False  # --trace: evaluate the model after every round (the next round's users, fitted anyway)
Trained = tuple[Arrays, list[np.ndarray], list[float]]  # global model, each merchant's users, ad-step seconds


def model_config(dataset: str, model: str, epsilon: float | None, rounds: int) -> RunConfig:
    """The experiment's cell for this model: ALS's own cell; the SGD family on the base cell's data and sizes."""
    if model == "mf-als":
        return federated_als.experiment_cell(dataset, epsilon)
    base = federated_als.experiment_cell(dataset)
    privacy = {"privacy": "none"} if epsilon is None else {"privacy": "user", "target_epsilon": epsilon, "dp_metrics": "none"}
    return base.with_values(f"neural benchmark ({dataset}, {model})", num_rounds=rounds, **SOLVER_VALUES[model], **privacy)


def train_sgd_family(cfg: RunConfig, catalog: AdCatalog, shards: list[NodeData], state_root: Path) -> Trained:
    """Federated rounds of an SGD-family solver: users fitted (warm-started), the plan's release, FedAvg."""
    solvers = [solver_for(cfg, data) for data in shards]
    strategy, _ = build_strategy(cfg, len(shards), catalog)
    policy = PrivacyPolicy.for_simulation(cfg)
    arrays = initial_model(cfg, catalog)
    users: list[np.ndarray | None] = [None] * len(shards)
    seconds: list[float] = []
    for server_round in range(1, cfg.num_rounds + 1):
        replies, traced = [], []
        for pid, (solver, data) in enumerate(zip(solvers, shards)):
            rng = np.random.default_rng([cfg.seed, server_round, pid])
            fitted = solver.fit_users(arrays, rng, users[pid])
            users[pid] = fitted
            if TRACE and server_round > 1:
                traced.append(data.evaluate(arrays, fitted, None))  # the models alone
            plan = open_plan(cfg, policy, data.num_users, state_root / f"partition-{pid}")
            started = time.perf_counter()
            reply = plan.release_update(f"partition-{pid}", solver, arrays, fitted, rng, server_round)
            seconds.append(time.perf_counter() - started)
            replies.append(reply.to_message(Message(content=RecordDict(), dst_node_id=1, message_type="train")))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        assert aggregated is not None
        arrays = with_public_constants(from_array_record(aggregated), arrays)
        trace = ""
        if traced:
            mean = weighted(traced, NUM_TEST_USERS, ("ndcg10_sampled", "ndcg10_full"))
            trace = f"; after round {server_round - 1}: NDCG@10 {mean['ndcg10_sampled']:.4f} sampled, {mean['ndcg10_full']:.4f} full"
        print(f"    round {server_round}: ad step {statistics.median(seconds[-len(shards):]):.2f} s per merchant{trace}", flush=True)
    rng = np.random.default_rng([cfg.seed, cfg.num_rounds + 1])
    return arrays, [solver.fit_users(arrays, rng, previous) for solver, previous in zip(solvers, users)], seconds


def train_als(cfg: RunConfig, catalog: AdCatalog, shards: list[NodeData]) -> Trained:
    arrays, users = federated_als.train(cfg, catalog, shards)
    seconds = []
    for data, factors in zip(shards, users):  # one ALS "epoch": a merchant's statistics against the final model
        solver = solver_for(cfg, data)
        started = time.perf_counter()
        solver.local_update(arrays, factors, np.random.default_rng(0))
        seconds.append(time.perf_counter() - started)
    return arrays, users, seconds


def weighted(per_merchant: list[dict[str, float]], weight_key: str, keys: tuple[str, ...]) -> dict[str, float]:
    weights = np.array([m[weight_key] for m in per_merchant], dtype=np.float64)
    return {k: float(np.dot([m[k] for m in per_merchant], weights) / max(weights.sum(), 1.0)) for k in keys}


def record(dataset: str, model: str, epsilon: float | None, split: str, ndcg_s: float, hr_s: float, ndcg_f: float,
           seconds: float | None) -> dict[str, Any]:
    return {"dataset": dataset, "model": model, "epsilon": epsilon, "split": split, "ndcg10_sampled": round(ndcg_s, 4),
            "hr10_sampled": round(hr_s, 4), "ndcg10_full": round(ndcg_f, 4),
            "epoch_seconds": None if seconds is None else round(seconds, 4)}


def run_cell(dataset_name: str, dataset: Dataset, model: str, epsilon: float | None, split: str, rounds: int) -> list[dict[str, Any]]:
    cfg = model_config(dataset_name, model, epsilon, rounds)
    started = time.perf_counter()
    privacy = "no DP" if epsilon is None else f"epsilon {epsilon:g}"
    print(f"  {model}, {privacy}, {split} split ({cfg.num_rounds} rounds)", flush=True)
    cold = cold_split(dataset.log, len(dataset.catalog), seed=cfg.seed) if split == "cold-start" else None
    trained_on = dataset if cold is None else Dataset(dataset.name, dataset.catalog, cold.warm_log)
    shards = [data for _, data in shard_data(cfg, trained_on, CLIENTS)]
    train: Callable[[], Trained]
    with tempfile.TemporaryDirectory(prefix="fedads-neural-") as state_root:
        if model == "mf-als":
            train = lambda: train_als(cfg, dataset.catalog, shards)  # noqa: E731
        else:
            train = lambda: train_sgd_family(cfg, dataset.catalog, shards, Path(state_root))  # noqa: E731
        arrays, users, seconds = train()
    epoch = statistics.median(seconds)
    records = []
    if cold is None:
        mean = weighted([data.evaluate(arrays, factors, None) for data, factors in zip(shards, users)], NUM_TEST_USERS,
                        ("ndcg10_sampled", "hr10_sampled", "ndcg10_full"))
        records.append(record(dataset_name, model, epsilon, split, mean["ndcg10_sampled"], mean["hr10_sampled"], mean["ndcg10_full"], epoch))
        if model == "mf-als" and epsilon is None:
            pop = weighted([data.evaluate_popularity() for data in shards], NUM_TEST_USERS, ("ndcg10_sampled", "hr10_sampled", "ndcg10_full"))
            records.append(record(dataset_name, "popularity", None, split, pop["ndcg10_sampled"], pop["hr10_sampled"], pop["ndcg10_full"], None))
    else:
        features = content_features(dataset.catalog)
        per_merchant = [evaluate_cold_start(dataset.catalog, features, cold, arrays, data.user_ids, factors, seed=cfg.seed)
                        for data, factors in zip(shards, users)]
        keys = ("ndcg10_cold_sampled", "hr10_cold_sampled", "ndcg10_cold")
        rankers = {"content": model} | ({"category-popularity": "category-popularity", "random": "random"}
                                        if model == "mf-als" and epsilon is None else {})
        for ranker, name in rankers.items():
            mean = weighted([m[ranker] for m in per_merchant], "cold_test_users", keys)
            records.append(record(dataset_name, name, epsilon if name == model else None, split, mean["ndcg10_cold_sampled"],
                                  mean["hr10_cold_sampled"], mean["ndcg10_cold"], epoch if name == model else None))
    for r in records:
        print(f"    {r['model']}: NDCG@10 sampled {r['ndcg10_sampled']:.4f}, HR@10 sampled {r['hr10_sampled']:.4f}, "
              f"NDCG@10 full {r['ndcg10_full']:.4f}, epoch {r['epoch_seconds']} s ({time.perf_counter() - started:.0f} s)", flush=True)
    return records


def _cell(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["dataset"], r["model"], r["epsilon"], r["split"]


def _in_cells(cells: set[tuple[Any, ...]], r: dict[str, Any]) -> bool:
    return _cell(r) in cells


def main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(federated_als.EXPERIMENTS), default=["ml100k", "beauty"])
    parser.add_argument("--epsilons", nargs="+", default=["none", "8"], help="none (no DP) and/or epsilons")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--splits", nargs="+", choices=("warm", "cold-start"), default=["warm", "cold-start"])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the SGD-family models (ALS: its experiment cell's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--trace", action="store_true", help="print the metrics after every round")
    args = parser.parse_args()
    global TRACE
    TRACE = args.trace
    epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    present = [name for name in args.datasets if Path(federated_als.experiment_cell(name).data_path).exists()]
    if not present:
        print("none of the data sets is in ../shared/data: nothing to measure")
        return 0
    print(f"{date.today()} on {platform.node()} ({platform.machine()}), {CLIENTS} IID merchants, {args.rounds} rounds (SGD family)")
    with server_identity():
        for name in present:
            dataset = load_dataset(federated_als.experiment_cell(name))
            print(f"\n## {name}: {len(dataset.catalog)} ads", flush=True)
            for split in args.splits:
                for model in args.models:
                    for epsilon in epsilons:
                        records = run_cell(name, dataset, model, epsilon, split, args.rounds)
                        # written after every cell: a long run's finished cells survive an interruption
                        cells = {_cell(r) for r in records}
                        write_records(args.output, merged(args.output, records, partial(_in_cells, cells)))
    print(f"\nresults -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
