"""DP overhead of a merchant's whole ad step, as a round runs it: private vs non-private release.

    .venv/bin/python benchmarks/release_overhead.py [--datasets ml100k beauty] [--models neumf ...] [--repeats 5]

benchmarks/dp_overhead.py times the local epoch alone; a merchant's round does more under DP: the
Opacus engine's set-up, the DP epoch, and the persistent ledger's accounting (checking the release
fits the budget, then reporting the epsilon spent). This times `release_update` of the merchant's
privacy plan (client/privacy/registry.open_plan), exactly what the ClientApp runs per training
message, for one IID shard (1 of 5) of each data set's shipped experiment cell at the shipped
DP settings (dp-sample-rate 0.25, clip 0.1, epsilon 8 over the run), against the same shard's
non-private release (one local epoch at batch-users). Rounds are interleaved (private, then
non-private, on the same global model and users); the table reports medians over repeats and the
median of the per-repeat ratios. The first private round of a state directory also calibrates the
noise: it is timed apart ("first round") and left out of the medians.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

from neural import model_config  # noqa: E402

from client.privacy.registry import open_plan  # noqa: E402
from client.solvers.registry import solver_for  # noqa: E402
from shared.data.sources import load_dataset  # noqa: E402
from shared.params import initial_model  # noqa: E402
from shared.privacy_policy import PrivacyPolicy  # noqa: E402
from simulations.baselines import shard_data  # noqa: E402

MERCHANTS = 5


def time_releases(dataset_name: str, model: str, repeats: int) -> dict[str, float]:
    """Seconds of the private and non-private releases of one merchant, `repeats` rounds each."""
    private_cfg = model_config(dataset_name, model, 8.0, repeats + 1)
    plain_cfg = model_config(dataset_name, model, None, repeats + 1)
    dataset = load_dataset(plain_cfg)
    data = [d for _, d in shard_data(plain_cfg, dataset, MERCHANTS)][0]
    solvers = {"dp": solver_for(private_cfg, data), "plain": solver_for(plain_cfg, data)}
    arrays = initial_model(plain_cfg, dataset.catalog)
    rng = np.random.default_rng(0)
    users = solvers["plain"].fit_users(arrays, rng, None)
    times: dict[str, list[float]] = {"dp": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="fedads-release-") as folder:
        for server_round in range(1, repeats + 2):
            for side, cfg in (("dp", private_cfg), ("plain", plain_cfg)):
                plan = open_plan(cfg, PrivacyPolicy.for_simulation(cfg), data.num_users, Path(folder) / side)
                started = time.perf_counter()
                plan.release_update("merchant-0", solvers[side], arrays, users, np.random.default_rng(server_round), server_round)
                times[side].append(time.perf_counter() - started)
    first = times["dp"].pop(0), times["plain"].pop(0)
    return {
        "users": float(data.num_users),
        "first_dp": first[0],
        "first_plain": first[1],
        "dp": statistics.median(times["dp"]),
        "plain": statistics.median(times["plain"]),
        "ratio": statistics.median(a / b for a, b in zip(times["dp"], times["plain"])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml100k", "beauty"])
    parser.add_argument("--models", nargs="+", default=["neumf", "neumf-content", "mf-sgd"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("fedads").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    print(f"{date.today()} on {platform.node()} ({platform.machine()}, 1 torch thread): {args.repeats} interleaved rounds, "
          f"1 of {MERCHANTS} IID shards, epsilon 8, the shipped DP settings")
    print("| data | model | users | first round DP / non-DP s | DP s/round | non-DP s/round | DP / non-DP |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets:
        for model in args.models:
            try:
                r = time_releases(name, model, args.repeats)
            except FileNotFoundError as missing:
                print(f"| {name} | skipped: {missing} |")
                break
            print(f"| {name} | {model} | {r['users']:.0f} | {r['first_dp']:.2f} / {r['first_plain']:.2f} | {r['dp']:.3f} | "
                  f"{r['plain']:.3f} | **{r['ratio']:.2f}** |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
