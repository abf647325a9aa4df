"""One-run privacy audit (Steinke, Nasr and Jagielski, NeurIPS 2023) of private ALS and DP-SGD on
MovieLens-100K at epsilon 1, 4 and 8 and without DP (issue 13).

    .venv/bin/python benchmarks/privacy_audit.py [--canaries 500] [--epsilons 1 4 8] [--output DIR]

Runs `python -m simulations.audit experiments/ml100k.toml` (the experiment's settings: 5 IID
merchants, 20 rounds for DP-SGD and the non-private runs, 2 releases for private ALS) with m
canary users, reading MovieLens from ../shared/data (a clean exit when it is absent; the
augmented dataset goes to the audit's folder under outputs/, never into the repository).
Writes benchmarks/results/audit.json, a list of flat records (solver, dataset, dp, epsilon
(the claim; null without DP), canaries, epsilon_lower_bound, plus scalars: guesses, correct,
delta, the most m canaries can show, wall seconds, ...), and prints a Markdown table for
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from simulations import PROJECT_ROOT
from simulations.audit.command import DEFAULT_CANARIES, default_output, run_audit
from simulations.audit.figures import markdown_table
from simulations.experiment import load_experiment

EXPERIMENT = PROJECT_ROOT / "experiments" / "ml100k.toml"
MOVIELENS = PROJECT_ROOT.parent / "shared" / "data" / "movielens" / "ml-100k"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "audit.json"


def flat(record: dict[str, Any]) -> dict[str, Any]:
    """The record's scalar fields only, the required keys first."""
    first = ("solver", "dataset", "dp", "epsilon", "canaries", "epsilon_lower_bound")
    scalars = {k: v for k, v in record.items() if v is None or isinstance(v, (bool, int, float, str))}
    return {**{k: scalars[k] for k in first}, **{k: v for k, v in scalars.items() if k not in first}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canaries", type=int, default=DEFAULT_CANARIES)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--output", type=Path, default=None, help="audit folder (default outputs/experiments/ml100k/audit)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (MOVIELENS / "u.data").is_file():
        print(f"MovieLens-100K is not at {MOVIELENS}: nothing to benchmark (see ../shared/data/PROVENANCE.md)")
        return 0
    output = (args.output or default_output(load_experiment(EXPERIMENT))).resolve()
    started = time.perf_counter()
    records = run_audit(EXPERIMENT, output, args.canaries, ["als", "sgd"], args.epsilons, non_private=True)
    wall = time.perf_counter() - started
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps([flat(r) for r in records], indent=2) + "\n")
    print(f"\n{date.today()} on {platform.node()} ({platform.machine()}, python {sys.version.split()[0]}): "
          f"{EXPERIMENT.name}, {args.canaries} canaries, whole audit {wall / 60:.1f} min; outputs in {output}\n")
    print(markdown_table(records))
    print(f"\nrecords: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
