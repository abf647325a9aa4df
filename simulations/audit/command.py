"""Run a one-run privacy audit of an experiment's training (simulations/audit/__init__.py).

    python -m simulations.audit EXPERIMENT.toml [--output DIR] [--canaries M] [--epsilons E ...]
                                [--solvers als sgd] [--no-dp | --dp-only] [--seed S] [--ordinary K]

For each solver (default: the experiment's [sweep] solvers, else its mf-solver), one run without
DP and one per claimed epsilon (default: its [sweep] epsilons), all on one augmented dataset
and one warm simulation runtime. Outputs in DIR (default outputs/experiments/<name>/audit/, so
that the sweep's report shows the audit): data/ (the augmented log and catalog), canaries.json
(every canary and whether it was included), runs/<run>/ (each run's own outputs and scores),
audit.json (one record per run: solver, dataset, dp, epsilon (the claim; null without DP),
canaries, epsilon_lower_bound, and guesses, correct, delta, wall_seconds, ...), audit.png and
audit.html. Finished runs are cached. If DIR's parent folder is the experiment's sweep run
folder (with its report), that report is written again with the audit in it.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from client.handlers import first_message_imports
from deploy.processes import terminate_as_exit
from shared.data.sources import load_dataset
from shared.storage import atomic_write_json
from simulations import PROJECT_ROOT
from simulations.audit.canaries import Canaries, draw_canaries, pin_shards, write_dataset
from simulations.audit.figures import AUDIT_DIR, RECORDS, audit_page, markdown_table, plot_audit
from simulations.audit.runs import AuditError, AuditRun, audit_run, cached_record, on_canary_data, plan_runs
from simulations.audit.statistics import CONFIDENCE
from simulations.experiment import Experiment, ExperimentError, load_experiment
from simulations.runtime import SimulationError, SimulationRuntime

FIGURE = "audit.png"
DEFAULT_CANARIES = 500


def default_output(experiment: Experiment) -> Path:
    return PROJECT_ROOT / "outputs" / "experiments" / experiment.name / AUDIT_DIR


def run_audit(
    experiment_path: Path, output: Path, canaries: int = DEFAULT_CANARIES, solvers: list[str] | None = None,
    epsilons: list[float] | None = None, non_private: bool = True, seed: int | None = None, ordinary: int = 3,
    confidence: float = CONFIDENCE,
) -> list[dict[str, Any]]:
    """Every audit run of the experiment; returns (and writes) their records."""
    experiment = load_experiment(experiment_path)
    runs = plan_runs(experiment, solvers, epsilons, non_private)
    if not runs:
        raise AuditError("nothing to audit: no solver, or neither a run without DP nor a claimed epsilon")
    output.mkdir(parents=True, exist_ok=True)
    source = runs[0].config  # every run cuts the same dataset: they differ in training and privacy only
    seed = source.seed if seed is None else seed
    dataset = pin_shards(load_dataset(source), source, runs[0].clients)  # shards cut before any canary joins one
    augmented, drawn = draw_canaries(dataset, canaries, seed, ordinary)
    data = write_dataset(augmented, output / "data")
    _write_canaries(drawn, output / "canaries.json")
    pending = [run for run in runs if cached_record(run, drawn, data, output / "runs" / run.name, confidence) is None]
    configs = [on_canary_data(run, data[0], data[1], output / "runs" / run.name) for run in pending]
    records: list[dict[str, Any]] = []
    with terminate_as_exit(), ExitStack() as stack:
        runtime = None
        if pending:  # one Ray cluster and one pool of ClientApp actors for every run, as a sweep's cells
            runtime = stack.enter_context(SimulationRuntime(
                output / "runtime", actor_imports=tuple(dict.fromkeys(m for c in configs for m in first_message_imports(c))),
                simulations=[(c, run.clients) for c, run in zip(configs, pending)],
            ))
        for run in runs:
            print(f"audit run {run.name} ({_claim(run)}, {drawn.included.sum()} of {len(drawn)} canaries in)", flush=True)
            record = audit_run(run, drawn, data, dataset.name, output / "runs" / run.name, runtime, confidence)
            records.append(record)
            print(f"  epsilon lower bound {record['epsilon_lower_bound']:.3f} ({record['correct']} of {record['guesses']} guesses right; "
                  f"{_claim(run)}, delta {record['delta']:.2g}), {record['wall_seconds']:.0f} s", flush=True)
            atomic_write_json(output / RECORDS, records)  # what is done survives an interruption
        if runtime is not None:
            runtime.begin_close()  # Ray stops while the figure and the pages are written
        plot_audit(records, output / FIGURE)
        (output / "audit.html").write_text(audit_page(experiment.name, records, FIGURE))
        _refresh_sweep_report(experiment, output)
    return records


def _claim(run: AuditRun) -> str:
    return "no DP" if run.epsilon is None else f"claimed epsilon {run.epsilon:g}"


def _write_canaries(drawn: Canaries, path: Path) -> None:
    atomic_write_json(path, {"seed": drawn.seed, "ordinary": drawn.ordinary, "canaries": [
        {"user_id": user, "ad_id": ad, "included": bool(flag)} for user, ad, flag in zip(drawn.user_ids, drawn.ad_ids, drawn.included)]})


def _refresh_sweep_report(experiment: Experiment, output: Path) -> None:
    """The sweep's report of this experiment, written again to show the audit, when `output`
    lies in that sweep's run folder."""
    sweep_dir = output.parent
    if output.name != AUDIT_DIR or sweep_dir.name != experiment.name or not (sweep_dir / "results.json").is_file():
        return
    from simulations.report import write_report
    from simulations.results import collect

    rows, summary = collect(experiment, sweep_dir)
    write_report(experiment, sweep_dir, rows, summary)
    print(f"report: {sweep_dir / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="audit folder (default outputs/experiments/<name>/audit)")
    parser.add_argument("--canaries", type=int, default=DEFAULT_CANARIES, help="m, the number of canary users")
    parser.add_argument("--epsilons", type=float, nargs="*", default=None, help="claimed epsilons (default: the experiment's [sweep])")
    parser.add_argument("--solvers", nargs="+", choices=["als", "sgd"], default=None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-dp", action="store_true", help="only the runs without DP")
    which.add_argument("--dp-only", action="store_true", help="only the runs with DP")
    parser.add_argument("--seed", type=int, default=None, help="seed of the canaries and their inclusion (default: the run seed)")
    parser.add_argument("--ordinary", type=int, default=3, help="ordinary clicks per canary besides its canary ad")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        experiment = load_experiment(args.experiment)
        output = (args.output or default_output(experiment)).resolve()
        records = run_audit(args.experiment, output, args.canaries, args.solvers, [] if args.no_dp else args.epsilons,
                            not args.dp_only, args.seed, args.ordinary)
    except (ExperimentError, SimulationError, AuditError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(markdown_table(records))
    print(f"audit: {output / RECORDS} ({time.perf_counter() - started:.0f} s); figure {output / FIGURE}; page {output / 'audit.html'}")
    return 0
