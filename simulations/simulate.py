"""The main job: a federated simulation on the embedded synthetic market, private by default,
with a per-round metrics table.

    python -m simulations.simulate [--rounds N] [--clients N] [--output DIR] [--no-compare] [-c key=value ...]

Runs the same ServerApp and ClientApp as a deployment through Flower's simulation runtime, with
the run config's defaults: user-level DP per merchant (private ALS, epsilon 8). Under DP the
merchants release their evaluation metrics noised, so the table's metrics come from the
harness's exact evaluator (simulations/evaluator.py: the simulation owns all the data; outside
the guarantee). Beside them, the same run without DP (into DIR/no-dp, unless --no-compare), and
merchant popularity (each merchant ranking ads by its own shard's popularity). Then it prints
where results, checkpoints, the model and the merchants' state are, writes each simulated
merchant's log and the catalog beside its state (simulations/merchant_inputs.py), and prints the
merchant agent's commands that work on the first one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from client.handlers import first_message_imports
from deploy.processes import terminate_as_exit
from server import report
from shared.als import POPULARITY_MIN_SIGNAL
from shared.config import ConfigError, RunConfig, parse_override
from shared.wire import MERCHANT_POP_PREFIX, POPULARITY_SIGNAL, RANKS_BY_POPULARITY
from simulations import PROJECT_ROOT
from simulations.evaluator import with_exact_metrics, write_exact_history
from simulations.experiment import simulated_merchants
from simulations.merchant_inputs import try_commands, write_merchant_inputs
from simulations.runtime import SimulationError, SimulationRuntime, run_simulation

NO_DP = "no-dp"  # the comparison run's folder inside --output
COMPARED: tuple[report.Column, ...] = (
    *report.COLUMNS[:7],
    ("epsilon_max", "eps max", "{:>7.3f}"),
    (f"{NO_DP}-ndcg10_sampled", "no-DP NDCG@10s", "{:>14.4f}"),
    (f"{NO_DP}-ndcg10_full", "no-DP NDCG@10f", "{:>14.4f}"),
    *[column for column in report.COLUMNS if column[0].startswith(MERCHANT_POP_PREFIX)],
    ("round_seconds", "sec", "{:>6.1f}"),
)


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
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the comparison run without DP (into --output/no-dp)")
    args = parser.parse_args(argv)

    output = args.output.resolve()
    overrides = {"num-rounds": args.rounds, **simulated_merchants(args.clients), "resume": args.resume, **dict(args.config)}
    try:
        cfg = _with_output(RunConfig.from_flower(overrides, source="the command line (--rounds, --clients, --output, -c)"), output)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    runs = [cfg] + ([_with_output(cfg.with_values(privacy="none"), output / NO_DP)] if args.compare and cfg.privacy != "none" else [])
    started = time.perf_counter()
    try:
        with terminate_as_exit(), SimulationRuntime(output / "runtime", actor_imports=_imports(runs),
                                                    simulations=[(run, args.clients) for run in runs]) as runtime:
            for run in runs:
                run_simulation(run.to_flower(), args.clients, Path(run.output_dir) / "flower", stream_to=None if args.quiet else sys.stdout,
                               runtime=runtime)
    except SimulationError as exc:
        print(f"simulation failed: {exc}", file=sys.stderr)
        return 1
    history = json.loads((output / "history.json").read_text())
    choice = _popularity_choice(history[-1].get("train", {}))
    if cfg.privacy != "none":  # the merchants' own metrics are noised or withheld: evaluate in the harness
        history = with_exact_metrics(history, write_exact_history(cfg, args.clients, output))
    if len(runs) > 1:
        _merge_comparison(history, json.loads((output / NO_DP / "history.json").read_text()))
    wall = time.perf_counter() - started
    print()
    print(f"fedads: {args.clients} merchants, {history[-1]['round']} rounds, {cfg.dataset} data, wall time {wall:.1f}s")
    print(_describe(cfg) + (" (metrics: the harness's exact evaluator); beside it, the same run without DP" if len(runs) > 1 else ""))
    if choice:
        print(choice)
    print(report.table(history, COMPARED if len(runs) > 1 else report.COLUMNS))
    print(f"\nresults: {output / 'history.json'} and {output / 'metrics.csv'}"
          + (f"; exact evaluation: {output / 'exact_history.json'}" if cfg.privacy != "none" else ""))
    print(f"checkpoints: {output / 'checkpoints'}; model: {output / 'model' / 'global_model.npz'}")
    print(f"merchant state (user factors and privacy ledgers stay here): {output / 'state'}")
    # the merchant agent needs the merchant's log and catalog too: the harness owns them, so it
    # leaves them beside each simulated merchant's state
    first_merchant = write_merchant_inputs(cfg, args.clients)[0]
    print("\ntry the merchant agent on a simulated merchant (its log and the catalog are in its state directory):")
    for command in try_commands(first_merchant):
        print(f"  {command}")
    return 0


def _with_output(cfg: RunConfig, output: Path) -> RunConfig:
    return cfg.with_values(output_dir=str(output), state_dir=str(output / "state"))


def _imports(runs: list[RunConfig]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(module for run in runs for module in first_message_imports(run)))


def _describe(cfg: RunConfig) -> str:
    if cfg.privacy == "user":
        mechanism = "private ALS" if cfg.mf_solver == "als" else "DP-SGD"
        return f"privacy: user-level DP per merchant ({mechanism}, epsilon {cfg.target_epsilon:g})"
    return {"none": "privacy: none (no DP)", "client": f"privacy: Flower's client-level DP (epsilon {cfg.target_epsilon:g})"}[cfg.privacy]


def _popularity_choice(train: dict[str, float]) -> str | None:
    """Private ALS: what its popularity rule chose, in a line (server/als_aggregation.py)."""
    signal = train.get(POPULARITY_SIGNAL)
    if signal is None:
        return None
    if train.get(RANKS_BY_POPULARITY) and signal < POPULARITY_MIN_SIGNAL:
        return (f"private ALS ranks by noisy popularity: the counts' signal is {signal:.1f} noise stds, under the "
                f"{POPULARITY_MIN_SIGNAL:g} a personal model needs to beat popularity at this noise")
    if train.get(RANKS_BY_POPULARITY):
        return "private ALS ranks by noisy popularity: a run of one round releases popularity only"
    return (f"private ALS: a personal model (the counts' signal is {signal:.1f} noise stds; "
            f"under {POPULARITY_MIN_SIGNAL:g} it would rank by popularity)")


def _merge_comparison(history: list[dict], no_dp: list[dict]) -> None:
    by_round = {record["round"]: record["evaluate"] for record in no_dp}
    for record in history:
        plain = by_round.get(record["round"], {})
        record["evaluate"] = {**record["evaluate"], **{f"{NO_DP}-{k}": v for k, v in plain.items() if k in ("ndcg10_sampled", "ndcg10_full")}}


if __name__ == "__main__":
    raise SystemExit(main())
