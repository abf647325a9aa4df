"""Wall time of a DP-SGD local epoch vs a non-private epoch of the same per-user pipeline.

    .venv/bin/python benchmarks/dp_overhead.py --repeats 7 [--model mf | neumf]

For one IID shard (1 of 5) of MovieLens-100K and of Amazon Beauty (read from ../shared/data):
the same users, row sets, user vectors, per-user loss, optimizer and expected batch size; the
non-private side iterates shuffled batches, the private side Poisson batches with per-user
clipping and noise: Opacus in "hooks" and "ghost" modes, and "fused" (Opacus' sampler and
accountant, closed-form per-user clipping; client/privacy/dp_sgd_epochs.py; MF only). `--model neumf`:
NeuMF (shared/neumf.py, layers 32,16) instead of MF, whose per-user clipping is Opacus' alone.
Runs are interleaved and repeated; the table reports medians and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import torch

from client.privacy.dp_sgd_epochs import DPSGDSettings, PerUserLoss, private_ad_epochs, resolve_grad_sample_mode
from client.solvers.sgd_rows import UserRows, build_user_rows
from shared.accounting import user_sample_rate
from shared.config import RunConfig
from shared.data.partition import partition_users, shard_log
from shared.data.sources import load_dataset
from shared.data.split import leave_last_out
from shared.model import AdModel
from shared.neumf import NeuMF
from shared.neumf_arrays import init_neumf_arrays
from shared.params import init_global_arrays

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {
    "MovieLens-100K": {"dataset": "movielens-100k", "data-path": str(DATA / "movielens" / "ml-100k")},
    "Amazon Beauty": {
        "dataset": "amazon-seq",
        "data-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty.txt"),
        "catalog-path": str(DATA / "seqrec" / "s3rec-amazon" / "Beauty_item2attributes.json"),
    },
}


def plain_epochs(arrays, user_factors, rows: UserRows, batch_size: int, epochs: int, lr: float, seed: int, build_model=AdModel.from_arrays) -> None:
    """The non-private twin of private_ad_epochs: same model, loss, optimizer and batch size."""
    model = build_model(arrays)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = PerUserLoss()
    users = torch.as_tensor(user_factors)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(users), generator=generator).split(batch_size):
            part = rows.take(batch)
            optimizer.zero_grad(set_to_none=True)
            criterion(model(users[batch], part.ads), part.target()).backward()
            optimizer.step()



def _same(rows: UserRows) -> UserRows:
    """Every epoch on the same rows: the benchmark times the steps, not the row sampling."""
    return rows

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed call (one DP engine set-up per call)")
    parser.add_argument("--batch-users", type=int, default=64)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--model", choices=("mf", "neumf"), default="mf")
    parser.add_argument("--sample-rate", type=float, default=None, help=(
        "Poisson rate of the private side (the shipped dp-sample-rate is 0.25); the non-private side then runs "
        "batches of the same expected size (overrides --batch-users)"))
    parser.add_argument("--modes", nargs="+", choices=("hooks", "ghost", "fused"), default=None, help=(
        "private modes to time (default: all that apply; hooks at a large batch of a large catalog needs GBs)"))
    parser.add_argument("--datasets", nargs="+", choices=tuple(DATASETS), default=list(DATASETS))
    args = parser.parse_args()
    neumf = args.model == "neumf"
    build_model = NeuMF.from_arrays if neumf else AdModel.from_arrays
    torch.set_num_threads(1)
    batch_text = f"Poisson rate {args.sample_rate}" if args.sample_rate else f"expected batch {args.batch_users} users"
    print(f"{date.today()} on {platform.node()} ({platform.machine()}, 1 torch thread), {args.repeats} repeats x {args.epochs} epochs, "
          f"{batch_text}, k={args.factors}, model {args.model}")
    print("| data (1 of 5 IID shards) | users | ads | non-DP s/epoch | hooks s/epoch | ghost s/epoch | fused s/epoch "
          "| hooks / non-DP | ghost / non-DP | fused / non-DP | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets:
        source = DATASETS[name]
        if not Path(source["data-path"]).exists():
            print(f"| {name} | skipped: not found at {source['data-path']} |")
            continue
        cfg = RunConfig.from_flower({**source, "factors": args.factors})
        dataset = load_dataset(cfg)
        shard = shard_log(dataset.log, partition_users(dataset.log, dataset.catalog, "iid", 5, seed=0)[0])
        split = leave_last_out(shard, len(dataset.catalog))
        rows = build_user_rows(split, np.random.default_rng(0), cfg.negatives, cfg.max_positives_per_user)
        if neumf:
            arrays = init_neumf_arrays(len(dataset.catalog), args.factors, (32, 16), 0)
        else:
            arrays = init_global_arrays(len(dataset.catalog), args.factors, 0)
        width = 2 * args.factors if neumf else args.factors
        user_factors = (0.3 * np.random.default_rng(1).standard_normal((split.num_users, width))).astype(np.float32)
        q = args.sample_rate or user_sample_rate(args.batch_users, split.num_users)
        batch = round(q * split.num_users)
        modes = [m for m in args.modes or ("hooks", "ghost", "fused") if not (neumf and m == "fused")]
        times: dict[str, list[float]] = {"plain": [], **{m: [] for m in modes}}
        for repeat in range(args.repeats):
            for mode in times:
                started = time.perf_counter()
                if mode == "plain":
                    plain_epochs(arrays, user_factors, rows, batch, args.epochs, cfg.learning_rate, repeat, build_model)
                else:
                    settings = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=q, epochs=args.epochs,
                                             learning_rate=cfg.learning_rate, grad_sample_mode=mode, seed=repeat)
                    private_ad_epochs(arrays, user_factors, partial(_same, rows), settings, [], build_model)
                times[mode].append((time.perf_counter() - started) / args.epochs)
        median = {m: statistics.median(t) for m, t in times.items()}
        ratio = {m: statistics.median(a / b for a, b in zip(times[m], times["plain"])) for m in times if m != "plain"}
        parameters = sum(p.numel() for p in build_model(arrays).parameters())
        auto = resolve_grad_sample_mode("auto", parameters, q * split.num_users, closed_form=not neumf)
        seconds = " | ".join(f"{median[m]:.3f}" if m in median else "-" for m in ("hooks", "ghost", "fused"))
        ratios = " | ".join(f"{ratio[m]:.2f}" if m in ratio else "-" for m in ("hooks", "ghost", "fused"))
        print(f"| {name} | {split.num_users} | {len(dataset.catalog)} | {median['plain']:.3f} | {seconds} | {ratios} | {auto} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
