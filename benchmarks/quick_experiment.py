"""Wall time of the `quick` experiment from a cold start, and where it goes.

    .venv/bin/python benchmarks/quick_experiment.py

Runs experiments/quick.toml into a fresh folder and reports the whole wall time, and per
federated cell: its wall time, the time inside rounds (round 0 evaluation included, as the
ServerApp measures it) and the rest, which is Flower/Ray start-up and shut-down (SuperLink,
`flwr run`, the simulation runtime, Ray and its actors).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

from simulations.launcher import PROJECT_ROOT
from simulations.sweep import run_experiment


def main() -> int:
    output = Path(tempfile.mkdtemp(prefix="fedads-quick-"))
    started = time.perf_counter()
    run_experiment(PROJECT_ROOT / "experiments" / "quick.toml", output)
    wall = time.perf_counter() - started
    print(f"{date.today()} on {platform.node()}: quick experiment from cold start: {wall:.1f} s in all")
    print("| cell | rounds | cell wall s | in rounds s | start-up + shut-down s | start-up share |")
    print("|---|---|---|---|---|---|")
    for done in sorted(output.glob("cells/*/done.json")):
        summary = json.loads(done.read_text())
        history = json.loads((done.parent / "history.json").read_text())
        in_rounds = sum(h["round_seconds"] for h in history)
        rest = summary["wall_seconds"] - in_rounds
        print(f"| {summary['cell']} | {len(history) - 1} | {summary['wall_seconds']:.1f} | {in_rounds:.1f} | {rest:.1f} | "
              f"{rest / summary['wall_seconds']:.0%} |")
    for done in sorted(output.glob("baselines/*/done.json")):
        print(f"baselines (TopPop, centralized, local-only) in-process: {json.loads(done.read_text())['wall_seconds']:.1f} s")
    shutil.rmtree(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
