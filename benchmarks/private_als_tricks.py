"""Private ALS utility tricks, each measured on its own, at one epsilon; and the popularity rule.

    .venv/bin/python benchmarks/private_als_tricks.py --data ml100k --epsilon 8 --seeds 3
    .venv/bin/python benchmarks/private_als_tricks.py --data beauty --epsilon 8 --seeds 2
    .venv/bin/python benchmarks/private_als_tricks.py --data ml100k --popularity-rule 1 2 4 8 16 --seeds 3 --leans 0 10 20
    .venv/bin/python benchmarks/private_als_tricks.py --data beauty --epsilon 8 --seeds 5 --prior-weights 0.005 0.01 0.02 1
    .venv/bin/python benchmarks/private_als_tricks.py --data ml100k --seeds 3 --content-weights 0.8 1.2 1.6 --halflives 3 5 10

Runs federated private ALS in-process with the very code of a Flower run (simulations/in_process.py
private_als_round: each merchant's release as client/privacy/private_als.py makes it, popularity
first, then statistics, with the noise multiplier calibrated by shared/accounting.py per shard,
summed and solved by server/als_aggregation.ALSAggregation), 5 IID shards of ../shared/data,
3 rounds by default (a popularity release and 2 of statistics). A "plain" private ALS (per-ad
Gramians, equal budget per statistics round, no pooling of the row counts, no shrinkage, no
noise-aware ridge, random start) and the experiment's setting are compared with one trick
toggled at a time. Reports the median over seeds of NDCG@10 / HR@10 (sampled) and NDCG@10 (full).

`--prior-weights W ...`: instead, at `--epsilon`, plain and secure: the catalog prior off and on at
each weight (als-catalog-prior-weight: the share of its tags' mean factors a rarely seen ad takes),
the measurements behind its default.

`--content-weights W ...`: instead, federated ALS without DP (`--exact-rounds`) and private ALS at each
of `--epsilons`, plain and secure, every model ranked by the model alone and blended with content
affinity at each weight and `--halflives` (shared/content_affinity.py), beside the DP-popularity
floor: the measurements behind content-affinity's default.

`--popularity-rule EPSILON ...`: instead, at each epsilon, plain (each merchant adds its full
noise) and secure (a quarter of the variance each, t = 4 of 5): the popularity rule's signal,
the personal model forced (min-signal 0) at each of `--leans`, the shipped rule's own choice,
and the DP-popularity floor: the measurements behind shared/als.py POPULARITY_MIN_SIGNAL and
POPULARITY_LEAN.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import federated_als

from client.node_data import NodeData
from client.solvers.als import ALSSolver
from server.als_aggregation import ALSAggregation
from shared.accounting import calibrate_noise_multiplier
from shared.als import ALSSettings, release_budget_shares
from shared.catalog_features import informative_tags
from shared.config import RunConfig, parse_override
from shared.content_affinity import ContentBlend
from shared.data.sources import load_dataset
from shared.flower_internals import server_identity
from shared.metrics import NUM_TEST_USERS
from shared.params import initial_arrays
from shared.privacy_policy import PrivacyPolicy
from shared.wire import Arrays
from simulations.baselines import dp_popularity, shard_data
from simulations.in_process import private_als_round

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    # the shipped experiment files' settings (experiments/*.toml): private ALS at its defaults
    "ml100k": {"dataset": "movielens-100k", "data-path": str(DATA / "movielens" / "ml-100k"), "init": "catalog"},
    "beauty": {"dataset": "amazon-seq", "data-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty.txt"),
               "catalog-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty_item2attributes.json"),
               "init": "catalog"},
}


def train(cfg: RunConfig, shards: list[NodeData], catalog: Any, epsilon: float, seed: int, average_counts: bool = True,
          category_only: bool = False, noise_share: float = 1.0, min_signal: float | None = None,
          lean: float | None = None) -> tuple[Arrays, list[ALSSolver], np.random.Generator, ALSAggregation]:
    """One private run of 5 merchants in this process; `noise_share` 0.25: secure aggregation's
    (each merchant adds a quarter of the variance, t = 4 of 5); `min_signal` and `lean`: the
    popularity rule's constants instead of the shipped ones (shared/als.py). Returns the final
    model, the merchants' solvers, the noise stream and the strategy."""
    settings = ALSSettings.from_config(cfg)
    solvers = [ALSSolver(cfg, data) for data in shards]
    shares = release_budget_shares(cfg.num_rounds, cfg.als_budget_growth)
    delta = PrivacyPolicy.for_simulation(cfg).delta_for(cfg)  # public, as the merchants' own
    sigma = calibrate_noise_multiplier(epsilon, delta, 1.0, steps=1)
    codes = catalog.category_codes()[0]
    tags = None
    if cfg.als_catalog_prior:  # all the ads' public tags, or (for comparison) one category each
        tags = np.eye(int(codes.max()) + 1)[codes] if category_only else informative_tags(catalog, "catalog prior")
    arrays = initial_arrays(cfg.init, catalog, cfg.factors, cfg.seed)
    rng = np.random.default_rng(seed)
    strategy = ALSAggregation(settings, len(catalog), cfg.factors, tags=tags, num_rounds=cfg.num_rounds)
    strategy.min_signal = strategy.min_signal if min_signal is None else min_signal
    strategy.lean = strategy.lean if lean is None else lean
    for server_round in range(1, cfg.num_rounds + 1):
        if not average_counts and server_round > 2:  # no memory of earlier statistics rounds' counts
            strategy.forget_counts()
        arrays = private_als_round(strategy, solvers, arrays, server_round, sigma / math.sqrt(shares[server_round - 1]), rng, noise_share)
    return arrays, solvers, rng, strategy


