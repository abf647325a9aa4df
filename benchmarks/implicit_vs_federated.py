"""Federated ALS without DP against the `implicit` library's ALS, side by side (issue 16).

    .venv/bin/python -m pip install -e '.[benchmarks]'   # implicit: a benchmark-only extra
    .venv/bin/python benchmarks/implicit_vs_federated.py --datasets ml100k beauty

For each data set, loaded exactly as its experiment file (experiments/<name>.toml) has a
simulation load it, cut into the experiment's 5 IID merchants:
- "federated": the experiment's base cell (privacy none), run in-process with the very code
  of a Flower run: each merchant's ALSSolver fits its users and computes its exact ad
  statistics (float32 on the wire, as the no-privacy plan releases them), the run's strategy
  (server/strategies.build_strategy: ALSAggregation) checks, sums and solves them; after the
  last round every merchant fits its users on the final model and evaluates, as the Flower
  run's last evaluation does.
- "implicit-als": implicit.als.AlternatingLeastSquares (CPU) on the union of the merchants'
  training positives, with the same number of factors; its confidence weight alpha, its
  regularization and its iterations are chosen on a validation slice (each user's most recent
  training positive held out of training, ranked by the same protocol; the choice maximizes
  NDCG@10 sampled + full, each relative to its best over the grid), then it is refitted on the
  whole training data and tested. `--test-grid` also tests every setting of the grid and
  shows each metric's best on test (optimistic for implicit).
Both are scored by NodeData.evaluate (shared/metrics.py) on every merchant's own test users
(sampled: against 99 fixed negatives; full: against every ad without a training positive),
averaged with weights equal to each merchant's test users: the same users, the same code.

`--federated-grid` adds "federated-validated": the federated run at the als-alpha0 and
als-user-l2 = als-ad-l2 its own grid chose on the same validation slice by the same rule.
`--set KEY=VALUE` changes the federated run's config (e.g. `--set init=random`; nothing is
written then). Records (dataset, epsilon None, method, secure_aggregation False and the four
metrics) go to benchmarks/results/implicit_vs_federated.json, replacing those of the data sets run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

import federated_als
from results_file import merged, write_records

from client.node_data import EVAL_NEGATIVES, NodeData
from shared.config import RunConfig
from shared.data.schema import AdCatalog
from shared.data.sources import load_dataset
from shared.data.split import NO_TEST, UserSplit, sample_eval_negatives
from shared.flower_internals import server_identity
from shared.metrics import NUM_TEST_USERS
from shared.wire import AD_BIAS, AD_FACTORS
from simulations.baselines import shard_data

RESULTS = federated_als.ROOT / "benchmarks" / "results" / "implicit_vs_federated.json"
CLIENTS = federated_als.CLIENTS
REPORTED = ("ndcg10_sampled", "ndcg10_full", "hr10_sampled", "hr10_full")
# the two targets: they weigh the same in the choices on the validation slice (best_of)
SELECTION = ("ndcg10_sampled", "ndcg10_full")
# implicit's grid, wide enough that no data set's choice sits on its edge: Beauty's best runs along
# a ridge, regularization about 3 x alpha, towards large alpha (unobserved pairs weigh 1 / alpha)
ALPHAS = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
REGULARIZATIONS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
# the federated side's (--federated-grid): the same ridge, als-alpha0 about 1 / alpha and L2 about reg / alpha
ALPHA0S = (1.0, 0.5, 0.1, 0.025, 0.00625, 0.003125, 0.0015625)
L2S = (1.0, 3.0)
VALIDATED = "federated-validated"  # the federated run at the ALS settings its validation grid chose

Choice = TypeVar("Choice")


@dataclass(frozen=True)
class ImplicitSetting:
    alpha: float  # confidence of an observed positive (implicit: c = alpha x value; every other pair 1)
    regularization: float
    iterations: int

    def label(self) -> str:
        return f"alpha {self.alpha:g}, reg {self.regularization:g}, {self.iterations} it"


def weighted(results: list[dict[str, float]]) -> dict[str, float]:
    """Means over every merchant's test users (each merchant weighs its test users), as the run reports."""
    weights = np.array([r[NUM_TEST_USERS] for r in results])
    return {k: float(np.dot([r[k] for r in results], weights) / weights.sum()) for k in REPORTED}


