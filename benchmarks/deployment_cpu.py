"""Where a deployed exchange's CPU goes: the CPU time each process of a local TLS deployment
spends on one empty exchange (the ServerApp sends every merchant an empty message and waits for
the replies: the per-message floor of a deployed round, docs/BENCHMARKS.md "Deployment").

    python benchmarks/deployment_cpu.py [--merchants 3] [--exchanges 60] [--repeats 3] [--superlink-state memory|database]
        [--clientapp-isolation shared|process] [--output DIR]

One deployment (deploy.local, as benchmarks/deployment_vs_simulation.py starts it) and REPEATS
runs of one round on the synthetic market without DP, with EXCHANGES empty exchanges before round 0
(probe-messages, timed by the ServerApp). While it runs, every process the deployment started
(each carries its mark in its environment) is read from /proc every SAMPLE_SECONDS: user +
system time of the process and of the children it has reaped (a merchant's warm ClientApp
process reaps the ClientApp it forks for each message). Between the first sample after the
EDGE-th exchange began and the last before the EDGE-th from the end, the CPU each process used,
over the exchanges that began in between, is one exchange's cost; each process is put in a role
by its command line and, for SuperExecs, by whom it runs under (the SuperLink's runs the
ServerApp, a SuperNode's its ClientApps). Medians over the runs: DIR/results.json (each run's
figures too) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# deploy/ is not among pyproject.toml's installed packages: import it from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.local import DEPLOYMENT_MARK, local_deployment, write_merchant_data
from deploy.processes import positive_int
from deploy.warm_clientapp import ISOLATION_ENV, ISOLATIONS
from server.probes import PROBES_FILE
from shared.config import RunConfig

EDGE = 5  # exchanges left out at each end of the run's (the first ones warm up, the last ones end)
SAMPLE_SECONDS = 0.2
TICKS = os.sysconf("SC_CLK_TCK")
# roles in the order they are printed: the operator's side, then the merchants'
ROLES = ("SuperLink", "Fleet gateway", "SuperLink's SuperExec + ServerApp", "SuperNodes", "SuperNodes' SuperExecs",
         "warm ClientApp processes + their ClientApps", "other")


def _read(pid: str, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def _processes(mark: str) -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds incl. reaped children) of each live process
    whose environment holds `mark`."""
    found: dict[int, tuple[int, str, float]] = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if mark.encode() not in _read(pid, "environ"):
                continue
            command = _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
            fields = _read(pid, "stat").decode().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        parent, (utime, stime, cutime, cstime) = int(fields[1]), (int(fields[i]) for i in (11, 12, 13, 14))
        found[int(pid)] = (parent, command, (utime + stime + cutime + cstime) / TICKS)
    return found


def _role(pid: int, processes: dict[int, tuple[int, str, float]]) -> str:
    command = processes[pid][1]
    if "deploy.flower_superlink" in command:
        return "SuperLink"
    if "deploy.superlink start" in command:
        return "Fleet gateway"  # the wrapper that starts the SuperLink and serves the gateway in-process
    if "deploy.warm_clientapp" in command or "flwr-clientapp" in command:
        return "warm ClientApp processes + their ClientApps"
    if "superexec" in command or "serverapp" in command:
        ancestor = processes[pid][0]
        while ancestor in processes:
            if "deploy.flower_superlink" in processes[ancestor][1]:
                return "SuperLink's SuperExec + ServerApp"
            ancestor = processes[ancestor][0]
        return "SuperNodes' SuperExecs"
    if "deploy.supernode" in command or "flower-supernode" in command or "deploy.merchant" in command:
        return "SuperNodes"
    return "other"


def _run_config(output: Path, merchants: int, exchanges: int) -> RunConfig:
    return RunConfig.from_flower({
        "num-rounds": 1, "min-nodes": merchants, "synthetic-merchants": merchants, "privacy": "none",
        "output-dir": str(output / "out"), "state-dir": str(output / "out" / "state"), "probe-messages": exchanges,
    })


Sample = tuple[float, dict[int, tuple[int, str, float]]]


def _sample_while(running: threading.Event, mark: str, samples: list[Sample]) -> None:
    while running.is_set():
        samples.append((time.time(), _processes(mark)))  # the ServerApp times its exchanges by the wall clock
        time.sleep(SAMPLE_SECONDS)  # the sampling period, not a wait for anything


