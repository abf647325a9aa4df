"""One poisoning merchant of five: what the reply bounds and the robust option leave of its attack.

    .venv/bin/python benchmarks/poisoning.py [--rounds 5] [--epsilon 8]

Federated ALS in-process with the very code of a Flower run (each shard's ALS solver computes
its statistics, noised as client/privacy/private_als.py does under DP; the server's screen,
server/round_loop.RoundLoop, drops what the protocol does not allow; server/als_aggregation
sums and solves), on MovieLens-100K from ../shared/data, 5 IID shards. Merchant 0 poisons
every round's reply with one attack (the fault-and-attack probe's, issue 14), once with the
default aggregation (bounds only: `poison-plain`) and once with `robust-aggregation = "median"`
(`poison-robust`), without DP and with private ALS at one epsilon. Reports the final NDCG@10
(sampled and full) against the clean run's, the replies dropped, and the share of users whose
top-1 ad is the promoted one (attack `promote-ad`).

Writes benchmarks/results/poisoning.json: flat records with scenario, attack, dp, epsilon,
rounds_planned, rounds_completed, replies_dropped, final_ndcg10_sampled, clean_ndcg10_sampled,
final_ndcg10_full, clean_ndcg10_full, promoted_top1_share.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a site-packages `benchmarks` shadows this folder

from flwr.app import ConfigRecord, Message, RecordDict

from client.node_data import NodeData
from client.solvers.als import ALSSolver
from server.round_loop import RoundLog, RoundLoop
from server.strategies import build_strategy
from shared.accounting import calibrate_noise_multiplier
from shared.als import SPARSE_PER_AD, ALSSettings, add_noise, popularity_statistics, release_budget_shares
from shared.config import RunConfig
from shared.data.sources import load_catalog, load_dataset
from shared.flower_internals import server_identity
from shared.metrics import NUM_TEST_USERS
from shared.params import global_shapes, initial_arrays
from shared.privacy_policy import PrivacyPolicy
from shared.wire import (
    AD_BIAS,
    AD_FACTORS,
    ALS_ADS,
    ALS_POSITIVES,
    ALS_TARGET,
    CONFIG,
    POPULARITY,
    SERVER_ROUND,
    Arrays,
    PrivacyReport,
    TrainReply,
    from_array_record,
)
from simulations.baselines import shard_data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "poisoning.json"
MERCHANTS = 5
Attack = Callable[[Arrays, int], Arrays]


def _promote(stats: Arrays, ad: int) -> Arrays:
    """One ad made to look loved by many users like everyone: its positives and its target
    (along the merchant's mean target direction) inflated to 20x the largest ad's."""
    out = {k: v.copy() for k, v in stats.items()}
    row = ad
    if ALS_ADS in out:  # a sparse release (no DP): the ad's row, added if the merchant's rows never touched it
        row = int(np.searchsorted(out[ALS_ADS], ad))
        if row == len(out[ALS_ADS]) or out[ALS_ADS][row] != ad:
            out = {k: np.insert(v, row, 0, axis=0) if k in SPARSE_PER_AD else v for k, v in out.items()}
            out[ALS_ADS] = np.insert(stats[ALS_ADS], row, ad)
    if ALS_TARGET in stats:  # a private run's statistics rounds; its popularity rounds carry the positives alone
        direction = stats[ALS_TARGET].sum(axis=0)
        direction /= max(float(np.linalg.norm(direction)), 1e-12)
        out[ALS_TARGET][row] = 20 * float(np.linalg.norm(stats[ALS_TARGET], axis=1).max()) * direction
    if ALS_POSITIVES in stats:
        out[ALS_POSITIVES][row] = 20 * float(stats[ALS_POSITIVES].max())
    return out


def _scaled(stats: Arrays, factor: float) -> Arrays:
    """Every statistic times `factor`; a sparse release's ad indices kept (they are not statistics)."""
    return {k: v if k == ALS_ADS else v * np.float32(factor) for k, v in stats.items()}


ATTACKS: dict[str, Attack] = {
    "target-x1e6": lambda s, ad: {**s, ALS_TARGET: s[ALS_TARGET] * np.float32(1e6)} if ALS_TARGET in s else s,
    "all-x-50": lambda s, ad: _scaled(s, -50),
    "all-x100": lambda s, ad: _scaled(s, 100),
    "promote-ad": _promote,
}


def _reply(stats: Arrays, sigma: float, server_round: int, node: int) -> Message:
    request = Message(content=RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: server_round})}), dst_node_id=node, message_type="train")
    return TrainReply(f"merchant-{node}", stats, None, privacy=PrivacyReport(0.0, sigma)).to_message(request)


