"""ALS statistics without np.add.at (issue 16): one ALS round, before and after, centralized and federated.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/als_speed.py [--users 35000 --ads 12000 --rows 300000 --factors 32]

A synthetic shard of random rows of the reported shape (35k users, 12k ads with Zipf
popularity, 300k rows, half of them positives; duplicate (user, ad) rows occur, as the
statistics must allow). One ALS round is the user step (shared/als.solve_users), the ad-step
statistics (ad_statistics) and the server's solve (solve_ads, through ALSAggregation.solve for
the federated round), as simulations/baselines.train_alone and a Flower round run them:
- centralized: all users at once, without DP, so per-ad Gramians (ALSSettings.from_config);
- federated: the same users cut at random into 5 shards, each shard's user step and statistics
  in turn in this process, then the server's sum and solve; with per-ad Gramians (the same
  statistics as the centralized run), and with the shared Gramian that private ALS releases
  (its statistics before noise: the noise costs nothing measurable).
"Before" is the code this issue replaced (np.add.at scatter-adds of per-row outer products),
copied below; "after" is shared/als.py. Prints the median over --repeats of each phase, the
speedups and the centralized / federated ratios, and checks that before and after agree.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a site-packages `benchmarks` shadows this folder

from server.als_aggregation import ALSAggregation
from shared.als import PRIVATE_ALPHA0, ALSSettings, Rows, ad_statistics, augmented, solve_ads, solve_users
from shared.config import RunConfig
from shared.wire import ALS_COUNT, ALS_GRAM, ALS_POSITIVES, ALS_TARGET, ALS_USER_GRAM, Arrays, from_array_record

UserStep = Callable[[Rows, np.ndarray, np.ndarray, float, float], np.ndarray]
Statistics = Callable[[Rows, np.ndarray, int, ALSSettings], dict[str, np.ndarray]]

# --- before issue 16: shared/als.py's scatter-adds, verbatim but for the names -------------------

OLD_CHUNK_ROWS = 200_000


def _old_chunks(total: int) -> Iterator[slice]:
    for start in range(0, total, OLD_CHUNK_ROWS):
        yield slice(start, start + OLD_CHUNK_ROWS)


def old_solve_users(rows: Rows, ad_factors: np.ndarray, ad_bias: np.ndarray, alpha0: float, user_l2: float) -> np.ndarray:
    q = ad_factors.astype(np.float64)
    b = ad_bias.astype(np.float64)
    dim = q.shape[1]
    base = alpha0 * q.T @ q + user_l2 * np.eye(dim)
    rhs = np.tile(-alpha0 * (q.T @ b), (rows.num_users, 1))
    lhs = np.tile(base, (rows.num_users, 1, 1))
    for part in _old_chunks(len(rows.user)):
        users, ads = rows.user[part], rows.ad[part]
        q_rows = q[ads]
        np.add.at(lhs, users, q_rows[:, :, None] * q_rows[:, None, :])
        np.add.at(rhs, users, (rows.label[part] - b[ads])[:, None] * q_rows)
    solved: np.ndarray = np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]
    return solved


def old_ad_statistics(rows: Rows, user_factors: np.ndarray, num_ads: int, settings: ALSSettings) -> dict[str, np.ndarray]:
    p_aug = augmented(user_factors, settings.user_clip, settings.clip)
    weight = rows.user_weights(settings.max_rows)
    dim = p_aug.shape[1]
    weighted = p_aug * weight[:, None]
    stats: Arrays = {ALS_USER_GRAM: weighted.T @ p_aug, ALS_TARGET: np.zeros((num_ads, dim - 1))}
    row_weight = weight[rows.user]
    np.add.at(stats[ALS_TARGET], rows.ad, (row_weight * rows.label)[:, None] * p_aug[rows.user, :-1])
    stats[ALS_POSITIVES] = np.bincount(rows.ad, weights=row_weight * rows.label, minlength=num_ads)
    if settings.gram_mode == "per-ad":
        gram = np.zeros((num_ads, dim, dim))
        for part in _old_chunks(len(rows.user)):
            vec = p_aug[rows.user[part]]
            np.add.at(gram, rows.ad[part], row_weight[part, None, None] * vec[:, :, None] * vec[:, None, :])
        stats[ALS_GRAM] = gram
    else:
        stats[ALS_COUNT] = np.bincount(rows.ad, weights=row_weight, minlength=num_ads)
    return stats


# --- the data and the rounds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    name: str
    user_step: UserStep
    statistics: Statistics


BEFORE = Code("before (np.add.at)", old_solve_users, old_ad_statistics)
AFTER = Code("after (sparse products)", solve_users, ad_statistics)
PHASES = ("user step", "statistics", "server solve", "round")


def random_rows(users: int, ads: int, rows: int, rng: np.random.Generator) -> Rows:
    """Every user has a row; ads drawn by Zipf popularity, so popular (user, ad) pairs repeat."""
    user = np.concatenate([np.arange(users), rng.integers(users, size=rows - users)])
    popularity = 1.0 / np.arange(1, ads + 1) ** 0.9
    ad = rng.choice(ads, size=rows, p=popularity / popularity.sum())
    label = (rng.random(rows) < 0.5).astype(np.float64)
    order = np.argsort(user, kind="stable")
    return Rows(user[order], ad[order].astype(np.int64), label[order], users)


def shards_of(rows: Rows, count: int, rng: np.random.Generator) -> list[Rows]:
    """The users dealt at random into `count` shards, each shard's users renumbered from 0."""
    shard_of_user = rng.integers(count, size=rows.num_users)
    shards = []
    for shard in range(count):
        members = np.flatnonzero(shard_of_user == shard)
        keep = shard_of_user[rows.user] == shard
        shards.append(Rows(np.searchsorted(members, rows.user[keep]), rows.ad[keep], rows.label[keep], len(members)))
    return shards


