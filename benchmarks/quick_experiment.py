"""Wall time of the `quick` experiment from a cold start, and where it goes; and the same for
the main job's standalone 10-round run.

    .venv/bin/python benchmarks/quick_experiment.py [--repeats 3]

Each repeat runs experiments/quick.toml into a fresh folder in a fresh process
(`python -m simulations.sweep`), then the main job (`python -m simulations.simulate`, 10 rounds) in
another fresh process, and reports per federated run where its time went:
- in rounds: the ServerApp's own round timings;
- outside rounds: the rest of the run's wall time (engine set-up, the ServerApp's start), plus,
  in the sweep, the Ray cluster's start and stop as far as the sweep waited for them (the
  cluster boots while the baselines run, and stops while the report is written), spread over
  the sweep's runs;
- first-rounds excess: round 0's evaluation minus the median evaluation of the later rounds
  (actors still starting, the nodes' first data load), plus round 1 minus the median of
  rounds 2.. (first-time costs of training);
Start-up share = (outside rounds + first-rounds excess) / run wall. For the standalone run,
the wall is the whole process's (interpreter start, imports, Ray's start and stop included).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from simulations import PROJECT_ROOT


def _run_row(name: str, wall: float, history: list[dict[str, Any]]) -> dict[str, Any]:
    in_rounds = sum(h["round_seconds"] for h in history)
    excess = history[0]["round_seconds"] - statistics.median(h["evaluate_seconds"] for h in history[1:])
    if len(history) > 3:
        excess += max(0.0, history[1]["round_seconds"] - statistics.median(h["round_seconds"] for h in history[2:]))
    excess = max(0.0, excess)
    return {"run": name, "rounds": len(history) - 1, "wall": wall, "in_rounds": in_rounds, "outside": wall - in_rounds,
            "first_rounds_excess": excess, "share": (wall - in_rounds + excess) / wall}


def _sweep(output: Path) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simulations.sweep", str(PROJECT_ROOT / "experiments" / "quick.toml"), "--output", str(output)],
                   cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    timing = json.loads((output / "timing.json").read_text())
    runtime_share = (timing["start_wait_seconds"] + timing["stop_wait_seconds"]) / len(timing["cells"])
    rows = []
    for done in sorted(output.glob("cells/*/done.json")):
        summary = json.loads(done.read_text())
        history = json.loads((done.parent / "history.json").read_text())
        rows.append(_run_row(summary["cell"], summary["wall_seconds"] + runtime_share, history))
    return wall, timing, rows


def _standalone(output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simulations.simulate", "--quiet", "--rounds", "10", "--output", str(output)],
                   cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return _run_row("main job (simulations.simulate, own process)", wall, json.loads((output / "history.json").read_text()))


def _median_row(rows: list[dict[str, Any]]) -> str:
    med = {key: statistics.median(float(r[key]) for r in rows) for key in ("wall", "in_rounds", "outside", "first_rounds_excess", "share")}
    return (f"| {rows[0]['run']} | {rows[0]['rounds']} | {med['wall']:.1f} | {med['in_rounds']:.1f} | {med['outside']:.1f} | "
            f"{med['first_rounds_excess']:.1f} | {med['share']:.0%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    walls: list[float] = []
    timings: list[dict[str, Any]] = []
    per_run: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        scratch = Path(tempfile.mkdtemp(prefix="fedads-quick-"))
        wall, timing, rows = _sweep(scratch / "sweep")
        walls.append(wall)
        timings.append(timing)
        for row in rows + [_standalone(scratch / "main-job")]:
            per_run.setdefault(str(row["run"]), []).append(row)
        shutil.rmtree(scratch)

    def median(key: str) -> float:
        return statistics.median(t[key] for t in timings)

    print(f"{date.today()} on {platform.node()} ({platform.machine()}), medians of {args.repeats} cold-start runs")
    print(f"quick experiment: {statistics.median(walls):.1f} s in all, interpreter start to exit (runs: {', '.join(f'{w:.1f}' for w in walls)})")
    print(f"  Ray cluster up and actors asked for {median('connect_seconds'):.1f} s after the sweep began (in the background); "
          f"the first run waited {median('start_wait_seconds'):.2f} s for it, the end {median('stop_wait_seconds'):.2f} s for its stop")
    print(f"  in-process baselines {median('baselines_seconds'):.1f} s, federated runs {median('cells_seconds'):.1f} s")
    print("| run | rounds | run wall s | in rounds s | outside rounds s | first-rounds excess s | start-up share |")
    print("|---|---|---|---|---|---|---|")
    for rows in per_run.values():
        print(_median_row(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
