"""Run an experiment: every cell through Flower's simulation runtime (one warm runtime for all
of them, simulations/runtime/), baselines in-process while that runtime starts, cached per
cell so a re-run skips finished cells and an interrupted sweep resumes.

    python -m simulations.sweep experiments/quick.toml [--output DIR]

Outputs in one run folder: experiment.toml (copy) and environment.json (package versions),
cells/<cell>/ (each federated run's own outputs, done.json once finished),
baselines/<group>/done.json, results.csv and results.json (one row per cell x round x
client/aggregate), plots/*.png and report.html (with a [delivery] table: delivery/, the delivery
loop's run, records and figures, simulations/delivery/); runtime/ray.log and timing.json (the
runtime's start and stop, as far as the sweep waited for them).

On a terminal it draws a progress bar; with its output redirected, it prints one line per cell,
round and baseline set instead (simulations/sweep_progress.py).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from client.handlers import first_message_imports
from deploy.processes import terminate_as_exit
from shared.config import RunConfig
from shared.data.sources import load_dataset
from shared.storage import atomic_write_json
from simulations import PROJECT_ROOT
from simulations.baselines import centralized, dp_popularity, local_only, toppop
from simulations.evaluator import write_exact_history
from simulations.experiment import Cell, Experiment, ExperimentError, expand_cells, load_experiment
from simulations.runtime import SimulationError, SimulationRuntime, run_simulation
from simulations.sweep_progress import RoundWatcher, SweepProgress, sweep_progress

DONE = "done.json"
DELIVERY_DIR = "delivery"


def _environment() -> dict[str, Any]:
    packages = {name: metadata.version(name) for name in ("flwr", "torch", "opacus", "numpy", "pydantic", "dp-accounting", "matplotlib")
                if _installed(name)}
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": packages,
            "fedads": metadata.version("fedads") if _installed("fedads") else "source"}


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def run_cell(cell: Cell, cell_dir: Path, progress: SweepProgress, runtime: SimulationRuntime | None = None) -> dict[str, Any]:
    """One federated run, resumed from its own checkpoint if an earlier attempt was interrupted."""
    resume = (cell_dir / "checkpoints" / "latest.json").is_file()
    config = cell.config.with_values(output_dir=str(cell_dir), state_dir=str(cell_dir / "state"), resume=resume)
    started = time.perf_counter()
    with (cell_dir / "flower.log").open("a") as log_file:
        run_simulation(config.to_flower(), cell.clients, cell_dir / "flower",
                       stream_to=RoundWatcher(progress, log_file), runtime=runtime)
    if config.privacy == "user":  # its merchants release noised or no metrics: the harness evaluates exactly
        write_exact_history(config, cell.clients, cell_dir)
    summary = {"cell": cell.name, "key": cell.key, "clients": cell.clients, "seed": cell.seed,
               "run_config": config.to_flower(), "wall_seconds": time.perf_counter() - started, "resumed": resume}
    atomic_write_json(cell_dir / DONE, summary)
    return summary


def _actor_imports(configs: list[RunConfig]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(module for cfg in configs for module in first_message_imports(cfg)))


def run_baselines(experiment: Experiment, cell: Cell, out_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(1)  # like each simulated client; more threads only fight over 2 cores
    cfg = cell.config.with_values(privacy="none")
    dataset = load_dataset(cfg)
    started = time.perf_counter()
    result: dict[str, Any] = {"group": cell.key, "clients": cell.clients, "seed": cell.seed}
    if experiment.baselines.toppop:
        result["toppop"] = toppop(cfg, dataset)
    if experiment.baselines.centralized:
        result["centralized"] = centralized(cfg, dataset)
    if experiment.baselines.local_only:
        result["local_only"] = local_only(cfg, dataset, cell.clients)
    if experiment.baselines.dp_popularity and experiment.sweep.epsilons:
        result["dp_popularity"] = dp_popularity(cfg, dataset, cell.clients, experiment.sweep.epsilons)
    result["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(out_dir / DONE, result)
    return result


def run_experiment(experiment_path: Path, output: Path, ray_address: str | None = None) -> Path:
    experiment = load_experiment(experiment_path)
    output.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(experiment_path, output / "experiment.toml")
    atomic_write_json(output / "environment.json", _environment())
    cells = expand_cells(experiment)
    baseline_cells: dict[tuple[int, float, int], Cell] = {}
    for cell in cells:  # one baseline set per (clients, alpha, seed)
        group = (cell.clients, cell.config.dirichlet_alpha, cell.seed)
        baseline_cells.setdefault(group, cell)

    with sweep_progress(len(cells) + len(baseline_cells)) as progress:
        pending = []
        for cell in cells:
            if (output / "cells" / cell.key / DONE).is_file():
                progress.cached(cell.name)
            else:
                pending.append(cell)
        with terminate_as_exit(), ExitStack() as stack:
            runtime = None
            if pending:
                # one Ray instance and one pool of ClientApp actors serve every cell; the actors
                # start while the baselines run
                configs = [c.config for c in pending]
                runtime = stack.enter_context(SimulationRuntime(
                    output / "runtime", actor_imports=_actor_imports(configs),
                    simulations=[(c.config, c.clients) for c in pending], ray_address=ray_address,
                ))
            baselines_started = time.perf_counter()
            for cell in baseline_cells.values():
                out_dir = output / "baselines" / cell.key
                if (out_dir / DONE).is_file():
                    progress.cached(f"baselines for {cell.name}")
                    continue
                out_dir.mkdir(parents=True, exist_ok=True)
                progress.baselines_started(cell.name)
                run_baselines(experiment, cell, out_dir)
                progress.baselines_done(cell.name)
            if runtime is not None:
                cells_started = time.perf_counter()
                for cell in pending:
                    cell_dir = output / "cells" / cell.key
                    cell_dir.mkdir(parents=True, exist_ok=True)
                    progress.cell_started(cell.name, cell.config.num_rounds)
                    run_cell(cell, cell_dir, progress, runtime)
                    progress.cell_done(cell.name)
                runtime.begin_close()  # Ray stops while the tables, plots and report are written
                timing = {"connect_seconds": runtime.connect_seconds, "start_wait_seconds": runtime.start_wait_seconds,
                          "baselines_seconds": cells_started - baselines_started,
                          "cells_seconds": time.perf_counter() - cells_started, "cells": [c.name for c in pending]}

            if experiment.delivery is not None:  # the file also describes a delivery loop: its run and figures join the report
                from simulations.delivery.__main__ import run_delivery

                run_delivery(experiment_path, output / DELIVERY_DIR)

            from simulations.report import write_report
            from simulations.results import collect, write_tables

            rows, summary = collect(experiment, output)
            write_tables(rows, output)
            write_report(experiment, output, rows, summary)
    if runtime is not None:  # the runtime's own start and stop, for benchmarks
        atomic_write_json(output / "timing.json", {**timing, "stop_wait_seconds": runtime.stop_wait_seconds})
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="run folder (default outputs/experiments/<name>)")
    parser.add_argument("--ray-address", default=None, help=(
        "join this running Ray cluster (host:port; default RAY_ADDRESS, else the harness starts a private one on loopback)"))
    args = parser.parse_args(argv)
    try:
        name = load_experiment(args.experiment).name
        output = (args.output or PROJECT_ROOT / "outputs" / "experiments" / name).resolve()
        run_experiment(args.experiment, output, args.ray_address)
    except (ExperimentError, SimulationError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"report: {output / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