def evaluate(arrays: Arrays, solvers: list[ALSSolver], rng: np.random.Generator, blend: ContentBlend | None) -> dict[str, float]:
    """Every merchant's metrics of the model, ranked with `blend`, weighted by test users."""
    results = [solver.data.evaluate(arrays, solver.fit_users(arrays, rng, None), blend) for solver in solvers]
    weights = np.array([r[NUM_TEST_USERS] for r in results])
    return {k: float(np.dot([r[k] for r in results], weights) / weights.sum()) for k in ("hr10_sampled", "ndcg10_sampled", "ndcg10_full")}


def run(cfg: RunConfig, shards: list[NodeData], catalog: Any, epsilon: float, seed: int, average_counts: bool = True,
        category_only: bool = False, noise_share: float = 1.0, min_signal: float | None = None, lean: float | None = None) -> dict[str, float]:
    """`train`, then each merchant's metrics, ranked as the run config says (its content affinity)."""
    arrays, solvers, rng, strategy = train(cfg, shards, catalog, epsilon, seed, average_counts, category_only, noise_share, min_signal, lean)
    out = evaluate(arrays, solvers, rng, ContentBlend.from_config(cfg))
    out["signal"] = strategy.signal if strategy.signal is not None else math.nan
    return out


def main() -> int:
    with server_identity():  # the identity Flower's runtime gives the side that builds messages
        return _main()


