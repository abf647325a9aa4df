"""What the Gramian modes cost without DP, in accuracy and in what a merchant sends: exact
per-ad Gramians for every ad ("per-ad"), for the ads the merchant's rows touch ("sparse", the
default without DP), and count x the average user Gramian ("shared"); federated ALS on
MovieLens-100K and Beauty (issue 19).

    .venv/bin/python benchmarks/gram_approximation.py [--datasets ml100k beauty]

"per-ad" sends (d + 1)^2 floats per catalog ad, "sparse" an index and the packed upper triangle,
target and positives of each touched ad ((d + 1)(d + 2) / 2 + d + 2 values), "shared" d + 2 floats
per catalog ad. Each data set's shipped experiment cell without DP (5 IID merchants, d = 32, its
rounds), in-process with the code of a Flower run (benchmarks/federated_als.py), every merchant's
test users evaluated (NDCG@10 and HR@10 sampled against 99 negatives, NDCG@10 among all ads), and
the values a merchant sends per round (its mean over merchants; the index counts one value per ad).

Writes benchmarks/results/gram_approximation.json: records with dataset, gram, ndcg10_sampled,
hr10_sampled, ndcg10_full, floats_per_merchant.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

import federated_als  # noqa: E402
from implicit_vs_federated import weighted  # noqa: E402
from results_file import write_records  # noqa: E402

from shared.als import ALSSettings  # noqa: E402
from shared.data.sources import load_dataset  # noqa: E402
from shared.flower_internals import server_identity  # noqa: E402
from simulations.baselines import shard_data  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gram_approximation.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml100k", "beauty"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    print(f"{date.today()} on {platform.node()} ({platform.machine()})", flush=True)
    records: list[dict[str, Any]] = []
    for name in args.datasets:
        base = federated_als.experiment_cell(name)
        if not Path(base.data_path).exists():
            print(f"{name}: not found at {base.data_path}: skipped")
            continue
        dataset = load_dataset(base)
        for gram in ("per-ad", "sparse", "shared"):
            cfg = base.with_values(f"gram {gram}", als_gram=gram)
            shards = [data for _, data in shard_data(cfg, dataset, federated_als.CLIENTS)]
            started = time.perf_counter()
            with server_identity():  # the replies are Flower messages, as a runtime stamps them
                arrays, users = federated_als.train(cfg, dataset.catalog, shards)
            metrics = weighted([data.evaluate(arrays, factors, None) for data, factors in zip(shards, users)])  # the model alone
            settings = ALSSettings.from_config(cfg)
            floats = round(sum(sum(math.prod(shape) for shape in settings.stat_shapes(
                len(dataset.catalog), cfg.factors, touched=len(np.unique(data.rows.ad))).values()) for data in shards) / len(shards))
            record = {"dataset": name, "gram": gram, "ndcg10_sampled": metrics["ndcg10_sampled"], "hr10_sampled": metrics["hr10_sampled"],
                      "ndcg10_full": metrics["ndcg10_full"], "floats_per_merchant": floats}
            records.append(record)
            print(f"{name} {gram}: NDCG@10 sampled {record['ndcg10_sampled']:.4f}, HR@10 {record['hr10_sampled']:.4f}, "
                  f"NDCG@10 full {record['ndcg10_full']:.4f}, {floats:,} floats per merchant ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    write_records(args.results, records)
    print(f"records: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
