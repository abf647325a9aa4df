"""The closed loop of ad delivery on the default synthetic world: CTR, conversions, A/B uplift, exposure.

    .venv/bin/python benchmarks/delivery.py [--experiment experiments/delivery.toml] [--output DIR]

Runs the experiment file's delivery loop (simulations/delivery/__main__.py: the default synthetic
market, 5 merchants of unequal size, 2,000 users, 600 ads; 20 rounds of delivery, the global model
retrained every 5, without DP and with private ALS at each [sweep] epsilon, each merchant's ledger
spending its budget over the releases) and prints its tables: per policy CTR, CVR (purchases per
impression), revenue per mille and exposure Gini over ads and advertisers; the uplift of federated
over local-only, popularity and random with 95% intervals and p-values (user-level delta method),
per merchant over local-only; CTR per round.

Writes benchmarks/results/delivery.json: flat records with policy, epsilon (null: no DP), ctr,
cvr, uplift_vs (null on a policy's own row), uplift, ci_low, ci_high, p_value, and metric
(ctr | cvr), merchant (null: all), users, rpm, exposure_gini, advertiser_gini, ad_coverage,
small_advertiser_coverage (share of the ads of the quarter of advertisers with fewest ads shown at least once).
The run folder keeps the report (report.html, plots/).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_file import write_records  # noqa: E402

from simulations.delivery.__main__ import run_delivery  # noqa: E402
from simulations.delivery.report import format_cell  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "delivery.json"
KEYS = ("policy", "epsilon", "merchant", "users", "ctr", "cvr", "rpm", "uplift_vs", "metric", "uplift", "ci_low", "ci_high", "p_value",
        "exposure_gini", "advertiser_gini", "ad_coverage", "small_advertiser_coverage")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "delivery.toml")
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): {args.experiment}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedads-delivery-") as scratch:
        measured = run_delivery(args.experiment, args.output or Path(scratch))
    print(f"whole benchmark {time.perf_counter() - started:.0f} s")
    for epsilon in dict.fromkeys(r["epsilon"] for r in measured["rounds"]):
        for policy in dict.fromkeys(r["policy"] for r in measured["rounds"]):
            ctr = [r["ctr"] for r in measured["rounds"] if r["policy"] == policy and r["epsilon"] == epsilon and r["merchant"] is None]
            print(f"CTR by round, {policy}, epsilon {epsilon}: " + " ".join(format_cell(c) for c in ctr))
    records = [{k: r.get(k) for k in KEYS} for r in measured["policies"] + measured["uplifts"]]
    print("| " + " | ".join(KEYS) + " |\n|" + "---|" * len(KEYS))
    for r in records:
        print("| " + " | ".join(format_cell(r[k]) for k in KEYS) + " |")
    write_records(args.results, records)
    print(f"records: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
