"""Private ALS with and without secure aggregation, beside its floors, on MovieLens-100K and Beauty.

    .venv/bin/python benchmarks/secure_aggregation.py [--datasets ml100k beauty] [--epsilons 1 4 8] [--threshold 0.8]

For each data set (its experiment file, experiments/<name>.toml: the same overrides as the
privacy-utility sweep), 5 IID merchants, each epsilon:
- `plain`: private ALS (3 releases: popularity, then 2 of statistics), every merchant adding the full noise of its release;
- `secure`: the same with `secure-aggregation = true` (Flower's SecAgg+; each merchant adds
  1 / (threshold) of the noise variance, threshold = round(--threshold x 5));
- `dp-popularity`: ranking by noisy summed counts at the same epsilon (simulations/baselines.py);
- `none` (once): federated ALS without DP, the experiment's rounds.
Federated runs go through Flower's simulation runtime (one warm runtime) and are evaluated
exactly by the harness (simulations/evaluator.py): sampled (NCF protocol, 99 negatives) and
full ranking. `round_seconds`: median of the rounds' wall time in the ServerApp (training and
evaluation). `bytes_per_client`: what one merchant sends in one training round, serialized as
Flower's wire carries it, measured on an in-process exchange (simulations/in_process.py) of
the same configuration: the statistics (plain) or the four protocol stages (secure).

Writes benchmarks/results/secure_aggregation.json: flat records with dataset, epsilon, mode,
ndcg10_sampled, hr10_sampled, ndcg10_full, round_seconds, bytes_per_client.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder

import numpy as np  # noqa: E402
from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402

from server.als_aggregation import RANKS_BY_POPULARITY, ALSAggregation  # noqa: E402
from server.secure_round import SecureTraining  # noqa: E402
from server.strategies import build_strategy  # noqa: E402
from shared.als import ALSSettings  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.data.sources import load_catalog, load_dataset  # noqa: E402
from shared.flower_internals import server_identity  # noqa: E402
from shared.params import initial_arrays  # noqa: E402
from shared.wire import to_array_record  # noqa: E402
from simulations.baselines import dp_popularity  # noqa: E402
from simulations.evaluator import write_exact_history  # noqa: E402
from simulations.experiment import load_experiment, simulated_merchants  # noqa: E402
from simulations.in_process import InProcessGrid  # noqa: E402
from simulations.runtime import SimulationRuntime, run_simulation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "secure_aggregation.json"
DATA = ROOT.parent / "shared" / "data"
MERCHANTS = 5
KEYS = ("dataset", "epsilon", "mode", "ndcg10_sampled", "hr10_sampled", "ndcg10_full", "round_seconds", "bytes_per_client")


def _configs(name: str, epsilons: list[float], threshold: float, work: Path) -> dict[tuple[str, float | None], RunConfig]:
    experiment = load_experiment(ROOT / "experiments" / f"{name}.toml")
    base = experiment.base.with_values(**simulated_merchants(MERCHANTS)).with_values(min_nodes=MERCHANTS)
    configs: dict[tuple[str, float | None], RunConfig] = {("none", None): base.with_values(privacy="none")}
    for epsilon in epsilons:
        private = base.with_values(privacy="user", target_epsilon=epsilon, num_rounds=experiment.sweep.private_als_rounds,
                                   mf_solver="als", dp_metrics="none")
        configs[("plain", epsilon)] = private
        configs[("secure", epsilon)] = private.with_values(secure_aggregation=True, secure_threshold=threshold)
    return {key: cfg.with_values(output_dir=str(work / name / f"{key[0]}-{key[1]}"),
                                 state_dir=str(work / name / f"{key[0]}-{key[1]}" / "state")) for key, cfg in configs.items()}


def _run(cfg: RunConfig, runtime: SimulationRuntime) -> dict[str, Any]:
    output = Path(cfg.output_dir)
    run_simulation(cfg.to_flower(), MERCHANTS, output / "flower", runtime=runtime, timeout=7200)
    history = write_exact_history(cfg, MERCHANTS, output) if cfg.privacy == "user" else json.loads((output / "history.json").read_text())
    served = json.loads((output / "history.json").read_text())  # the server's own records (the exact history has no train metrics)
    timings = [h["round_seconds"] for h in served[1:]]
    final = history[-1]["evaluate"]
    return {"ndcg10_sampled": final["ndcg10_sampled"], "hr10_sampled": final["hr10_sampled"], "ndcg10_full": final["ndcg10_full"],
            "hr10_full": final["hr10_full"],
            "round_seconds": statistics.median(timings),
            # private ALS: whether its popularity rule chose popularity (server/als_aggregation.py)
            "ranks_by_popularity": bool(served[-1].get("train", {}).get(RANKS_BY_POPULARITY))}


def _upload_bytes(cfg: RunConfig, work: Path) -> float:
    """Median bytes one merchant sends in one training round, on an in-process exchange."""
    cfg = cfg.with_values(output_dir=str(work), state_dir=str(work / "state"))
    catalog = load_catalog(cfg)
    arrays = initial_arrays(cfg.init, catalog, cfg.factors, cfg.seed)
    grid = InProcessGrid(cfg, MERCHANTS)
    with server_identity():
        if cfg.secure_aggregation:
            settings = ALSSettings.from_config(cfg)
            context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_flower())
            training = SecureTraining(settings, cfg.max_users_per_merchant, cfg.secure_threshold, 600.0, context)
            training.exchange(grid, 1, arrays, grid.get_node_ids())  # type: ignore[arg-type]  # the in-process grid (a statistics round)
        else:
            strategy, _ = build_strategy(cfg, MERCHANTS, catalog)
            if isinstance(strategy, ALSAggregation) and cfg.privacy == "user":  # a statistics round, after the popularity release
                strategy.after_popularity(np.zeros(len(catalog)), 1.0, 10.0)
            messages = list(strategy.configure_train(1, to_array_record(arrays), ConfigRecord(), grid))  # type: ignore[arg-type]
            grid.send_and_receive(messages)
    return statistics.median(grid.bytes_sent.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml100k", "beauty"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0])
    parser.add_argument("--threshold", type=float, default=RunConfig().secure_threshold)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): {MERCHANTS} IID merchants, threshold {args.threshold}")
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedads-secagg-") as folder:
        work = Path(folder)
        plans = {name: _configs(name, args.epsilons, args.threshold, work) for name in args.datasets}
        plans = {name: plan for name, plan in plans.items() if Path(plan[("none", None)].data_path).exists()}
        every = [cfg for plan in plans.values() for cfg in plan.values()]
        with SimulationRuntime(work / "runtime", simulations=[(cfg, MERCHANTS) for cfg in every]) as runtime:
            for name, plan in plans.items():
                dataset = load_dataset(plan[("none", None)])
                floors = dp_popularity(plan[("none", None)], dataset, MERCHANTS, args.epsilons)
                upload = {mode: _upload_bytes(plan[(mode, args.epsilons[0])], work / name / f"bytes-{mode}") for mode in ("plain", "secure")}
                upload["none"] = _upload_bytes(plan[("none", None)], work / name / "bytes-none")
                for (mode, epsilon), cfg in plan.items():
                    cell_started = time.perf_counter()
                    outcome = _run(cfg, runtime)
                    record = {"dataset": name, "epsilon": epsilon, "mode": mode, **outcome, "bytes_per_client": upload[mode]}
                    records.append(record)
                    print(f"  {name} {mode} eps={epsilon}: NDCG@10 sampled {outcome['ndcg10_sampled']:.4f} full {outcome['ndcg10_full']:.4f} "
                          f"({time.perf_counter() - cell_started:.0f} s)", flush=True)
                for epsilon in args.epsilons:
                    floor = floors[f"{epsilon:g}"]
                    records.append({"dataset": name, "epsilon": epsilon, "mode": "dp-popularity", "ndcg10_sampled": floor["ndcg10_sampled"],
                                    "hr10_sampled": floor["hr10_sampled"], "ndcg10_full": floor["ndcg10_full"], "round_seconds": None,
                                    "bytes_per_client": None})
    print(f"whole benchmark {time.perf_counter() - started:.0f} s")
    order = {"none": 0, "dp-popularity": 1, "plain": 2, "secure": 3}
    records.sort(key=lambda r: (r["dataset"], r["epsilon"] or 0.0, order[r["mode"]]))
    print("| " + " | ".join(KEYS) + " |")
    print("|" + "---|" * len(KEYS))
    for record in records:
        print("| " + " | ".join("-" if record[k] is None else (f"{record[k]:.4f}" if isinstance(record[k], float) else str(record[k]))
                                for k in KEYS) + " |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps([{k: r[k] for k in KEYS} for r in records], indent=2) + "\n")
    print(f"\nrecords: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