def _alpha0(settings: ALSSettings) -> float:
    return settings.alpha0 if settings.alpha0 is not None else PRIVATE_ALPHA0


def centralized_round(code: Code, rows: Rows, ads: Arrays, settings: ALSSettings) -> tuple[dict[str, float], Arrays]:
    """simulations/baselines.train_alone's round: the solver's user step, statistics and solve_alone."""
    started = time.perf_counter()
    factors = code.user_step(rows, ads["ad_factors"], ads["ad_bias"], _alpha0(settings), settings.user_l2).astype(np.float32)
    users_done = time.perf_counter()
    stats = code.statistics(rows, factors, len(ads["ad_bias"]), settings)
    stats_done = time.perf_counter()
    solved = solve_ads(stats, settings)
    finished = time.perf_counter()
    return _phases(started, users_done, stats_done, finished), solved


def federated_round(code: Code, shards: list[Rows], ads: Arrays, settings: ALSSettings) -> tuple[dict[str, float], Arrays]:
    """Each client's user step and statistics in turn, then the server's sum and solve."""
    num_ads, dim = ads["ad_factors"].shape
    user_seconds = stats_seconds = 0.0
    replies = []
    for shard in shards:
        started = time.perf_counter()
        factors = code.user_step(shard, ads["ad_factors"], ads["ad_bias"], _alpha0(settings), settings.user_l2).astype(np.float32)
        users_done = time.perf_counter()
        replies.append(code.statistics(shard, factors, num_ads, settings))
        user_seconds += users_done - started
        stats_seconds += time.perf_counter() - users_done
    server = ALSAggregation(settings, num_ads, dim)
    started = time.perf_counter()
    total: Arrays = {key: value.copy() for key, value in replies[0].items()}
    for reply in replies[1:]:
        for key in total:
            total[key] += reply[key]
    record, _ = server.solve(total, [{} for _ in replies])
    solve_seconds = time.perf_counter() - started
    timings = {"user step": user_seconds, "statistics": stats_seconds, "server solve": solve_seconds}
    return {**timings, "round": sum(timings.values())}, from_array_record(record)


