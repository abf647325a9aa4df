"""Private ALS utility tricks, each measured on its own, at one epsilon.

    .venv/bin/python benchmarks/private_als_tricks.py --data ml100k --epsilon 8 --seeds 3
    .venv/bin/python benchmarks/private_als_tricks.py --data beauty --epsilon 8 --seeds 2

Runs federated private ALS in-process with the very code of a Flower run (each shard's
LocalTrainer computes its statistics, they are noised as client/private_als.py does, with the
noise multiplier calibrated by shared/privacy.py per shard, and summed and solved by
server/als_strategy.ALSAggregation), 5 IID shards of ../shared/data. A "plain" private ALS
(per-ad Gramians, equal budget per round, no count averaging, no shrinkage, no noise-aware
ridge, random start) and the experiment's setting are compared with one trick toggled at a
time. Reports the median over seeds of NDCG@10 / HR@10 (sampled) and NDCG@10 (full).
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a site-packages `benchmarks` shadows this folder

from client.trainer import LocalTrainer  # noqa: E402
from flwr.app import Message, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from server.als_strategy import ALSAggregation  # noqa: E402
from shared.als import ALSSettings, add_noise, round_budget_shares  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.data.sources import load_dataset, simulated_shards  # noqa: E402
from shared.params import initial_arrays  # noqa: E402
from shared.privacy import calibrate_noise_multiplier, default_delta  # noqa: E402
from shared.records import from_array_record, to_array_record  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "ml100k": {"dataset": "movielens-100k", "data-path": str(DATA / "movielens" / "ml-100k"),
               "als-max-rows": 20, "als-count-shrinkage": 20.0},
    "beauty": {"dataset": "amazon-seq", "data-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty.txt"),
               "catalog-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty_item2attributes.json"),
               "als-max-rows": 3, "als-count-shrinkage": 100.0, "als-noise-ridge": 50.0,
               "als-catalog-prior": True, "init": "catalog"},
}


def _reply(stats: dict[str, np.ndarray], sigma: float) -> Message:
    content = RecordDict({"arrays": to_array_record(stats), "metrics": MetricRecord({"num-examples": 1.0, "dp-noise-multiplier": sigma})})
    return Message(content=content, reply_to=Message(content=RecordDict(), dst_node_id=1, message_type="train"))


def run(cfg: RunConfig, trainers: list[LocalTrainer], catalog: Any, epsilon: float, seed: int, average_counts: bool = True,
        category_only: bool = False) -> dict[str, float]:
    settings = ALSSettings.from_config(cfg)
    shares = round_budget_shares(cfg.num_rounds, cfg.als_budget_growth)
    sigmas = [calibrate_noise_multiplier(epsilon, default_delta(t.split.num_users), 1.0, steps=1) for t in trainers]
    codes = catalog.category_codes()[0]
    tags = None
    if cfg.als_catalog_prior:  # all the ads' public tags, or (for comparison) one category each
        tags = np.eye(int(codes.max()) + 1)[codes] if category_only else catalog.tag_membership()
    arrays = initial_arrays(cfg.init, codes, cfg.factors, cfg.seed)
    rng = np.random.default_rng(seed)
    strategy = ALSAggregation(settings, len(catalog), cfg.factors, tags=tags)
    for server_round in range(1, cfg.num_rounds + 1):
        replies = []
        for trainer, sigma in zip(trainers, sigmas):
            sigma_r = sigma / math.sqrt(shares[server_round - 1])
            stats = trainer.als_statistics(trainer.fit_users_als(arrays, settings), settings)
            replies.append(_reply(add_noise(stats, settings.noise_stds(sigma_r), rng), sigma_r))
        if not average_counts:
            strategy = ALSAggregation(settings, len(catalog), cfg.factors, tags=tags)  # no memory of earlier rounds
        arrays = from_array_record(strategy.aggregate_train(server_round, replies)[0])
    results = [t.evaluate(arrays, t.fit_users_als(arrays, settings)) for t in trainers]
    weights = np.array([r["num-test-users"] for r in results])
    return {k: float(np.dot([r[k] for r in results], weights) / weights.sum()) for k in ("hr10_sampled", "ndcg10_sampled", "ndcg10_full")}


def main() -> int:
    for name in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, name, 1)  # the identity Flower's runtime gives the side that builds messages
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the strategy's per-round lines
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATASETS), default="ml100k")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--factors", type=int, default=32)
    args = parser.parse_args()

    setting = {"partitioning": "iid", "factors": args.factors, "num-rounds": 2, "privacy": "user", **DATASETS[args.data]}
    tuned = RunConfig.from_flower(setting)
    dataset = load_dataset(tuned)
    trainers = [LocalTrainer.for_log(tuned, shard, len(dataset.catalog)) for _, shard in simulated_shards(tuned, dataset, 5)]
    plain = {"als-gram": "per-ad", "als-budget-growth": 1.0, "als-count-shrinkage": 0.0, "als-noise-ridge": 0.0,
             "als-catalog-prior": False, "init": "random"}
    variants: list[tuple[str, dict[str, Any], bool] | tuple[str, dict[str, Any], bool, bool]] = [
        ("plain private ALS (per-ad Gramians, equal rounds, no count averaging, no shrinkage)", plain, False),
        ("plain + shared Gramian (count x average user)", {**plain, "als-gram": "shared"}, False),
        ("plain + counts averaged over rounds", plain, True),
        ("plain + later rounds get more budget (growth 2.33)", {**plain, "als-budget-growth": 2.33}, False),
        ("plain + noise-aware ridge (20 per unit of noise std)", {**plain, "als-noise-ridge": 20.0}, False),
        ("plain + count shrinkage", {**plain, "als-count-shrinkage": tuned.als_count_shrinkage}, False),
        ("plain + catalog warm start", {**plain, "init": "catalog"}, False),
        ("the experiment's setting", {}, True),
        ("setting, 1 round", {"num-rounds": 1}, True),
        ("setting, 3 rounds", {"num-rounds": 3}, True),
        ("setting, clip 0.1", {"als-user-clip": 0.1}, True),
        ("setting, clip 0.5", {"als-user-clip": 0.5}, True),
        ("setting, catalog prior " + ("off" if tuned.als_catalog_prior else "on (all tags)"),
         {"als-catalog-prior": not tuned.als_catalog_prior}, True),
        ("setting, catalog prior on, one category per ad instead of all tags", {"als-catalog-prior": True}, True, True),
        ("setting, warm start " + ("random" if tuned.init == "catalog" else "catalog"),
         {"init": "random" if tuned.init == "catalog" else "catalog"}, True),
    ]
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): {args.data}, 5 IID shards, epsilon {args.epsilon:g}, "
          f"factors {args.factors}, median of {args.seeds} noise seeds")
    print("| variant | NDCG@10 sampled | HR@10 sampled | NDCG@10 full | s per run |")
    print("|---|---|---|---|---|")
    for name, overrides, average, *extra in variants:
        category_only = bool(extra and extra[0])
        cfg = RunConfig.from_flower({**setting, **overrides})
        started = time.perf_counter()
        runs = [run(cfg, trainers, dataset.catalog, args.epsilon, seed, average, category_only) for seed in range(args.seeds)]
        seconds = (time.perf_counter() - started) / args.seeds
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {med['ndcg10_sampled']:.4f} | {med['hr10_sampled']:.4f} | {med['ndcg10_full']:.4f} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
