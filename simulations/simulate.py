"""The main job: a federated simulation on the embedded synthetic market, with a metrics table.

    python -m simulations.simulate [--rounds N] [--clients N] [--output DIR] [-c key=value ...]

Runs the same ServerApp and ClientApp as a deployment through Flower's simulation runtime,
then prints the per-round metrics table and where results, checkpoints and the model are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from server import report
from shared.config import ConfigError, RunConfig, parse_override
from simulations import PROJECT_ROOT
from simulations.experiment import simulated_merchants
from simulations.runtime import SimulationError, run_simulation


def _override(text: str) -> tuple[str, Any]:
    try:
        return parse_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5, help="simulated merchants (SuperNodes)")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "quick")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("-c", "--config", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key (pyproject.toml's [tool.flwr.app.config]), e.g. -c factors=32")
    parser.add_argument("--quiet", action="store_true", help="do not stream Flower's log")
    args = parser.parse_args(argv)

    output = args.output.resolve()
    overrides = {
        "num-rounds": args.rounds,
        **simulated_merchants(args.clients),
        "output-dir": str(output),
        "state-dir": str(output / "state"),
        "resume": args.resume,
        **dict(args.config),
    }
    try:
        cfg = RunConfig.from_flower(overrides, source="the command line (--rounds, --clients, --output, -c)")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        run_simulation(cfg.to_flower(), args.clients, output / "flower", stream_to=None if args.quiet else sys.stdout)
    except SimulationError as exc:
        print(f"simulation failed: {exc}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started
    history = json.loads((output / "history.json").read_text())
    print()
    print(f"fedads: {args.clients} merchants, {history[-1]['round']} rounds, {cfg.dataset} data, wall time {wall:.1f}s")
    print(report.table(history))
    print(f"\nresults: {output / 'history.json'} and {output / 'metrics.csv'}")
    print(f"checkpoints: {output / 'checkpoints'}; model: {output / 'model' / 'global_model.npz'}")
    print(f"merchant state (user factors stay here): {output / 'state'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
