"""Private accuracy with the shipped defaults only: private ALS beside its floors and its peers.

    .venv/bin/python benchmarks/private_accuracy.py [--datasets ml100k beauty] [--epsilons 1 4 8 16]

For each data set (its shipped experiment file, experiments/<name>.toml, which carries no
`als-*` override: every private-ALS setting is the package default's rule), 5 IID merchants:
- `private-als` at each epsilon, plain (each merchant adds the full noise of its release) and
  with secure aggregation (Flower's SecAgg+, threshold 0.8: each adds 1/4 of it), 3 releases (popularity, then 2 of statistics),
  through Flower's simulation runtime, evaluated exactly by the harness;
- `dp-popularity` at each epsilon (noisy summed counts: the floor) and `toppop` (exact global
  popularity, no DP);
- `federated`: federated ALS without DP (the experiment's rounds);
  every run ranked as merchants rank (the shipped content affinity; the floors by popularity alone);
- `implicit-als`: the `implicit` library's ALS on the same split and protocol, read from
  benchmarks/results/implicit_vs_federated.json (benchmarks/implicit_vs_federated.py, which
  needs the benchmark-only extra), when that file exists.
Metrics: NDCG@10 and HR@10, sampled (NCF protocol, 99 negatives) and full ranking.

The same runs give issue 15's secure-aggregation table: with `--secure-results` the round
seconds and bytes per merchant are written to benchmarks/results/secure_aggregation.json too.

Writes benchmarks/results/private_accuracy.json: flat records with dataset, epsilon (null
without DP), method, secure_aggregation, ndcg10_sampled, ndcg10_full, hr10_sampled, hr10_full.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_file import merged, write_records  # noqa: E402
from secure_aggregation import KEYS as SECURE_KEYS  # noqa: E402
from secure_aggregation import MERCHANTS, _configs, _run, _upload_bytes  # noqa: E402

from shared.config import RunConfig  # noqa: E402
from shared.data.sources import load_dataset  # noqa: E402
from simulations.baselines import dp_popularity, toppop  # noqa: E402
from simulations.runtime import SimulationRuntime  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "private_accuracy.json"
SECURE_RESULTS = ROOT / "benchmarks" / "results" / "secure_aggregation.json"
IMPLICIT_RESULTS = ROOT / "benchmarks" / "results" / "implicit_vs_federated.json"
KEYS = ("dataset", "epsilon", "method", "secure_aggregation", "ndcg10_sampled", "ndcg10_full", "hr10_sampled", "hr10_full")
METRICS = ("ndcg10_sampled", "ndcg10_full", "hr10_sampled", "hr10_full")


def _record(dataset: str, epsilon: float | None, method: str, secure: bool, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"dataset": dataset, "epsilon": epsilon, "method": method, "secure_aggregation": secure, **{k: metrics[k] for k in METRICS}}


def _peer_records(datasets: list[str]) -> list[dict[str, Any]]:
    """implicit's ALS on the same split, as its own benchmark measured it (absent: none)."""
    if not IMPLICIT_RESULTS.exists():
        print(f"no {IMPLICIT_RESULTS.name}: implicit-als is left out (run benchmarks/implicit_vs_federated.py)")
        return []
    peers = json.loads(IMPLICIT_RESULTS.read_text())
    return [{k: r[k] for k in KEYS} for r in peers if r["method"] == "implicit-als" and r["dataset"] in datasets]


def _median_floors(cfg: RunConfig, dataset: Any, epsilons: list[float], repeats: int) -> dict[str, dict[str, float]]:
    """dp_popularity's metrics per epsilon, the median of `repeats` noise draws."""
    draws = [dp_popularity(cfg, dataset, MERCHANTS, epsilons) for _ in range(repeats)]
    return {eps: {key: statistics.median(d[eps][key] for d in draws) for key in draws[0][eps]} for eps in draws[0]}