def best_of(grid: list[tuple[dict[str, float], Choice]]) -> Choice:
    """The grid's choice on the validation slice: the largest sum over SELECTION of each metric
    relative to its best over the grid (full-ranking NDCG is about a tenth of the sampled one:
    a plain sum would choose on the sampled one alone)."""
    best = {k: max(metrics[k] for metrics, _ in grid) or 1.0 for k in SELECTION}
    return max(grid, key=lambda pair: sum(pair[0][k] / best[k] for k in SELECTION))[1]


# ------------------------------------------------------------------------- validation slice
def validation_split(split: UserSplit) -> UserSplit:
    """Each user's most recent training positive held out (users left with at least one), the
    test ads removed: a leave-last-out split of the training data alone."""
    counts = split.positive_counts()
    held = counts >= 2
    keep = np.ones(len(split.pos_ads), dtype=bool)
    keep[split.pos_offsets[1:][held] - 1] = False  # positives are in time order: the last is the most recent
    offsets = np.zeros(split.num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts - held)
    test_ad = np.where(held, split.pos_ads[np.maximum(split.pos_offsets[1:] - 1, 0)], NO_TEST)
    return UserSplit(split.user_ids, split.num_ads, offsets, split.pos_ads[keep], split.imp_offsets, split.imp_ads, test_ad.astype(np.int64))


def validation_data(data: NodeData, seed: int) -> NodeData:
    # a user's test ad may be drawn among the validation negatives: no model here has seen it
    split = validation_split(data.split)
    return NodeData(split, sample_eval_negatives(split, EVAL_NEGATIVES, seed), data.ad_features)


# ------------------------------------------------------------------------------- federated
def federated(cfg: RunConfig, catalog: AdCatalog, shards: list[NodeData]) -> dict[str, float]:
    """The Flower run's computation, in-process (benchmarks/federated_als.py), then every
    merchant's evaluation of the final model."""
    arrays, users = federated_als.train(cfg, catalog, shards)
    return weighted([data.evaluate(arrays, factors, None) for data, factors in zip(shards, users)])  # the models alone, as implicit's


# -------------------------------------------------------------------------------- implicit
def pooled_positives(shards: list[NodeData]) -> sp.csr_matrix:
    """Users (the shards' users, stacked in shard order) x ads, 1 per training positive."""
    rows = np.concatenate([data.split.positive_user_index() + offset for data, offset in zip(shards, _offsets(shards))])
    cols = np.concatenate([data.split.pos_ads for data in shards])
    num_users = sum(data.num_users for data in shards)
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(num_users, shards[0].num_ads))


def _offsets(shards: list[NodeData]) -> list[int]:
    return [0, *np.cumsum([data.num_users for data in shards])[:-1].tolist()]


def implicit_als(shards: list[NodeData], factors: int, setting: ImplicitSetting, seed: int, threads: int) -> dict[str, float]:
    """implicit's ALS on the pooled training positives, each merchant's users scored by the same code
    (score = p_u . q_a, no bias: AD_BIAS zeros)."""
    from implicit.cpu.als import AlternatingLeastSquares  # the CPU model whatever CUDA the machine has

    model = AlternatingLeastSquares(factors=factors, regularization=setting.regularization, alpha=setting.alpha,
                                    iterations=setting.iterations, random_state=seed, num_threads=threads)
    model.fit(pooled_positives(shards), show_progress=False)
    arrays = {AD_FACTORS: np.asarray(model.item_factors, dtype=np.float32), AD_BIAS: np.zeros(shards[0].num_ads, dtype=np.float32)}
    users = np.asarray(model.user_factors, dtype=np.float32)
    return weighted([data.evaluate(arrays, users[offset : offset + data.num_users], None) for data, offset in zip(shards, _offsets(shards))])


