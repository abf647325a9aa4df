"""Fault injection on the main job: what a crash, a lost merchant or a poisoning merchant leaves.

    .venv/bin/python benchmarks/faults.py [--rounds 10] [--clients 5]

Scenarios, each on the synthetic default through the real harness (`python -m
simulations.simulate`, private ALS, one process per scenario) unless said otherwise:
- `clean`: the run as planned;
- `merchant-kill`: one merchant's ClientApp actor is SIGKILLed after round 2 (a node dying
  mid-run); the run goes on with the others (quorum) or stops short, saying why;
- `server-sigkill-resume`: the main job is SIGKILLed after round 4, then resumed with one
  command (`--resume`); the merchants answer a round they already released with the recorded
  release;
- `poison-plain` / `poison-robust`: one merchant of five sends every statistic x 100 (within every
  bound) to federated ALS without DP on MovieLens-100K, in-process (benchmarks/poisoning.py),
  with the default aggregation and with `robust-aggregation = "median"`; skipped without the data.
After each scenario every process that mentions its output folder is counted (`processes_left`).

Writes benchmarks/results/faults.json: flat records with scenario, rounds_planned,
rounds_completed, replies_dropped, exit_code, processes_left, final_ndcg10_sampled,
clean_ndcg10_sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder

from deploy.processes import processes_mentioning  # noqa: E402  (after the path fix above)

RESULTS = ROOT / "benchmarks" / "results" / "faults.json"
WAIT_S = 900.0


def _settled(needle: str, within: float = 30.0) -> int:
    """Processes still mentioning `needle` once the sweeper had `within` seconds to act."""
    deadline = time.monotonic() + within
    while (left := processes_mentioning(needle)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return len(left)


def _start(output: Path, rounds: int, clients: int, resume: bool = False) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "simulations.simulate", "--rounds", str(rounds), "--clients", str(clients),
               "--output", str(output), "--quiet", "--no-compare"] + (["--resume"] if resume else [])
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_round(process: subprocess.Popen[bytes], output: Path, server_round: int) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not (output / "checkpoints" / f"round-{server_round:04d}.npz").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _outcome(output: Path) -> dict[str, Any]:
    """Rounds completed, replies that failed or were dropped, and the final exact NDCG@10."""
    history = json.loads((output / "history.json").read_text()) if (output / "history.json").is_file() else []
    exact_path = output / "exact_history.json"
    exact = json.loads(exact_path.read_text()) if exact_path.is_file() else history
    final = exact[-1].get("evaluate", {}) if exact else {}
    dropped = sum(len(h.get("participants", {}).get("failed", {})) + len(h.get("participants", {}).get("refused", {}))
                  for h in history)
    status_path = output / "run_status.json"
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    completed = status.get("rounds_completed", history[-1]["round"] if history else 0)
    return {"rounds_completed": completed, "replies_dropped": dropped, "final_ndcg10_sampled": final.get("ndcg10_sampled")}


def clean(work: Path, rounds: int, clients: int) -> dict[str, Any]:
    output = work / "clean"
    process = _start(output, rounds, clients)
    code = process.wait(timeout=WAIT_S)
    return {"exit_code": code, "processes_left": _settled(str(output)), **_outcome(output)}


def merchant_kill(work: Path, rounds: int, clients: int) -> dict[str, Any]:
    output = work / "merchant-kill"
    process = _start(output, rounds, clients)
    if _wait_for_round(process, output, 2):
        actors = [found for found in processes_mentioning(str(output / "runtime")) if "ClientAppActor" in found]
        if actors:
            os.kill(int(actors[0].split(":")[0]), signal.SIGKILL)
    try:
        code = process.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return {"exit_code": code, "processes_left": _settled(str(output)), **_outcome(output)}


def server_sigkill_resume(work: Path, rounds: int, clients: int) -> dict[str, Any]:
    output = work / "server-sigkill-resume"
    process = _start(output, rounds, clients)
    _wait_for_round(process, output, 4)
    process.kill()
    process.wait()
    left_after_kill = _settled(str(output))
    resumed = _start(output, rounds, clients, resume=True)
    code = resumed.wait(timeout=WAIT_S)
    return {"exit_code": code, "processes_left": left_after_kill + _settled(str(output)), **_outcome(output)}


def poisoning(robust: bool) -> dict[str, Any] | None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from poisoning import ATTACKS, DATA, MERCHANTS, run

    from shared.config import RunConfig
    from shared.data.sources import load_catalog, load_dataset
    from simulations.baselines import shard_data
    from simulations.runtime.flower_internals import server_identity

    if not (DATA / "movielens" / "ml-100k").is_dir():
        return None
    cfg = RunConfig.from_flower({"dataset": "movielens-100k", "data-path": str(DATA / "movielens" / "ml-100k"), "partitioning": "iid",
                                 "factors": 32, "privacy": "none", "num-rounds": 5,
                                 "robust-aggregation": "median" if robust else "none"})
    catalog = load_catalog(cfg)
    shards = [data for _, data in shard_data(cfg, load_dataset(cfg), MERCHANTS)]
    with server_identity():
        clean_run = run(cfg, shards, catalog, None, 0, seed=0)
        poisoned = run(cfg, shards, catalog, ATTACKS["all-x100"], 0, seed=0)
    return {"rounds_planned": cfg.num_rounds, "rounds_completed": cfg.num_rounds, "replies_dropped": poisoned["replies_dropped"],
            "exit_code": 0, "processes_left": 0, "final_ndcg10_sampled": poisoned["ndcg10_sampled"],
            "clean_ndcg10_sampled": clean_run["ndcg10_sampled"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): main job, {args.clients} merchants, {args.rounds} rounds, private ALS")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedads-faults-") as folder:
        work = Path(folder)
        started = time.perf_counter()
        baseline = clean(work, args.rounds, args.clients)
        scenarios = {"clean": baseline}
        for name, scenario in (("merchant-kill", merchant_kill), ("server-sigkill-resume", server_sigkill_resume)):
            scenarios[name] = scenario(work, args.rounds, args.clients)
        for name, outcome in scenarios.items():
            records.append({"scenario": name, "rounds_planned": args.rounds, **outcome,
                            "clean_ndcg10_sampled": baseline["final_ndcg10_sampled"]})
        for robust in (False, True):
            if (poisoned := poisoning(robust)) is not None:
                records.append({"scenario": "poison-robust" if robust else "poison-plain", **poisoned})
        print(f"whole benchmark {time.perf_counter() - started:.0f} s")
    keys = ("scenario", "rounds_planned", "rounds_completed", "replies_dropped", "exit_code", "processes_left",
            "final_ndcg10_sampled", "clean_ndcg10_sampled")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for record in records:
        print("| " + " | ".join("-" if record.get(k) is None else (f"{record[k]:.4f}" if isinstance(record[k], float) else str(record[k]))
                                for k in keys) + " |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps([{k: r.get(k) for k in keys} for r in records], indent=2) + "\n")
    print(f"\nrecords: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
