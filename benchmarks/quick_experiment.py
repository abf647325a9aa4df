"""Wall time of the `quick` experiment from a cold start, and where it goes.

    .venv/bin/python benchmarks/quick_experiment.py [--repeats 3]

Runs experiments/quick.toml into a fresh folder (each repeat from scratch) and reports the
whole wall time, and per federated cell where its time went:
- in rounds: the ServerApp's own round timings;
- outside rounds: Flower and Ray start-up and shut-down (submitting the app, the SuperExec
  starting the simulation, the runtime's imports, joining and leaving the sweep's Ray cluster);
- first-rounds excess: round 0's evaluation minus the median evaluation of the later rounds
  (the Ray actors' start-up and the nodes' first data load, carried by the first message),
  plus round 1 minus the median of rounds 2.. (Flower does not pin a node to an actor, so
  an actor meets most nodes for the first time in round 1).
Start-up share = (outside rounds + first-rounds excess) / cell wall; the start of the sweep's
one SuperLink and Ray cluster is spread over its cells.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from simulations.launcher import PROJECT_ROOT
from simulations.sweep import run_experiment


def _cell_rows(output: Path) -> list[dict[str, float | str]]:
    timing = json.loads((output / "timing.json").read_text())
    shared_start = timing["start_seconds"] / len(timing["cells"])  # the sweep's one SuperLink and Ray cluster
    rows = []
    for done in sorted(output.glob("cells/*/done.json")):
        summary = json.loads(done.read_text())
        history = json.loads((done.parent / "history.json").read_text())
        in_rounds = sum(h["round_seconds"] for h in history)
        wall = summary["wall_seconds"] + shared_start
        excess = history[0]["round_seconds"] - statistics.median(h["evaluate_seconds"] for h in history[1:])
        if len(history) > 3:
            excess += max(0.0, history[1]["round_seconds"] - statistics.median(h["round_seconds"] for h in history[2:]))
        rows.append({"cell": summary["cell"], "rounds": len(history) - 1, "wall": wall, "in_rounds": in_rounds,
                     "outside": wall - in_rounds, "first_rounds_excess": excess, "share": (wall - in_rounds + excess) / wall})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    walls: list[float] = []
    per_cell: dict[str, list[dict[str, float | str]]] = {}
    baselines: list[float] = []
    for _ in range(args.repeats):
        output = Path(tempfile.mkdtemp(prefix="fedads-quick-"))
        started = time.perf_counter()
        run_experiment(PROJECT_ROOT / "experiments" / "quick.toml", output)
        walls.append(time.perf_counter() - started)
        for row in _cell_rows(output):
            per_cell.setdefault(str(row["cell"]), []).append(row)
        baselines += [json.loads(d.read_text())["wall_seconds"] for d in output.glob("baselines/*/done.json")]
        shutil.rmtree(output)

    print(f"{date.today()} on {platform.node()} ({platform.machine()}), medians of {args.repeats} cold-start runs")
    print(f"quick experiment: {statistics.median(walls):.1f} s in all (runs: {', '.join(f'{w:.1f}' for w in walls)}); "
          f"in-process baselines {statistics.median(baselines):.1f} s")
    print("| cell | rounds | cell wall s | in rounds s | outside rounds s | first-rounds excess s | start-up share |")
    print("|---|---|---|---|---|---|---|")
    for cell, rows in per_cell.items():
        med = {key: statistics.median(float(r[key]) for r in rows) for key in ("wall", "in_rounds", "outside", "first_rounds_excess", "share")}
        print(f"| {cell} | {rows[0]['rounds']} | {med['wall']:.1f} | {med['in_rounds']:.1f} | {med['outside']:.1f} | "
              f"{med['first_rounds_excess']:.1f} | {med['share']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