def _phases(started: float, users_done: float, stats_done: float, finished: float) -> dict[str, float]:
    return {"user step": users_done - started, "statistics": stats_done - users_done,
            "server solve": finished - stats_done, "round": finished - started}


def median_timings(run: Callable[[], tuple[dict[str, float], Arrays]], repeats: int) -> tuple[dict[str, float], Arrays]:
    runs = [run() for _ in range(repeats)]
    return {phase: statistics.median(timing[phase] for timing, _ in runs) for phase in PHASES}, runs[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=35_000)
    parser.add_argument("--ads", type=int, default=12_000)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = random_rows(args.users, args.ads, args.rows, rng)
    shards = shards_of(rows, args.shards, rng)
    ads: Arrays = {"ad_factors": rng.normal(0.0, 0.1, size=(args.ads, args.factors)).astype(np.float32),
                   "ad_bias": rng.normal(0.0, 0.1, size=args.ads).astype(np.float32)}
    # a fixed alpha0 (the default "auto" reads the density): both code paths then solve the same system
    exact = ALSSettings.from_config(RunConfig.from_flower({"privacy": "none", "factors": args.factors, "als-alpha0": PRIVATE_ALPHA0,
                                                           "als-gram": "per-ad"}))  # dense: the old code's layout
    private = ALSSettings.from_config(RunConfig.from_flower({"privacy": "user", "factors": args.factors}))
    assert exact.gram_mode == "per-ad" and private.gram_mode == "shared"
    pairs = rows.user * args.ads + rows.ad
    print(f"{date.today()} {platform.node()} {platform.machine()}: {rows.num_users} users, {args.ads} ads, "
          f"{len(rows.user)} rows ({len(pairs) - len(np.unique(pairs))} duplicates), d={args.factors}, "
          f"{args.shards} shards, median of {args.repeats}", flush=True)

    central = "centralized, per-ad Gramians"
    setups: dict[str, Callable[[Code], tuple[dict[str, float], Arrays]]] = {
        central: lambda code: centralized_round(code, rows, ads, exact),
        f"federated, {args.shards} shards, per-ad Gramians": lambda code: federated_round(code, shards, ads, exact),
        f"federated, {args.shards} shards, shared Gramian (private's statistics)":
            lambda code: federated_round(code, shards, ads, private),
    }
    cells = {(code.name, setup): (lambda run=run, code=code: run(code)) for setup, run in setups.items() for code in (BEFORE, AFTER)}
    results: dict[tuple[str, str], dict[str, float]] = {}
    solved: dict[tuple[str, str], Arrays] = {}
    for key, run in cells.items():
        results[key], solved[key] = median_timings(run, args.repeats)
        print(f"  {key[0]:24} {key[1]:58} round {results[key]['round']:7.2f} s", flush=True)
    for setup in setups:
        before, after = solved[(BEFORE.name, setup)], solved[(AFTER.name, setup)]
        drift = max(float(np.max(np.abs(before[k] - after[k])) / np.max(np.abs(before[k]))) for k in before)
        assert drift < 1e-4, (setup, drift)  # float32 ad parameters: agreement to their precision

    print("\n| code | setup | " + " | ".join(f"{phase} s" for phase in PHASES) + " |")
    print("|---|---|" + "---:|" * len(PHASES))
    for (code_name, setup), timing in results.items():
        print(f"| {code_name} | {setup} | " + " | ".join(f"{timing[phase]:.2f}" for phase in PHASES) + " |")
    central_round = {code.name: results[(code.name, central)]["round"] for code in (BEFORE, AFTER)}
    print(f"\ncentralized round speedup (before / after): {central_round[BEFORE.name] / central_round[AFTER.name]:.1f}x")
    for setup in [setup for setup in setups if setup != central]:
        for code in (BEFORE, AFTER):
            print(f"{code.name}: centralized / {setup}: {central_round[code.name] / results[(code.name, setup)]['round']:.2f}")

if __name__ == "__main__":
    main()
