"""Random search over private ALS's settings at one epsilon (is the shipped setting a local optimum?).

    .venv/bin/python benchmarks/private_als_search.py --data ml100k --epsilon 8 --candidates 12 --seeds 2

Same in-process federated private ALS as benchmarks/private_als_tricks.py (the Flower run's own
client statistics, noise and server solve; 5 IID shards of ../shared/data). Prints the mean
NDCG@10 (sampled) over noise seeds of the experiment's setting and of `--candidates` random
settings drawn from a grid around it, best first.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from private_als_tricks import DATASETS, run

from shared.config import RunConfig
from shared.data.sources import load_dataset
from shared.flower_internals import server_identity
from simulations.baselines import shard_data

GRID: dict[str, list[Any]] = {
    "als-user-clip": [0.1, 0.2, 0.3], "als-max-rows": [3, 5, 10], "als-alpha0": [0.25, 0.5, 1.0],
    "als-noise-ridge": [10.0, 20.0, 40.0], "als-count-shrinkage": [0.5, 1.0, 2.0], "als-budget-growth": [1.5, 2.33, 4.0],
    "factors": [16, 32], "als-user-l2": [0.5, 1.0, 2.0],
}


def main() -> int:
    with server_identity():  # the identity Flower's runtime gives the side that builds messages
        return _main()


def _main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATASETS), default="ml100k")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--search-seed", type=int, default=7)
    args = parser.parse_args()

    setting = {"partitioning": "iid", "factors": 32, "num-rounds": 3, "privacy": "user", **DATASETS[args.data]}  # popularity, then 2 of statistics
    tuned = RunConfig.from_flower(setting)
    dataset = load_dataset(tuned)
    shards = [data for _, data in shard_data(tuned, dataset, 5)]
    rng = random.Random(args.search_seed)
    candidates: list[dict[str, Any]] = [{}] + [{key: rng.choice(values) for key, values in GRID.items()} for _ in range(args.candidates)]
    results = []
    for overrides in candidates:
        cfg = RunConfig.from_flower({**setting, **overrides})
        scores = [run(cfg, shards, dataset.catalog, args.epsilon, seed)["ndcg10_sampled"] for seed in range(args.seeds)]
        results.append((statistics.mean(scores), overrides or {"(the experiment's setting)": True}))
        print(f"{results[-1][0]:.4f} {results[-1][1]}", file=sys.stderr, flush=True)
    print(f"{args.data}, epsilon {args.epsilon:g}, mean NDCG@10 sampled over {args.seeds} noise seeds, best first:")
    for score, overrides in sorted(results, key=lambda r: -r[0]):
        print(f"{score:.4f} {overrides}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