def per_exchange(samples: list[Sample], started_at: list[float]) -> tuple[dict[str, float], int, float, int]:
    """(CPU seconds per exchange by role, exchanges measured, their wall seconds, processes that
    ended inside the window, whose CPU there is not counted)."""
    begin, end = started_at[EDGE], started_at[-EDGE]
    inside = [s for s in samples if begin <= s[0] <= end]
    if len(inside) < 2:
        raise RuntimeError("too few samples inside the exchanges: give more --exchanges")
    (t1, first), (t2, last) = inside[0], inside[-1]
    count = sum(1 for t in started_at if t1 <= t < t2)
    totals = dict.fromkeys(ROLES, 0.0)
    for pid, (_, _, cpu) in last.items():
        totals[_role(pid, last)] += cpu - (first[pid][2] if pid in first else 0.0)
    ended = sum(1 for pid in first if pid not in last)
    return {role: value / count for role, value in totals.items()}, count, t2 - t1, ended


def _run(deployed: Any, cfg: RunConfig, mark: str, timeout: float) -> tuple[list[Sample], dict[str, Any]]:
    samples: list[Sample] = []
    running = threading.Event()
    running.set()
    sampler = threading.Thread(target=_sample_while, args=(running, mark, samples), daemon=True)
    sampler.start()
    try:
        reply = deployed.submit(cfg.to_flower())
        if not reply.get("success"):
            raise RuntimeError(f"flwr run failed: {reply}")
        status, _ = deployed.wait_for_run(int(reply["run-id"]), timeout)
    finally:
        running.clear()
        sampler.join()
    if status.get("status") != "finished:completed":
        raise RuntimeError(f"the run did not complete: {status}")
    return samples, json.loads((Path(cfg.output_dir) / PROBES_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merchants", type=positive_int, default=3)
    parser.add_argument("--exchanges", type=positive_int, default=60, help="empty exchanges measured (the run makes 2 x EDGE more)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs, one after another on the deployment")
    parser.add_argument("--superlink-state", choices=("memory", "database"), default="memory")
    parser.add_argument("--clientapp-isolation", choices=ISOLATIONS, default=ISOLATIONS[0],
                        help="how each SuperNode runs a message's ClientApp (deploy.merchant --clientapp-isolation)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/out/deployment-cpu"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    output = args.output.resolve()
    configs = [_run_config(output / f"run-{r}", args.merchants, args.exchanges + 2 * EDGE) for r in range(args.repeats)]
    merchants = write_merchant_data(output / "merchants", configs[0].to_flower(), args.merchants, privacy_mode="none")
    measured = []
    with local_deployment(output / "flower", merchants, in_memory_state=args.superlink_state == "memory",
                          supernode_env={ISOLATION_ENV: args.clientapp_isolation}) as deployed:
        for cfg in configs:  # one after another on the same deployment, as its rounds would come
            # the mark's value is the deployment's work dir (deploy.local)
            samples, probes = _run(deployed, cfg, f"{DEPLOYMENT_MARK}={(output / 'flower').resolve()}", args.timeout)
            cpu, count, seconds, ended = per_exchange(samples, probes["started_at"])
            measured.append({"exchanges_measured": count, "wall_seconds_per_exchange": seconds / count,
                             "exchange_median_seconds": statistics.median(probes["exchange_seconds"]),
                             "cpu_seconds_per_exchange": cpu, "cpu_seconds_per_exchange_total": sum(cpu.values()),
                             "processes_ended_in_window": ended})
        threads = deployed.clientapp_threads
    cpu = {role: statistics.median(m["cpu_seconds_per_exchange"][role] for m in measured) for role in ROLES}
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "merchants": args.merchants, "superlink_state": args.superlink_state, "clientapp_threads": threads,
        "clientapp_isolation": args.clientapp_isolation, "runs": measured,
        # medians over the runs
        "wall_seconds_per_exchange": statistics.median(m["wall_seconds_per_exchange"] for m in measured),
        "exchange_median_seconds": statistics.median(m["exchange_median_seconds"] for m in measured),
        "cpu_seconds_per_exchange": cpu,
        "cpu_seconds_per_exchange_total": statistics.median(m["cpu_seconds_per_exchange_total"] for m in measured),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{results['date']}  {results['machine']}  {args.merchants} merchants, SuperLink state: {args.superlink_state}, "
          f"ClientApp threads: {threads}, ClientApp isolation: {args.clientapp_isolation}; medians of {args.repeats} runs of "
          f"{', '.join(str(m['exchanges_measured']) for m in measured)} empty exchanges measured")
    print(f"one exchange: {1000 * results['wall_seconds_per_exchange']:.0f} ms of wall time "
          f"(the ServerApp's median exchange {1000 * results['exchange_median_seconds']:.0f} ms), "
          f"{1000 * results['cpu_seconds_per_exchange_total']:.0f} ms of CPU:")
    print("| process | CPU ms per exchange | per merchant |")
    print("|---|---|---|")
    for role in ROLES:
        share = cpu[role] * 1000
        merchant_side = role.startswith(("SuperNodes", "warm"))
        print(f"| {role} | {share:.1f} | {share / args.merchants:.1f} |" if merchant_side else f"| {role} | {share:.1f} | - |")
    print(f"results: {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