def _main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the strategy's per-round lines
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATASETS), default="ml100k")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--popularity-rule", type=float, nargs="+", metavar="EPSILON",
                        help="instead: the popularity rule at these epsilons, plain and secure, against the floor")
    parser.add_argument("--leans", type=float, nargs="+", default=[0.0, 2.5], help="with --popularity-rule: the leans to force")
    parser.add_argument("--prior-weights", type=float, nargs="+", metavar="W",
                        help="instead: the catalog prior off and at these weights, plain and secure, at --epsilon")
    parser.add_argument("--content-weights", type=float, nargs="+", metavar="W",
                        help="instead: without DP and at each --epsilons, plain and secure, the merchants' ranking by the model "
                             "alone and blended with content affinity at these weights (and --halflives)")
    parser.add_argument("--halflives", type=float, nargs="+", default=[5.0], help="with --content-weights: the profiles' half-lives")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0], help="with --content-weights: the epsilons")
    parser.add_argument("--exact-rounds", type=int, default=10, help="with --content-weights: rounds of ALS without DP")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the first is the popularity release)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config change for every variant")
    args = parser.parse_args()

    setting = {"partitioning": "iid", "factors": args.factors, "num-rounds": args.rounds, "privacy": "user", **DATASETS[args.data],
               **dict(parse_override(item) for item in args.set)}
    tuned = RunConfig.from_flower(setting)
    dataset = load_dataset(tuned)
    shards = [data for _, data in shard_data(tuned, dataset, 5)]
    if args.popularity_rule:
        return _popularity_rule(tuned, dataset, shards, args.popularity_rule, args.seeds, args.leans)
    if args.prior_weights:
        return _prior_weights(setting, dataset, shards, args.epsilon, args.seeds, args.prior_weights)
    if args.content_weights:
        blends = [None] + [ContentBlend(weight=w, halflife=h) for h in args.halflives for w in args.content_weights]
        return _content_weights(tuned, dataset, shards, args.epsilons, args.seeds, blends, args.exact_rounds)
    plain = {"als-gram": "per-ad", "als-budget-growth": 1.0, "als-count-shrinkage": 0.0, "als-noise-ridge": 0.0,
             "als-catalog-prior": False, "init": "random"}
    variants: list[tuple[str, dict[str, Any], bool] | tuple[str, dict[str, Any], bool, bool]] = [
        ("plain private ALS (per-ad Gramians, equal statistics rounds, no shrinkage)", plain, False),
        ("plain + shared Gramian (count x average user)", {**plain, "als-gram": "shared"}, False),
        ("plain + later rounds get more budget (growth 2.33)", {**plain, "als-budget-growth": 2.33}, False),
        ("plain + noise-aware ridge (20 per unit of noise std)", {**plain, "als-noise-ridge": 20.0}, False),
        ("plain + count shrinkage", {**plain, "als-count-shrinkage": tuned.als_count_shrinkage}, False),
        ("plain + catalog warm start", {**plain, "init": "catalog"}, False),
        ("the experiment's setting", {}, True),
        ("setting, 1 round (the popularity release alone)", {"num-rounds": 1}, True),
        ("setting, 2 rounds (popularity, 1 of statistics)", {"num-rounds": 2}, True),
        ("setting, 4 rounds (popularity, 3 of statistics)", {"num-rounds": 4}, True),
        ("setting, clip 0.1", {"als-user-clip": 0.1}, True),
        ("setting, clip 0.5", {"als-user-clip": 0.5}, True),
        ("setting, catalog prior " + ("off" if tuned.als_catalog_prior else f"on (all tags, weight {tuned.als_catalog_prior_weight:g})"),
         {"als-catalog-prior": not tuned.als_catalog_prior}, True),
        (f"setting, catalog prior on (weight {tuned.als_catalog_prior_weight:g}), one category per ad instead of all tags",
         {"als-catalog-prior": True}, True, True),
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
        runs = [run(cfg, shards, dataset.catalog, args.epsilon, seed, average, category_only) for seed in range(args.seeds)]
        seconds = (time.perf_counter() - started) / args.seeds
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {med['ndcg10_sampled']:.4f} | {med['hr10_sampled']:.4f} | {med['ndcg10_full']:.4f} | {seconds:.1f} |", flush=True)
    return 0


def _prior_weights(setting: dict[str, Any], dataset: Any, shards: list[NodeData], epsilon: float, seeds: int, weights: list[float]) -> int:
    """Plain and secure at `epsilon`: the catalog prior off, then on at each weight."""
    print(f"{date.today()} on {platform.node()}: {setting['dataset']}, 5 IID shards, epsilon {epsilon:g}, median of {seeds} noise "
          "seeds; secure: each merchant adds a quarter of the variance (t = 4 of 5)")
    print("| epsilon | mode | catalog prior | NDCG@10 sampled | HR@10 sampled | NDCG@10 full |")
    print("|---|---|---|---|---|---|")
    for mode, share in (("plain", 1.0), ("secure", 0.25)):
        for weight in [None, *weights]:
            overrides = {"als-catalog-prior": False} if weight is None else {"als-catalog-prior": True, "als-catalog-prior-weight": weight}
            cfg = RunConfig.from_flower({**setting, **overrides})
            runs = [run(cfg, shards, dataset.catalog, epsilon, seed, noise_share=share) for seed in range(seeds)]
            med = {k: statistics.median(r[k] for r in runs) for k in ("ndcg10_sampled", "hr10_sampled", "ndcg10_full")}
            print(f"| {epsilon:g} | {mode} | {'off' if weight is None else f'weight {weight:g}'} | {med['ndcg10_sampled']:.4f} | "
                  f"{med['hr10_sampled']:.4f} | {med['ndcg10_full']:.4f} |", flush=True)
    return 0


def _content_weights(cfg: RunConfig, dataset: Any, shards: list[NodeData], epsilons: list[float], seeds: int,
                     blends: list[ContentBlend | None], exact_rounds: int) -> int:
    """The same trained models (without DP; at each epsilon plain and secure, `seeds` noise draws),
    each ranked by the model alone and with each blend of content affinity; and the DP-popularity
    floor. Medians over the draws."""
    print(f"{date.today()} on {platform.node()}: {cfg.dataset}, 5 IID shards; private: {cfg.num_rounds} releases, median of {seeds} "
          f"noise seeds, secure: each merchant adds a quarter of the variance (t = 4 of 5); no DP: {exact_rounds} rounds of exact ALS")
    print("| epsilon | mode | ranking | NDCG@10 sampled | HR@10 sampled | NDCG@10 full |")
    print("|---|---|---|---|---|---|")
    keys = ("ndcg10_sampled", "hr10_sampled", "ndcg10_full")

    def show(epsilon: str, mode: str, runs: list[dict[ContentBlend | None, dict[str, float]]]) -> None:
        for blend in blends:
            med = {k: statistics.median(r[blend][k] for r in runs) for k in keys}
            name = "model alone" if blend is None else f"content affinity {blend.weight:g}, half-life {blend.halflife:g}"
            print(f"| {epsilon} | {mode} | {name} | {med['ndcg10_sampled']:.4f} | {med['hr10_sampled']:.4f} | {med['ndcg10_full']:.4f} |", flush=True)

    exact = cfg.with_values("content sweep, no DP", privacy="none", num_rounds=exact_rounds)
    arrays, _ = federated_als.train(exact, dataset.catalog, shards)
    solvers, rng = [ALSSolver(exact, data) for data in shards], np.random.default_rng(exact.seed)
    show("-", "none", [{blend: evaluate(arrays, solvers, rng, blend) for blend in blends}])
    for epsilon in epsilons:
        for mode, share in (("plain", 1.0), ("secure", 0.25)):
            runs = []
            for seed in range(seeds):
                arrays, solvers, rng, _ = train(cfg, shards, dataset.catalog, epsilon, seed, noise_share=share)
                runs.append({blend: evaluate(arrays, solvers, rng, blend) for blend in blends})
            show(f"{epsilon:g}", mode, runs)
        floors = [dp_popularity(cfg, dataset, len(shards), [epsilon])[f"{epsilon:g}"] for _ in range(seeds)]
        print(f"| {epsilon:g} | dp-popularity | popularity | {statistics.median(f['ndcg10_sampled'] for f in floors):.4f} | "
              f"{statistics.median(f['hr10_sampled'] for f in floors):.4f} | {statistics.median(f['ndcg10_full'] for f in floors):.4f} |", flush=True)
    return 0


def _popularity_rule(cfg: RunConfig, dataset: Any, shards: list[NodeData], epsilons: list[float], seeds: int, leans: list[float]) -> int:
    """At each epsilon, plain and secure: the popularity rule's signal, the personal model forced
    (min-signal 0) at each lean, the rule's own choice, and the DP-popularity floor."""
    print(f"{date.today()} on {platform.node()}: {cfg.dataset}, 5 IID shards, {cfg.num_rounds} rounds (a popularity release "
          f"and {cfg.num_rounds - 1} of statistics), median of {seeds} noise seeds; secure: each merchant adds a quarter of the "
          "variance (t = 4 of 5); dp-popularity: each merchant adds its full noise, the whole budget on counts")
    print("| epsilon | mode | signal | model, lean " + " | model, lean ".join(f"{lean:g}" for lean in leans)
          + " | the rule's choice | dp-popularity |")
    print("|---" * (5 + len(leans)) + "|")
    for epsilon in epsilons:
        floors = [dp_popularity(cfg, dataset, len(shards), [epsilon])[f"{epsilon:g}"] for _ in range(seeds)]
        floor = {k: statistics.median(f[k] for f in floors) for k in ("ndcg10_sampled", "ndcg10_full")}
        for mode, share in (("plain", 1.0), ("secure", 0.25)):
            cells = []
            signal = math.nan
            for lean in [*leans, None]:
                # a lean: the personal model forced (min-signal 0) with it; None: the shipped rule
                runs = [run(cfg, shards, dataset.catalog, epsilon, seed, noise_share=share, min_signal=None if lean is None else 0.0,
                            lean=lean) for seed in range(seeds)]
                signal = statistics.median(r["signal"] for r in runs)
                med = {k: statistics.median(r[k] for r in runs) for k in ("ndcg10_sampled", "ndcg10_full")}
                cells.append(f"{med['ndcg10_sampled']:.4f} / {med['ndcg10_full']:.4f}")
            print(f"| {epsilon:g} | {mode} | {signal:.1f} | " + " | ".join(cells)
                  + f" | {floor['ndcg10_sampled']:.4f} / {floor['ndcg10_full']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
