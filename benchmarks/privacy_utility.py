"""Privacy-utility of user-level DP-SGD: federated MF at several epsilons, 5 IID shards.

    .venv/bin/python benchmarks/privacy_utility.py --data ml100k --rounds 20 --epsilons 1 4 8 16
    .venv/bin/python benchmarks/privacy_utility.py --data beauty --rounds 10 --epsilons 1 4 8 16

Each cell is a Flower simulation (same ServerApp/ClientApp as a deployment) with
privacy="user" and the given target epsilon per merchant, plus one non-private run and TopPop.
Evaluation uses dp-metrics="exact" (a simulation's evaluator owns all the data; those metric
releases are outside the guarantee, the model's releases are inside it).
Prints Markdown rows for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from shared.config import RunConfig, parse_override
from shared.data.sources import load_dataset
from shared.wire import DP_NOISE_MULTIPLIER
from simulations import PROJECT_ROOT
from simulations.baselines import toppop
from simulations.runtime import run_simulation

DATA = PROJECT_ROOT.parent / "shared" / "data"
SOURCES = {
    "ml100k": {"dataset": "movielens-100k", "data-path": str(DATA / "movielens" / "ml-100k")},
    "beauty": {
        "dataset": "amazon-seq",
        "data-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty.txt"),
        "catalog-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty_item2attributes.json"),
    },
}
SHOWN = ("hr10_sampled", "ndcg10_sampled", "hr10_full", "ndcg10_full")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(SOURCES), default="ml100k")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--skip-nondp", action="store_true")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "outputs" / "bench-privacy")
    args = parser.parse_args()

    overrides = dict(parse_override(item) for item in args.config)
    base = {
        **SOURCES[args.data], "partitioning": "iid",
        "num-rounds": args.rounds, "min-nodes": min(args.clients, 2), "dp-metrics": "exact", **overrides,
    }
    cells: list[tuple[str, dict]] = [(f"eps {e:g}", {"privacy": "user", "target-epsilon": float(e)}) for e in args.epsilons]
    if not args.skip_nondp:
        cells.append(("no DP", {"privacy": "none"}))
    print(f"{date.today()} on {platform.node()}: {args.data}, {args.clients} IID shards, {args.rounds} rounds, "
          f"clip {base['max-grad-norm']}, batch-users {base['batch-users']}, local epochs {base['local-epochs']}, factors {base['factors']}")
    print("| setting | " + " | ".join(SHOWN) + " | eps spent (max) | noise multiplier | delta | wall s |")
    print("|---|" + "---|" * (len(SHOWN) + 4))
    cfg = RunConfig.from_flower(base)
    pop = toppop(cfg, load_dataset(cfg))
    print("| TopPop | " + " | ".join(f"{pop[k]:.4f}" for k in SHOWN) + " | - | - | - | - |", flush=True)
    for name, extra in cells:
        out = (args.output / args.data / name.replace(" ", "-")).resolve()
        values = {**base, **extra, "output-dir": str(out), "state-dir": str(out / "state")}
        started = time.perf_counter()
        run_simulation(RunConfig.from_flower(values).to_flower(), args.clients, out / "flower")
        wall = time.perf_counter() - started
        history = json.loads((out / "history.json").read_text())
        final = history[-1]
        metrics = final["evaluate"]
        clients = final["clients"].values()
        sigma = sorted({round(c.get(DP_NOISE_MULTIPLIER, 0.0), 3) for c in clients})
        ledgers = [json.loads(p.read_text())["ledger"] for p in sorted(out.glob("state/*/privacy_ledger.json"))]
        deltas = sorted({f"{lg['delta']:.1e}" for lg in ledgers if lg.get("delta")})
        eps = final.get("privacy", {}).get("epsilon_max")
        print(f"| {name} | " + " | ".join(f"{metrics[k]:.4f}" for k in SHOWN)
              + f" | {'-' if eps is None else f'{eps:.3f}'} | {', '.join(map(str, sigma)) if extra['privacy'] == 'user' else '-'}"
              + f" | {', '.join(deltas) or '-'} | {wall:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
