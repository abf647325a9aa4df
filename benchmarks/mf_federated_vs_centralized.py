"""MovieLens-100K (or any supported dataset): TopPop vs centralized MF vs federated MF.

    .venv/bin/python benchmarks/mf_federated_vs_centralized.py --rounds 50 --clients 5

Centralized and TopPop run in-process with the same trainer and metric code; the federated run
goes through Flower's simulation runtime with the same ServerApp and ClientApp as a deployment,
over IID user shards. Reads ../shared/data; prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from shared.config import RunConfig, parse_override
from shared.data.sources import load_dataset
from simulations import PROJECT_ROOT
from simulations.baselines import centralized, toppop
from simulations.runtime import run_simulation

DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "movielens" / "ml-100k"
SHOWN = ("hr10_sampled", "ndcg10_sampled", "hr10_full", "ndcg10_full", "recall20_full", "auc_full")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "bench-mf")
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not (args.data / "u.data").is_file():
        print(f"MovieLens-100K not found at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)

    overrides = dict(parse_override(item) for item in args.config)
    output = args.output.resolve()
    values = {
        "privacy": "none", "dataset": "movielens-100k", "data-path": str(args.data.resolve()), "partitioning": "iid",
        "num-rounds": args.rounds, "min-nodes": min(args.clients, 2),
        "output-dir": str(output / "federated"), "state-dir": str(output / "federated" / "state"),
        **overrides,
    }
    cfg = RunConfig.from_flower(values)
    dataset = load_dataset(cfg)
    results: dict[str, dict] = {}

    results["TopPop"] = {"metrics": toppop(cfg, dataset)}
    started = time.perf_counter()
    def progress(record: dict) -> None:
        print(f"centralized round {record['round']}: ndcg10_sampled {record['evaluate']['ndcg10_sampled']:.4f}", flush=True)

    history = centralized(cfg, dataset, on_round=progress)
    results["Centralized MF"] = {"metrics": history[-1]["evaluate"], "wall": time.perf_counter() - started,
                                 "round": sorted(h["round_seconds"] for h in history[1:])[len(history[1:]) // 2]}
    if not args.skip_federated:
        started = time.perf_counter()
        run_simulation(cfg.to_flower(), args.clients, output / "flower", stream_to=None)
        wall = time.perf_counter() - started
        fed = json.loads((output / "federated" / "history.json").read_text())
        results[f"Federated MF ({args.clients} shards)"] = {
            "metrics": fed[-1]["evaluate"], "wall": wall,
            "round": sorted(h["round_seconds"] for h in fed[1:])[len(fed[1:]) // 2],
        }

    print(f"\n{date.today()} on {platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread),"
          f" {cfg.num_rounds} rounds, factors {cfg.factors}, local epochs {cfg.local_epochs}")
    print("| method | " + " | ".join(SHOWN) + " | median round s | run wall s |")
    print("|---|" + "---|" * (len(SHOWN) + 2))
    for name, r in results.items():
        cells = " | ".join(f"{r['metrics'][k]:.4f}" for k in SHOWN)
        print(f"| {name} | {cells} | {r.get('round', float('nan')):.2f} | {r.get('wall', float('nan')):.1f} |")
    central = results["Centralized MF"]["metrics"]["ndcg10_sampled"]
    for name, r in results.items():
        if name.startswith("Federated"):
            print(f"\nfederated / centralized NDCG@10 (sampled): {r['metrics']['ndcg10_sampled'] / central:.4f}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
