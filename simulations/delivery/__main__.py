"""Run an experiment file's delivery loop: every epsilon of it, one loop each, and its report.

    python -m simulations.delivery experiments/delivery.toml [--output DIR]

The file's run-config keys set the synthetic market and the solver, its [sweep] epsilons add
private runs beside its base cell (privacy as the file says), its [delivery] table the loop
(simulations/delivery/settings.py). Outputs in the run folder: runs/<label>/ (each run's
merchants: their logs with the delivered batches, ledgers and state), delivery.json (per policy,
and the uplift records), rounds.json (per round and policy), plots/*.png and report.html.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.app_log import FLOWER_LOGGER, logger_level
from shared.config import RunConfig
from shared.data.sources import synthetic_spec
from shared.data.synthetic import generate
from shared.storage import atomic_write_json
from simulations import PROJECT_ROOT
from simulations.delivery.analysis import exposure_curves, policy_records, round_records, uplift_records
from simulations.delivery.loop import DeliveryLoop
from simulations.delivery.report import write_report
from simulations.experiment import Experiment, ExperimentError, load_experiment

log = logging.getLogger("fedads.delivery")


def delivery_configs(experiment: Experiment) -> list[RunConfig]:
    """The base cell, then one private-ALS cell per [sweep] epsilon (the loop's solver and market as the file says)."""
    if experiment.delivery is None:
        raise ExperimentError(f"{experiment.source}: no [delivery] table: nothing to deliver")
    if experiment.base.dataset != "synthetic":
        raise ExperimentError(f"{experiment.source}: field 'dataset': the delivery loop needs the synthetic market "
                              f"(its users answer from the generator's ground truth), not '{experiment.base.dataset}'")
    base = experiment.base
    private = [base.with_values(f"{experiment.source} (epsilon {e:g})", privacy="user", target_epsilon=float(e), dp_metrics="none")
               for e in experiment.sweep.epsilons]
    return [base, *private]


def _label(cfg: RunConfig) -> str:
    return "no-dp" if cfg.privacy == "none" else f"eps{cfg.target_epsilon:g}"


def run_delivery(experiment_path: Path, output: Path) -> dict[str, list[dict[str, Any]]]:
    experiment = load_experiment(experiment_path)
    configs = delivery_configs(experiment)
    assert experiment.delivery is not None
    output.mkdir(parents=True, exist_ok=True)
    policies: list[dict[str, Any]] = []
    uplifts: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    curves: dict[str, np.ndarray] = {}
    for cfg in configs:
        dataset, truth = generate(synthetic_spec(cfg))
        epsilon = None if cfg.privacy == "none" else cfg.target_epsilon
        work = output / "runs" / _label(cfg)
        shutil.rmtree(work, ignore_errors=True)  # a fresh market: its merchants' logs and ledgers start anew
        started = time.perf_counter()
        result = DeliveryLoop(cfg, experiment.delivery, dataset, truth, work).run()
        log.warning("delivery %s: %d rounds in %.0f s; epsilon spent per merchant: %s", _label(cfg), experiment.delivery.rounds,
                    time.perf_counter() - started, ", ".join(f"{e:.3f}" for e in result.epsilon.values()))
        policies += policy_records(result, epsilon, dataset.catalog)
        uplifts += uplift_records(result, epsilon)
        rounds += round_records(result, epsilon)
        if epsilon is None or not curves:
            curves = exposure_curves(result, dataset.catalog)
    atomic_write_json(output / "delivery.json", policies + uplifts)
    atomic_write_json(output / "rounds.json", rounds)
    d = experiment.delivery
    summary = (f"Synthetic market ({experiment.base.synthetic_merchants} merchants, {experiment.base.synthetic_users} users, "
               f"{experiment.base.synthetic_ads} ads); {d.rounds} rounds of delivery, the global model retrained every {d.retrain_every}; "
               f"slates of {d.slate_size}, {d.active_share:.0%} of the users active per round, exploration {d.exploration:g}; "
               f"arms {', '.join(d.arms)} on a stable hash split of the users. Rates are ratios of sums over impressions; "
               f"uplifts by the user-level delta method.")
    write_report(output, experiment.name, summary, policies, uplifts, rounds, curves)
    return {"policies": policies, "uplifts": uplifts, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="run folder (default outputs/delivery/<name>)")
    args = parser.parse_args(argv)
    try:
        name = load_experiment(args.experiment).name
        output = (args.output or PROJECT_ROOT / "outputs" / "delivery" / name).resolve()
        with logger_level(FLOWER_LOGGER, logging.ERROR):  # the loop's in-process rounds would each log Flower's aggregation lines
            run_delivery(args.experiment, output)
    except ExperimentError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"report: {output / 'report.html'}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    raise SystemExit(main())
