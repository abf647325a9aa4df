"""Cold-start ads on real data: ads nobody interacted with, ranked by their public content (issue 17).

    .venv/bin/python benchmarks/cold_start.py [--datasets ml100k beauty] [--epsilon 8]

For each data set (its shipped experiment file, the federated cell without DP, 5 IID merchants),
10% of the catalog is held out of training entirely (simulations/cold_start.py). Federated ALS
trains on the rest, in-process with the very code of a Flower run (each merchant's ALSSolver,
the run's strategy summing and solving). Then the held-out ads get factors and a bias from
their content (shared/content.py: category, brand, tags, hashed title words and character
n-grams; MovieLens: titles and genres, Beauty: brand and category attributes, no titles) through
a ridge map fitted on the warm ads' trained parameters. Every merchant ranks, for each of its
users with a positive on a held-out ad, the earliest such ad among all held-out ads, by
"content", by "category-popularity" and at random. Means weigh each merchant by its test users.
With `--epsilon E`, the experiment's private-ALS cell at E instead (3 releases: popularity, then 2 of statistics; every merchant
adding the full Gaussian noise of its release, plain aggregation: the conservative path, as
benchmarks/private_als_tricks.py noises); the content map reads only the private model's global
parameters, so the cold ads' placement costs no more privacy.

Writes benchmarks/results/cold_start.json: records with dataset, model, epsilon (null: no DP),
split ("cold-start"), ranker, hr10_cold, ndcg10_cold, cold_test_users.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

import federated_als  # noqa: E402
from results_file import merged, write_records  # noqa: E402

from shared.content import content_features  # noqa: E402
from shared.data.schema import Dataset  # noqa: E402
from shared.data.sources import load_dataset  # noqa: E402
from shared.flower_internals import server_identity  # noqa: E402
from simulations.baselines import shard_data  # noqa: E402
from simulations.cold_start import cold_split, evaluate_cold_start  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cold_start.json"
CLIENTS = federated_als.CLIENTS
RANKERS = ("content", "category-popularity", "random")


def run_dataset(name: str, epsilon: float | None) -> list[dict[str, Any]]:
    started = time.perf_counter()
    cfg = federated_als.experiment_cell(name, epsilon)
    dataset = load_dataset(cfg)
    split = cold_split(dataset.log, len(dataset.catalog), seed=cfg.seed)
    warm = Dataset(dataset.name, dataset.catalog, split.warm_log)
    shards = [data for _, data in shard_data(cfg, warm, CLIENTS)]
    features = content_features(dataset.catalog)
    arrays, users = federated_als.train(cfg, dataset.catalog, shards)
    per_merchant = [evaluate_cold_start(dataset.catalog, features, split, arrays, data.user_ids, factors, seed=cfg.seed)
                    for data, factors in zip(shards, users)]
    privacy = "no DP" if epsilon is None else f"epsilon {epsilon:g}"
    print(f"\n## {name}, {privacy}: {int(split.cold.sum())} cold ads of {len(dataset.catalog)}, {len(split.test_users)} test users, "
          f"{features.matrix.shape[1]} content features ({time.perf_counter() - started:.0f} s)\n")
    print("| ranker | HR@10 among cold ads | NDCG@10 among cold ads |\n|---|---|---|")
    records = []
    for ranker in RANKERS:
        weights = np.array([m[ranker]["cold_test_users"] for m in per_merchant])
        mean = {k: float(np.dot([m[ranker][k] for m in per_merchant], weights) / max(weights.sum(), 1.0)) for k in ("hr10_cold", "ndcg10_cold")}
        print(f"| {ranker} | {mean['hr10_cold']:.4f} | {mean['ndcg10_cold']:.4f} |")
        records.append({"dataset": name, "model": "als", "epsilon": epsilon, "split": "cold-start", "ranker": ranker, **mean,
                        "cold_test_users": int(weights.sum())})
    return records


def main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(federated_als.EXPERIMENTS), default=sorted(federated_als.EXPERIMENTS))
    parser.add_argument("--epsilon", type=float, default=None, help="the private-ALS cell at this epsilon instead of no DP")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    present = [name for name in args.datasets if Path(federated_als.experiment_cell(name).data_path).exists()]
    if not present:
        print("none of the data sets is in ../shared/data: nothing to measure")
        return 0
    print(f"{date.today()} on {platform.node()} ({platform.machine()}), {CLIENTS} IID merchants, federated ALS "
          + ("without DP" if args.epsilon is None else f"at epsilon {args.epsilon:g} (plain aggregation)"))
    records = []
    with server_identity():
        for name in present:
            records += run_dataset(name, args.epsilon)
    write_records(args.output, merged(args.output, records, lambda r: r["dataset"] in present and r["epsilon"] == args.epsilon))
    print(f"\n{len(records)} records -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