def _verdicts(records: list[dict[str, Any]], ranked_by_popularity: set[tuple[str, float | None, bool]]) -> list[str]:
    """The issue's targets, read off the records (a cell whose popularity rule chose popularity
    is the floor's own mechanism: at the floor in distribution, whatever one draw says)."""
    lines = []
    index = {(r["dataset"], r["epsilon"], r["method"], r["secure_aggregation"]): r for r in records}
    for (dataset, epsilon, method, secure), r in sorted(index.items(), key=lambda kv: str(kv[0])):
        if method != "private-als":
            continue
        floor = index[(dataset, epsilon, "dp-popularity", False)]
        ok = all(r[k] >= floor[k] for k in ("ndcg10_sampled", "ndcg10_full"))
        popular = (dataset, epsilon, secure) in ranked_by_popularity
        rule = " [the popularity rule chose popularity]" if popular else ""
        # plain and popularity: the floor's own mechanism, so its draws differ from the floor's by noise alone
        verdict = "at or above" if ok else "at (the same mechanism; the draws differ by noise)" if popular and not secure else "BELOW"
        lines.append(f"{dataset} eps {epsilon:g} {'secure' if secure else 'plain'}{rule}: "
                     f"{verdict} dp-popularity (sampled {r['ndcg10_sampled']:.4f} vs {floor['ndcg10_sampled']:.4f}, "
                     f"full {r['ndcg10_full']:.4f} vs {floor['ndcg10_full']:.4f})")
    for dataset in sorted({r["dataset"] for r in records}):
        federated, peer = index.get((dataset, None, "federated", False)), index.get((dataset, None, "implicit-als", False))
        if federated and peer:
            # the federated run ranks as merchants do (content affinity); implicit's records are its model alone:
            # the like-for-like ratio is benchmarks/implicit_vs_federated.py's
            lines.append(f"{dataset}: federated (ranked with content affinity) / implicit-als (the model alone) = "
                         f"{federated['ndcg10_sampled'] / peer['ndcg10_sampled']:.3f} sampled, "
                         f"{federated['ndcg10_full'] / peer['ndcg10_full']:.3f} full")
        secure8 = index.get((dataset, 8.0, "private-als", True))
        if federated and secure8:
            lines.append(f"{dataset} eps 8 secure: full NDCG@10 = {secure8['ndcg10_full'] / federated['ndcg10_full']:.3f} x federated")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml100k", "beauty"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 8.0, 16.0])
    parser.add_argument("--threshold", type=float, default=RunConfig().secure_threshold)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--secure-results", action="store_true", help=f"also write {SECURE_RESULTS.name} (issue 15's table)")
    parser.add_argument("--repeats", type=int, default=1, help=(
        "noise draws of each private cell and floor; records hold the medians (a cell whose popularity rule chose "
        "popularity is the floor's mechanism: only noise tells the two apart)"))
    parser.add_argument("--only-federated", action="store_true", help=(
        "rerun only the federated (no DP) cells and replace just their records in --results (after a change of the "
        "non-private defaults; the private cells, the floors and the peers keep their records)"))
    args = parser.parse_args()
    if args.only_federated and args.secure_results:
        parser.error("--only-federated measures no private cell: nothing for --secure-results")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): {MERCHANTS} IID merchants, shipped defaults, "
          f"secure threshold {args.threshold}", flush=True)
    records: list[dict[str, Any]] = []
    secure_records: list[dict[str, Any]] = []
    ranked_by_popularity: set[tuple[str, float | None, bool]] = set()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedads-accuracy-") as folder:
        work = Path(folder)
        plans = {name: _configs(name, args.epsilons, args.threshold, work) for name in args.datasets}
        plans = {name: plan for name, plan in plans.items() if Path(plan[("none", None)].data_path).exists()}
        if args.only_federated:
            plans = {name: {("none", None): plan[("none", None)]} for name, plan in plans.items()}
        if not plans:
            print("none of the data sets is in ../shared/data: nothing to measure")
            return 0
        every = [cfg for plan in plans.values() for cfg in plan.values()]
        with SimulationRuntime(work / "runtime", simulations=[(cfg, MERCHANTS) for cfg in every]) as runtime:
            for name, plan in plans.items():
                base = plan[("none", None)]
                dataset = load_dataset(base)
                floors = {} if args.only_federated else _median_floors(base, dataset, args.epsilons, args.repeats)
                if not args.only_federated:
                    records.append(_record(name, None, "toppop", False, toppop(base, dataset)))
                upload: dict[str, float] = {}
                if args.secure_results:
                    upload = {mode: _upload_bytes(plan[(mode, args.epsilons[0])], work / name / f"bytes-{mode}") for mode in ("plain", "secure")}
                    upload["none"] = _upload_bytes(base, work / name / "bytes-none")
                for (mode, epsilon), cfg in plan.items():
                    cell_started = time.perf_counter()
                    # each draw its own merchants (own state dirs, own ledgers: a second run on one would be refused)
                    draws = [_run(cfg.with_values(output_dir=f"{cfg.output_dir}-{draw}", state_dir=f"{cfg.output_dir}-{draw}/state"), runtime)
                             for draw in range(1 if mode == "none" else args.repeats)]
                    outcome = {key: statistics.median(d[key] for d in draws) for key in (*METRICS, "round_seconds")}
                    chose_popularity = sum(d["ranks_by_popularity"] for d in draws)
                    spread = {key: (min(d[key] for d in draws), max(d[key] for d in draws)) for key in ("ndcg10_sampled", "ndcg10_full")}
                    method = "federated" if mode == "none" else "private-als"
                    records.append(_record(name, epsilon, method, mode == "secure", outcome))
                    secure_records.append({"dataset": name, "epsilon": epsilon, "mode": mode, **outcome, "bytes_per_client": upload.get(mode)})
                    if chose_popularity:
                        ranked_by_popularity.add((name, epsilon, mode == "secure"))
                    print(f"  {name} {mode} eps={epsilon}: NDCG@10 sampled {outcome['ndcg10_sampled']:.4f} "
                          f"[{spread['ndcg10_sampled'][0]:.4f}, {spread['ndcg10_sampled'][1]:.4f}] full {outcome['ndcg10_full']:.4f} "
                          f"[{spread['ndcg10_full'][0]:.4f}, {spread['ndcg10_full'][1]:.4f}] (median of {len(draws)}; "
                          f"popularity rule chose popularity in {chose_popularity}; {time.perf_counter() - cell_started:.0f} s)", flush=True)
                for epsilon in args.epsilons if floors else []:
                    floor = floors[f"{epsilon:g}"]
                    records.append(_record(name, epsilon, "dp-popularity", False, floor))
                    secure_records.append({"dataset": name, "epsilon": epsilon, "mode": "dp-popularity", **floor,
                                           "round_seconds": None, "bytes_per_client": None})
    records += _peer_records(list(plans))
    if args.only_federated:  # its own records and the peers' replaced; the private cells and floors stay as measured
        fresh = {(r["dataset"], r["method"]) for r in records}
        records = merged(args.results, records, lambda r: (r["dataset"], r["method"]) in fresh)
    print(f"whole benchmark {time.perf_counter() - started:.0f} s")
    order = {"toppop": 0, "federated": 1, "implicit-als": 2, "dp-popularity": 3, "private-als": 4}
    records.sort(key=lambda r: (r["dataset"], r["epsilon"] or 0.0, order[r["method"]], r["secure_aggregation"]))
    print("| " + " | ".join(KEYS) + " |")
    print("|" + "---|" * len(KEYS))
    for record in records:
        print("| " + " | ".join("-" if record[k] is None else (f"{record[k]:.4f}" if isinstance(record[k], float) else str(record[k]))
                                for k in KEYS) + " |")
    print("\n" + "\n".join(_verdicts(records, ranked_by_popularity)))
    write_records(args.results, records)
    print(f"\nrecords: {args.results}")
    if args.secure_results:
        mode_order = {"none": 0, "dp-popularity": 1, "plain": 2, "secure": 3}
        secure_records.sort(key=lambda r: (r["dataset"], r["epsilon"] or 0.0, mode_order[r["mode"]]))
        SECURE_RESULTS.write_text(json.dumps([{k: r[k] for k in SECURE_KEYS} for r in secure_records], indent=2) + "\n")
        print(f"secure-aggregation records: {SECURE_RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
