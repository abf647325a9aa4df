"""Round time of the TLS deployment (one SuperNode per merchant) against the same run in
Flower's simulation runtime, and the bytes each client sends and receives per round.

    python benchmarks/deployment_vs_simulation.py [--merchants 3] [--rounds 5] [--privacy none] [--secure] [--data synthetic|ml100k]
        [--superlink-state database|memory] [--carry-evaluation | --evaluate-apart] [--clientapp-isolation shared|process] [--output DIR]

`--superlink-state memory`: the SuperLink keeps its state in memory (`deploy.superlink start
--in-memory`) instead of its SQLite file (the default, which survives a restart).

`--clientapp-isolation shared|process`: how each deployed SuperNode runs a message's ClientApp
(deploy.merchant's option; default shared, in its warm process).

`--clientapp-threads N`: each deployed ClientApp's numerical threads (deploy.merchant
--clientapp-threads); by default the machine's cores divided among the merchants (deploy.local).

`--secure` (with --privacy user): secure aggregation (Flower's SecAgg+, four training messages
per merchant per round), the deployed merchants' policies allowing it.

Same data for both: the synthetic market of the default run config (or `--data ml100k`:
MovieLens-100K, IID), cut into one shard per merchant exactly as the simulation cuts it; the
deployment's merchants read theirs from CSV (and, from their second message on, from the
binary shard cache in their state directories). Records in benchmarks/results/deployment.json.
Round time: the ServerApp's own `round_seconds` (history.json), median over rounds 1..N (round 0
is only the first evaluation and carries start-up). Evaluation: as the run config's default
decides (carry-evaluation = "auto": carried, one exchange per round with each training message also
evaluating the previous model, except under --secure); `--carry-evaluation` or `--evaluate-apart`
force it either way, for both runs. Carried, the median is over rounds 2..N, round 1 carrying the
start-up. Bytes: computed from the ArrayRecords (a
round sends each client the model twice, train and evaluate (carried: once), and receives one train reply: the
ALS statistics, or the model with mf-solver = "sgd"), and checked against the network traffic the SuperLink counted for the
deployed run (`flwr ls --format json`, network-traffic), which adds message framing and metrics.
The floor: before round 0 each run sends 5 empty exchanges (probe-messages, server/probes.py), one
message to every merchant each, timed by the ServerApp: the record of mode "noop". The deployed
SuperNodes run as deploy.merchant starts them (deploy/supernode.py: no idle waits, a warm
ClientApp start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# deploy/ is not among pyproject.toml's installed packages: import it from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from client.privacy.plan import noisy_release_wire
from deploy.local import local_deployment, write_merchant_data
from deploy.processes import positive_int
from deploy.warm_clientapp import ISOLATION_ENV, ISOLATIONS
from server.probes import PROBES_FILE
from shared.als import ALSSettings
from shared.config import RunConfig
from shared.data.sources import load_catalog
from shared.params import init_global_arrays
from shared.wire import ALS_ADS, to_array_record
from simulations import PROJECT_ROOT
from simulations.runtime import run_simulation

PROBES = 5  # empty exchanges before round 0 (probe-messages): the runtime's per-message floor


DATA = {
    "synthetic": {},
    "ml100k": {"dataset": "movielens-100k", "data-path": str(PROJECT_ROOT.parent / "shared" / "data" / "movielens" / "ml-100k"),
               "partitioning": "iid"},
}
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "deployment.json"


def _run_config(output: Path, merchants: int, rounds: int, privacy: str, secure: bool = False, data: str = "synthetic",
                carry: bool | str = "auto") -> RunConfig:
    return RunConfig.from_flower({
        "num-rounds": rounds, "min-nodes": merchants, "synthetic-merchants": merchants, "privacy": privacy,
        "output-dir": str(output / "out"), "state-dir": str(output / "out" / "state"), "secure-aggregation": secure, **DATA[data],
        "probe-messages": PROBES, "carry-evaluation": carry,
    })


def _write_records(path: Path, data: str, privacy: str, merchants: int, state: str, results: dict[str, Any]) -> None:
    """benchmarks/results/deployment.json: this run's three records replace those of the same data,
    privacy, merchants, SuperLink state, ClientApp threads, carry-evaluation and ClientApp isolation
    (records without a state were measured with the database, without a thread count with the
    libraries' defaults, without carry_evaluation with evaluations in exchanges of their own,
    without clientapp_isolation with a process forked per message)."""
    threads, carry, isolation = results["clientapp_threads"], results["carry_evaluation"], results["clientapp_isolation"]
    records = json.loads(path.read_text()) if path.is_file() else []
    records = [r for r in records if (r.get("data"), r["privacy"], r["merchants"], r.get("superlink_state", "database"),
                                      r.get("clientapp_threads"), r.get("carry_evaluation", False), r.get("clientapp_isolation", "process"))
               != (data, privacy, merchants, state, threads, carry, isolation)]
    common = {"data": data, "superlink_state": state, "clientapp_threads": threads, "carry_evaluation": carry,
              "clientapp_isolation": isolation}
    for mode in ("simulation", "deployment"):
        records.append({"mode": mode, "privacy": privacy, "merchants": merchants, "round_seconds": results[mode]["median_round_seconds"],
                        "bytes_per_client": results["bytes"]["per_client_per_round_sent"], **common})
    # the floor: one exchange of empty messages with every merchant, in the deployment
    records.append({"mode": "noop", "privacy": privacy, "merchants": merchants, "round_seconds": results["deployment"]["probe_median_seconds"],
                    "bytes_per_client": 0, **common})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")


def _round_times(cfg: RunConfig) -> dict[str, float]:
    history = json.loads((Path(cfg.output_dir) / "history.json").read_text())
    # round 0's evaluation holds the merchants' start-up (their first message); carried, round 1's
    first = 1 if cfg.evaluation_carried else 0
    later = [h["round_seconds"] for h in history[first + 1:]]
    probes = json.loads((Path(cfg.output_dir) / PROBES_FILE).read_text())
    return {"round0_seconds": history[first]["round_seconds"], "median_round_seconds": statistics.median(later),
            "min_round_seconds": min(later), "max_round_seconds": max(later), "probe_median_seconds": probes["median_seconds"],
            "probe_seconds": probes["exchange_seconds"]}


def _model_bytes(cfg: RunConfig) -> dict[str, int]:
    """Sizes of the global model (server -> client) and of a train reply (client -> server: the
    ALS statistics, float32 or float16, or the SGD-trained model)."""
    num_ads = len(load_catalog(cfg.data_config()))  # the synthetic market's, or MovieLens' 1,682
    arrays = init_global_arrays(num_ads, cfg.factors, cfg.seed)
    record = to_array_record(arrays)
    if cfg.mf_solver == "als":
        # without DP a sparse release's shapes for every ad touched: an upper bound (the SuperLink's count is the measure)
        shapes = ALSSettings.from_config(cfg).stat_shapes(num_ads, cfg.factors)
        stats = {key: np.zeros(shape, dtype=np.int64 if key == ALS_ADS else np.float32) for key, shape in shapes.items()}
        # under DP in the dtype the private plan sends (client/privacy/private_als.py)
        reply = to_array_record(noisy_release_wire(cfg, stats) if cfg.privacy == "user" else stats)
    else:
        reply = record
    return {"raw": sum(a.nbytes for a in arrays.values()), "array_record": sum(len(a.data) for a in record.values()),
            "train_reply": sum(len(a.data) for a in reply.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merchants", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--privacy", default="none", choices=["none", "user", "client"])
    parser.add_argument("--secure", action="store_true", help="secure aggregation (needs --privacy user)")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "bench-deployment")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--data", choices=tuple(DATA), default="synthetic", help="ml100k: MovieLens-100K from ../shared/data, IID shards")
    parser.add_argument("--superlink-state", choices=("database", "memory"), default="database",
                        help="the SuperLink's state: its SQLite file (survives a restart) or its memory")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the records file (mode, privacy, merchants, round_seconds, bytes_per_client)")
    evaluation = parser.add_mutually_exclusive_group()
    evaluation.add_argument("--carry-evaluation", action="store_const", const=True, dest="carry", default="auto",
                            help="carry-evaluation = true: each round's training messages also carry the previous model's evaluation")
    evaluation.add_argument("--evaluate-apart", action="store_const", const=False, dest="carry",
                            help="carry-evaluation = false: every evaluation in an exchange of its own")
    parser.add_argument("--clientapp-isolation", choices=ISOLATIONS, default=ISOLATIONS[0],
                        help="how each deployed SuperNode runs a message's ClientApp (deploy.merchant --clientapp-isolation)")
    parser.add_argument("--clientapp-threads", type=positive_int,
                        help="each deployed ClientApp's numerical threads (default: the cores divided among the merchants)")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "merchants": args.merchants, "rounds": args.rounds, "privacy": args.privacy, "secure": args.secure,
        "superlink_state": args.superlink_state, "clientapp_isolation": args.clientapp_isolation,
    }

    sim_cfg = _run_config(output / "simulation", args.merchants, args.rounds, args.privacy, args.secure, args.data, args.carry)
    carried = results["carry_evaluation"] = sim_cfg.evaluation_carried
    started = time.perf_counter()
    run_simulation(sim_cfg.to_flower(), args.merchants, output / "simulation" / "flower", timeout=args.timeout)
    results["simulation"] = {"wall_seconds": time.perf_counter() - started, **_round_times(sim_cfg)}

    dep_cfg = _run_config(output / "deployment", args.merchants, args.rounds, args.privacy, args.secure, args.data, args.carry)
    # a merchant's policy gives no less privacy than it is asked for: non-private runs need merchants that opt out
    merchants = write_merchant_data(output / "deployment" / "merchants", dep_cfg.to_flower(), args.merchants,
                                    privacy_mode="user" if args.privacy == "user" else "none",
                                    secure_aggregation="allow" if args.secure else "refuse")
    started = time.perf_counter()
    with local_deployment(output / "deployment" / "flower", merchants, in_memory_state=args.superlink_state == "memory",
                          clientapp_threads=args.clientapp_threads, supernode_env={ISOLATION_ENV: args.clientapp_isolation}) as deployed:
        up = time.perf_counter() - started
        results["clientapp_threads"] = deployed.clientapp_threads  # the deployment's own default when not given
        reply = deployed.submit(dep_cfg.to_flower())
        if not reply.get("success"):
            print(f"flwr run failed: {reply}", file=sys.stderr)
            return 1
        status, _ = deployed.wait_for_run(int(reply["run-id"]), args.timeout)
    if status.get("status") != "finished:completed":
        print(f"the deployed run did not complete: {status}", file=sys.stderr)
        return 1
    results["deployment"] = {"startup_seconds": up, "run_elapsed_seconds": status.get("elapsed"), **_round_times(dep_cfg)}

    model = _model_bytes(dep_cfg)
    n, r = args.merchants, args.rounds
    traffic = status.get("network-traffic", {})
    per_round = 1 if carried else 2  # model messages to each merchant per round
    results["bytes"] = {
        "model_raw": model["raw"], "model_array_record": model["array_record"],
        "per_client_per_round_received": per_round * model["array_record"], "per_client_per_round_sent": model["train_reply"],
        # what the SuperLink counted: outbound = to SuperNodes (n * (2r + 1) model messages, round 0 evaluates too;
        # carried: n * (r + 1), the last model's evaluation), inbound = from SuperNodes (n * r train replies, plus metrics)
        "superlink_outbound": traffic.get("outbound-bytes"), "superlink_inbound": traffic.get("inbound-bytes"),
        "superlink_outbound_per_model_message": traffic.get("outbound-bytes", 0) / (n * (per_round * r + 1)),
        "superlink_inbound_per_client_per_round": traffic.get("inbound-bytes", 0) / (n * r),
    }
    (output / "results.json").write_text(json.dumps(results, indent=2))
    _write_records(args.results, args.data, args.privacy, args.merchants, args.superlink_state, results)
    sim, dep, b = results["simulation"], results["deployment"], results["bytes"]
    print(f"{results['date']}  {results['machine']}  {n} merchants, {r} rounds, privacy={args.privacy}, secure={args.secure}, "
          f"mf-solver={dep_cfg.mf_solver}, SuperLink state: {args.superlink_state}, "
          f"carry-evaluation={args.carry} ({'carried' if carried else 'apart'}), "
          f"ClientApp isolation: {args.clientapp_isolation}")
    print(f"median round: simulation {sim['median_round_seconds']:.2f}s, deployment (TLS, {n} SuperNodes) {dep['median_round_seconds']:.2f}s"
          f"  (round 0: {sim['round0_seconds']:.2f}s vs {dep['round0_seconds']:.2f}s); "
          f"ratio {dep['median_round_seconds'] / sim['median_round_seconds']:.1f}x")
    print(f"empty exchange with every merchant (median of {PROBES}): simulation {sim['probe_median_seconds']:.3f}s, "
          f"deployment {dep['probe_median_seconds']:.3f}s")
    print(f"model ArrayRecord {b['model_array_record']} B (raw arrays {b['model_raw']} B): per client per round "
          f"receives {b['per_client_per_round_received']} B, sends {b['per_client_per_round_sent']} B")
    print(f"SuperLink counted: outbound {b['superlink_outbound']} B = {b['superlink_outbound_per_model_message']:.0f} B per model message; "
          f"inbound {b['superlink_inbound']} B = {b['superlink_inbound_per_client_per_round']:.0f} B per client per round")
    print(f"results: {output / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
