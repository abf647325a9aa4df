"""Fault injection on the main job: what a crash, a lost merchant or a poisoning merchant leaves.

    .venv/bin/python benchmarks/faults.py [--rounds 10] [--clients 5]

Scenarios, each on the synthetic default through the real harness (`python -m
simulations.simulate`, private ALS, one process per scenario) unless said otherwise:
- `clean`: the run as planned;
- `random-merchant-kills`: at `--kills` rounds drawn at random (seeded), a merchant's ClientApp
  actor drawn at random is SIGKILLed (a node dying mid-run); the run replaces it and goes on
  with the others (quorum) or stops short, saying why;
- `server-sigkill-resume`: the main job is SIGKILLed after round 4, then resumed with one
  command (`--resume`); the merchants answer a round they already released with the recorded
  release;
- `superlink-restart` (its clean reference: `deployment-clean`): the TLS deployment of
  deploy/local.py (SuperLink behind its Fleet gateway, one SuperNode per merchant, private ALS,
  `--deployment-rounds` rounds); after round 2 the SuperLink is SIGKILLed with its SuperExec
  and ServerApp, started again on its database, and once the SuperNodes are back the run is
  resumed with `python -m deploy.runs resume --output-dir OUT --wait`;
- `poison-plain` / `poison-robust`: one merchant of five sends every statistic x 100 (within every
  bound) to federated ALS without DP on MovieLens-100K, in-process (benchmarks/poisoning.py),
  with the default aggregation and with `robust-aggregation = "median"`; skipped without the data.
After each scenario every process that mentions its output (or deployment) folder is counted
(`processes_left`).

Writes benchmarks/results/faults.json: flat records with scenario, rounds_planned,
rounds_completed, replies_dropped, exit_code, processes_left, final_ndcg10_sampled,
clean_ndcg10_sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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


def random_merchant_kills(work: Path, rounds: int, clients: int, kills: int, seed: int = 0) -> dict[str, Any]:
    output = work / "random-merchant-kills"
    rng = random.Random(seed)
    kill_rounds = sorted(rng.sample(range(1, rounds), min(kills, rounds - 1)))
    print(f"  killing a random merchant's actor after rounds {kill_rounds}")
    process = _start(output, rounds, clients)
    for server_round in kill_rounds:
        if not _wait_for_round(process, output, server_round):
            break
        actors = [found for found in processes_mentioning(str(output / "runtime")) if "ClientAppActor" in found]
        if actors:
            os.kill(int(rng.choice(actors).split(":")[0]), signal.SIGKILL)
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


def _deployed_run(work: Path, name: str, rounds: int, clients: int, restart_after: int | None) -> dict[str, Any]:
    """A private-ALS run in a fresh TLS deployment (its own merchants and ledgers); with
    `restart_after`, the SuperLink tree is SIGKILLed once that round is checkpointed, started
    again, and the run resumed with the operator's one command."""
    from deploy.local import local_deployment, stop_process, write_merchant_data
    from shared.config import RunConfig
    from simulations.evaluator import write_exact_history

    root = work / name
    cfg = RunConfig.from_flower({"num-rounds": rounds, "min-nodes": clients, "output-dir": str(root / "out")})
    output = Path(cfg.output_dir)
    merchants = write_merchant_data(root / "merchants", cfg.to_flower(), clients)
    code = 1
    with local_deployment(root / "flower", merchants) as deployed:
        reply = deployed.submit(cfg.to_flower())
        if not reply.get("success"):
            raise RuntimeError(f"flwr run failed: {reply}")
        run_id = int(reply["run-id"])
        if restart_after is None:
            status, _ = deployed.wait_for_run(run_id, WAIT_S)
            code = 0 if status.get("status") == "finished:completed" else 1
        else:
            deadline = time.monotonic() + WAIT_S
            while not (output / "checkpoints" / f"round-{restart_after:04d}.npz").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            killed = time.monotonic()
            stop_process(deployed.processes["superlink"])
            deployed.restart_superlink()
            deployed.wait_online(clients, timeout=600)
            print(f"  SuperLink back and {clients} SuperNodes online {time.monotonic() - killed:.0f} s after the kill")
            resumed = subprocess.run(
                [sys.executable, "-m", "deploy.runs", "resume", "--output-dir", str(output), "--flwr-home",
                 deployed.operator_env["FLWR_HOME"], "--app", str(ROOT), "--wait", "--timeout", str(WAIT_S)],
                cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S + 120, stdin=subprocess.DEVNULL,
            )
            code = resumed.returncode
            print("  " + resumed.stdout.strip().replace("\n", "\n  "))
    left = _settled(str(root / "flower"))
    write_exact_history(cfg, clients, output)  # every checkpoint evaluated exactly, as the harness does
    return {"rounds_planned": rounds, "exit_code": code, "processes_left": left, **_outcome(output)}


def poisoning(robust: bool) -> dict[str, Any] | None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from poisoning import ATTACKS, DATA, MERCHANTS, run

    from shared.config import RunConfig
    from shared.data.sources import load_catalog, load_dataset
    from shared.flower_internals import server_identity
    from simulations.baselines import shard_data

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
    parser.add_argument("--kills", type=int, default=3, help="random merchant kills in random-merchant-kills")
    parser.add_argument("--deployment-rounds", type=int, default=4, help="rounds of the TLS deployment scenarios")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(f"{date.today()} on {platform.node()} ({platform.machine()}): main job, {args.clients} merchants, {args.rounds} rounds, private ALS")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedads-faults-") as folder:
        work = Path(folder)
        started = time.perf_counter()
        baseline = clean(work, args.rounds, args.clients)
        scenarios = {"clean": baseline}
        scenarios["random-merchant-kills"] = random_merchant_kills(work, args.rounds, args.clients, args.kills)
        scenarios["server-sigkill-resume"] = server_sigkill_resume(work, args.rounds, args.clients)
        for name, outcome in scenarios.items():
            records.append({"scenario": name, "rounds_planned": args.rounds, **outcome,
                            "clean_ndcg10_sampled": baseline["final_ndcg10_sampled"]})
        deployed_clean = _deployed_run(work, "deployment-clean", args.deployment_rounds, args.clients, restart_after=None)
        restarted = _deployed_run(work, "superlink-restart", args.deployment_rounds, args.clients, restart_after=2)
        for name, outcome in (("deployment-clean", deployed_clean), ("superlink-restart", restarted)):
            records.append({"scenario": name, **outcome, "clean_ndcg10_sampled": deployed_clean["final_ndcg10_sampled"]})
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