def run(cfg: RunConfig, shards: list[NodeData], catalog: Any, attack: Attack | None, promoted: int, seed: int) -> dict[str, float]:
    settings = ALSSettings.from_config(cfg)
    solvers = [ALSSolver(cfg, data) for data in shards]
    private = cfg.privacy == "user"
    shares = release_budget_shares(cfg.num_rounds, cfg.als_budget_growth)
    sigma = calibrate_noise_multiplier(cfg.target_epsilon, PrivacyPolicy.for_simulation(cfg).delta_for(cfg), 1.0, steps=1) if private else 0.0
    strategy, _ = build_strategy(cfg, MERCHANTS, catalog)
    loop = RoundLoop(strategy, grid=None, shapes=global_shapes(cfg, len(catalog)))  # type: ignore[arg-type]
    arrays = initial_arrays(cfg.init, catalog, cfg.factors, cfg.seed)
    rng = np.random.default_rng(seed)
    dropped = 0
    for server_round in range(1, cfg.num_rounds + 1):
        sigma_r = sigma / math.sqrt(shares[server_round - 1]) if private else 0.0
        replies = []
        release, arrays = strategy.begin_round(server_round, arrays)  # type: ignore[attr-defined]  # ALSAggregation
        for node, solver in enumerate(solvers):
            if release == POPULARITY:
                stats = popularity_statistics(solver.data.rows, solver.data.num_ads, settings.max_rows)
            else:
                stats = solver.local_update(arrays, solver.fit_users(arrays, rng, None), rng).arrays
                stats = {key: stats[key] for key in settings.release_keys(release)}
            if private:
                stats = add_noise(stats, settings.noise_stds(sigma_r, release), rng)
            if node == 0 and attack is not None:
                stats = attack(stats, promoted)
            replies.append(_reply(stats, sigma_r, server_round, node + 1))
        kept = loop._train_replies(server_round, replies, RoundLog())
        dropped += len(replies) - len(kept)
        aggregated, _ = strategy.aggregate_train(server_round, kept)
        assert aggregated is not None
        arrays = from_array_record(aggregated)
    results, top1, users = [], 0, 0
    for solver in solvers:
        factors = solver.fit_users(arrays, rng, None)
        results.append(solver.data.evaluate(arrays, factors, None))  # the model alone: what poisoning moves
        scores = factors @ arrays[AD_FACTORS].T + arrays[AD_BIAS]
        top1 += int((scores.argmax(axis=1) == promoted).sum())
        users += len(factors)
    weights = np.array([r[NUM_TEST_USERS] for r in results])
    out = {k: float(np.dot([r[k] for r in results], weights) / weights.sum()) for k in ("ndcg10_sampled", "ndcg10_full")}
    return {**out, "replies_dropped": dropped, "promoted_top1_share": top1 / users, "finite": bool(np.all(np.isfinite(arrays[AD_FACTORS])))}


def main() -> int:
    with server_identity():  # the identity Flower's runtime gives the side that builds messages
        return _main()


def _main() -> int:
    logging.getLogger("flwr").setLevel(logging.ERROR)  # the strategy's per-round lines and the screen's warnings
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of federated ALS without DP")
    parser.add_argument("--epsilon", type=float, default=8.0, help="private ALS (3 releases: popularity, then 2 of statistics) at this epsilon")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = {"dataset": "movielens-100k", "data-path": str(DATA / "movielens" / "ml-100k"), "partitioning": "iid", "factors": 32,
            "max-users-per-merchant": 100_000}  # private ALS with the shipped defaults
    settings = {
        "none": {**base, "privacy": "none", "num-rounds": args.rounds},
        "user": {**base, "privacy": "user", "num-rounds": 3, "target-epsilon": args.epsilon},
    }
    first = RunConfig.from_flower(settings["none"])
    catalog = load_catalog(first)
    shards = [data for _, data in shard_data(first, load_dataset(first), MERCHANTS)]
    positives = sum(np.bincount(data.split.pos_ads, minlength=len(catalog)) for data in shards)
    promoted = int(np.argsort(positives)[len(catalog) // 2])  # a middling ad, not already a top-1
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): MovieLens-100K, {MERCHANTS} IID shards, merchant 0 poisons; "
          f"no DP {args.rounds} rounds; private ALS epsilon {args.epsilon:g}, 3 rounds (popularity, then 2 of statistics); "
          f"promoted ad index {promoted}")
    print("| dp | attack | aggregation | NDCG@10 sampled (clean) | NDCG@10 full (clean) | replies dropped | promoted ad top-1 share | finite | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    records: list[dict[str, Any]] = []
    for privacy, values in settings.items():
        for robust in ("none", "median"):
            cfg = RunConfig.from_flower({**values, "robust-aggregation": robust})
            clean = run(cfg, shards, catalog, None, promoted, seed=0)
            print(f"| {privacy} | clean | {robust} | {clean['ndcg10_sampled']:.4f} | {clean['ndcg10_full']:.4f} | 0 | "
                  f"{clean['promoted_top1_share']:.4f} | yes | - |")
            for name, attack in ATTACKS.items():
                started = time.perf_counter()
                got = run(cfg, shards, catalog, attack, promoted, seed=0)
                seconds = time.perf_counter() - started
                print(f"| {privacy} | {name} | {robust} | {got['ndcg10_sampled']:.4f} ({clean['ndcg10_sampled']:.4f}) | "
                      f"{got['ndcg10_full']:.4f} ({clean['ndcg10_full']:.4f}) | {got['replies_dropped']} | {got['promoted_top1_share']:.4f} | "
                      f"{'yes' if got['finite'] else 'NO'} | {seconds:.0f} |", flush=True)
                records.append({
                    "scenario": "poison-robust" if robust == "median" else "poison-plain", "attack": name,
                    "dp": privacy == "user", "epsilon": args.epsilon if privacy == "user" else None,
                    "rounds_planned": cfg.num_rounds, "rounds_completed": cfg.num_rounds, "replies_dropped": got["replies_dropped"],
                    "final_ndcg10_sampled": got["ndcg10_sampled"], "clean_ndcg10_sampled": clean["ndcg10_sampled"],
                    "final_ndcg10_full": got["ndcg10_full"], "clean_ndcg10_full": clean["ndcg10_full"],
                    "promoted_top1_share": got["promoted_top1_share"], "clean_promoted_top1_share": clean["promoted_top1_share"],
                })
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(records, indent=2) + "\n")
    print(f"\nrecords: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
