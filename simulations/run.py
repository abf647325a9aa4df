"""The main job: a federated simulation on the embedded synthetic market, with a metrics table.

    python -m simulations.run [--rounds N] [--clients N] [--output DIR] [-c key=value ...]

Runs the same ServerApp and ClientApp as a deployment through Flower's simulation runtime,
then prints the per-round metrics table and where results, checkpoints and the model are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

from server import report
from shared.config import RunConfig
from simulations import PROJECT_ROOT
from simulations.runtime import SimulationError, run_simulation


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5, help="simulated merchants (SuperNodes)")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "quick")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("-c", "--config", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key of pyproject.toml, e.g. -c factors=32")
    parser.add_argument("--quiet", action="store_true", help="do not stream Flower's log")
    args = parser.parse_args(argv)

    output = args.output.resolve()
    overrides = {
        "num-rounds": args.rounds,
        "min-nodes": min(args.clients, 2),
        "synthetic-merchants": args.clients,
        "output-dir": str(output),
        "state-dir": str(output / "state"),
        "resume": args.resume,
        **dict(args.config),
    }
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    cfg = RunConfig.from_flower({**pyproject["tool"]["flwr"]["app"]["config"], **overrides})
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