# ------------------------------------------------------------------------------------- run
def run_dataset(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    started = time.perf_counter()
    cfg = federated_als.experiment_cell(name)
    if args.set:
        cfg = cfg.with_values("--set", **dict(item.split("=", 1) for item in args.set))
    dataset = load_dataset(cfg)
    shards = [data for _, data in shard_data(cfg, dataset, CLIENTS)]
    valid = [validation_data(data, cfg.seed) for data in shards]
    test_users = sum(len(d.split.test_users) for d in shards)
    print(f"\n## {name}: {sum(d.num_users for d in shards)} users, {shards[0].num_ads} ads, {test_users} test users, "
          f"{CLIENTS} IID merchants, factors {cfg.factors}, {cfg.num_rounds} rounds (loaded and split in {time.perf_counter() - started:.0f} s)",
          flush=True)

    if args.federated_only:
        return _federated_only(name, cfg, dataset.catalog, shards, args.output)
    grid = [ImplicitSetting(a, r, i) for a, r, i in itertools.product(args.alphas, args.regularizations, args.iterations)]
    print("\n| implicit-als setting | validation NDCG@10 sampled | validation NDCG@10 full |"
          + (" test NDCG@10 sampled | test NDCG@10 full |\n|---|---|---|---|---|" if args.test_grid else "\n|---|---|---|"))
    validated, tested = [], []
    for setting in grid:
        metrics = implicit_als(valid, cfg.factors, setting, cfg.seed, args.threads)
        validated.append((metrics, setting))
        line = f"| {setting.label()} | {metrics['ndcg10_sampled']:.4f} | {metrics['ndcg10_full']:.4f} |"
        if args.test_grid:
            tested.append(implicit_als(shards, cfg.factors, setting, cfg.seed, args.threads))
            line += f" {tested[-1]['ndcg10_sampled']:.4f} | {tested[-1]['ndcg10_full']:.4f} |"
        print(line, flush=True)
    chosen = best_of(validated)
    started = time.perf_counter()
    implicit_test = implicit_als(shards, cfg.factors, chosen, cfg.seed, args.threads)
    implicit_seconds = time.perf_counter() - started

    results: dict[str, dict[str, float]] = {}
    labels: dict[str, str] = {"implicit-als": chosen.label()}
    started = time.perf_counter()
    results["federated"], labels["federated"] = federated(cfg, dataset.catalog, shards), federated_label(cfg)
    federated_seconds = time.perf_counter() - started
    if args.federated_grid:
        print("\n| federated setting | validation NDCG@10 sampled | validation NDCG@10 full |\n|---|---|---|")
        candidates = []
        for alpha0, l2 in itertools.product(args.alpha0s, args.l2s):
            candidate = cfg.with_values("--federated-grid", als_alpha0=alpha0, als_user_l2=l2, als_ad_l2=l2)
            metrics = federated(candidate, dataset.catalog, valid)
            candidates.append((metrics, candidate))
            print(f"| {federated_label(candidate)} | {metrics['ndcg10_sampled']:.4f} | {metrics['ndcg10_full']:.4f} |", flush=True)
        validated_cfg = best_of(candidates)
        same = validated_cfg == cfg
        results[VALIDATED] = results["federated"] if same else federated(validated_cfg, dataset.catalog, shards)
        labels[VALIDATED] = federated_label(validated_cfg)
    results["implicit-als"] = implicit_test

    print(f"\n{'; '.join(f'{method}: {label}' for method, label in labels.items())} "
          f"(federated {federated_seconds:.0f} s, implicit-als {implicit_seconds:.1f} s)")
    print("\n| method | NDCG@10 sampled | NDCG@10 full | HR@10 sampled | HR@10 full |\n|---|---|---|---|---|")
    for method, metrics in results.items():
        print(f"| {method} | " + " | ".join(f"{metrics[k]:.4f}" for k in REPORTED) + " |")
    best = {k: max(m[k] for m in tested) for k in REPORTED} if tested else None
    if best:  # each metric's best over the grid on the test users themselves: optimistic for implicit
        print("| implicit-als, each metric's best of the grid on test | " + " | ".join(f"{best[k]:.4f}" for k in REPORTED) + " |")
    for method in (m for m in results if m != "implicit-als"):
        print(f"| {method} / implicit-als | " + " | ".join(f"**{results[method][k] / implicit_test[k]:.3f}**" for k in REPORTED) + " |")
        if best:
            print(f"| {method} / implicit-als's best on test | " + " | ".join(f"{results[method][k] / best[k]:.3f}" for k in REPORTED) + " |")
    sys.stdout.flush()
    records = [{"dataset": name, "epsilon": None, "method": method, "secure_aggregation": False, **{k: metrics[k] for k in REPORTED}}
               for method, metrics in results.items()]
    return records, {"dataset": name, **labels}


def _federated_only(name: str, cfg: RunConfig, catalog: Any, shards: list[NodeData], output: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The federated run at the experiment's settings alone, against the implicit-als record
    already in `output` (after a change of the federated side's defaults: implicit's grid is not rerun)."""
    started = time.perf_counter()
    metrics = federated(cfg, catalog, shards)
    earlier = [r for r in json.loads(output.read_text()) if r["dataset"] == name and r["method"] == "implicit-als"] if output.exists() else []
    print(f"\nfederated ({federated_label(cfg)}, {time.perf_counter() - started:.0f} s): "
          + ", ".join(f"{k} {metrics[k]:.4f}" for k in REPORTED))
    if earlier:
        print("federated / implicit-als (its record in the results file): "
              + ", ".join(f"{k} {metrics[k] / earlier[0][k]:.3f}" for k in REPORTED))
    record = {"dataset": name, "epsilon": None, "method": "federated", "secure_aggregation": False, **{k: metrics[k] for k in REPORTED}}
    return [record], {"dataset": name, "federated": federated_label(cfg)}


def federated_label(cfg: RunConfig) -> str:
    alpha0 = cfg.als_alpha0 if isinstance(cfg.als_alpha0, str) else f"{cfg.als_alpha0:g}"
    return f"als-alpha0 {alpha0}, als-user-l2 {cfg.als_user_l2}, als-ad-l2 {cfg.als_ad_l2}, {cfg.num_rounds} rounds"


def main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the strategy's per-round lines (the project logs under it)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(federated_als.EXPERIMENTS), default=["ml100k", "beauty"])
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS), help="implicit's confidence grid")
    parser.add_argument("--regularizations", nargs="+", type=float, default=list(REGULARIZATIONS), help="implicit's L2 grid")
    parser.add_argument("--iterations", nargs="+", type=int, default=[15, 30], help="implicit's iterations grid")
    parser.add_argument("--test-grid", action="store_true", help="also test every implicit setting: its best on test, beside the chosen one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config change of the federated side")
    parser.add_argument("--federated-grid", action="store_true", help="also choose als-alpha0 and the ALS L2 on the validation slice")
    parser.add_argument("--federated-only", action="store_true",
                        help="rerun only the federated record at the experiment's settings (the others stay in the results file)")
    parser.add_argument("--alpha0s", nargs="+", type=float, default=list(ALPHA0S), help="the federated grid's als-alpha0")
    parser.add_argument("--l2s", nargs="+", type=float, default=list(L2S), help="the federated grid's als-user-l2 = als-ad-l2")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and implicit threads (the machines are shared)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the records go (not written with --set)")
    args = parser.parse_args()

    try:
        import implicit.cpu.als  # noqa: F401  # loads its OpenBLAS before the thread limit below, which then covers it too
    except ImportError:
        print("implicit is not installed (pip install -e '.[benchmarks]'): nothing to compare, skipping")
        return 0
    missing = [name for name in args.datasets if not Path(federated_als.experiment_cell(name).data_path).exists()]
    if missing:
        print(f"no data for {', '.join(missing)} ({', '.join(federated_als.experiment_cell(n).data_path for n in missing)}): skipping")
        return 0
    print(f"{date.today()} on {platform.node()} ({platform.machine()}), {args.threads} thread(s)")
    records, chosen = [], []
    with server_identity(), threadpool_limits(limits=args.threads):
        for name in args.datasets:
            rows, settings = run_dataset(name, args)
            records += rows
            chosen.append(settings)
    if args.set:
        print("\n(the experiment's settings changed by --set: records not written)")
        return 0
    # the data sets run replace their records; the file keeps the others' (runs one data set at a time)
    replaced = {(r["dataset"], r["method"]) for r in records}
    write_records(args.output, merged(args.output, records, lambda r: (r["dataset"], r["method"]) in replaced
                                      or (not args.federated_only and r["dataset"] in args.datasets)))
    print(f"\n{len(records)} records -> {args.output}; settings: {json.dumps(chosen)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
