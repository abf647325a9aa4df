"""Accuracy across user groups on MovieLens-100K, private and non-private (issue 18, item 4: fairness).

    cd /work/main && .venv/bin/python -W ignore benchmarks/user_groups.py [--repeats 3] [--epsilon 8] [--bootstrap 2000]

MovieLens-100K's shipped experiment (experiments/ml100k.toml), 5 IID merchants, trained in-process
with the very code of a Flower run (benchmarks/federated_als.py):
- "federated-als": the base cell, federated ALS without DP (deterministic: one run);
- "private-als": the private-ALS cell at epsilon 8 (user-level DP, every merchant adding the full
  Gaussian noise of its releases); the noise is fresh each run (the project never seeds DP noise),
  so it trains `--repeats` times and each user's metrics are averaged over the repeats;
- "popularity": the floor, every user's ads ranked by the pooled training popularity (global TopPop).
Every merchant's test users (leave-last-out: each user's last positive held out) are evaluated one
by one (shared.metrics.per_user_metrics: NDCG@10 and HR@10 against the user's 99 fixed sampled
negatives, the NCF protocol; NDCG@10 among all ads), joined on user id with u.user's attributes
(shared/data/user_attributes.py; never a model input), and averaged per group: gender, age band
(MovieLens-1M's bands) and occupation, beside "all" users. The 95% CI is a percentile bootstrap over
the group's users of its mean NDCG@10 sampled (seeded: the resampling, not the model, is fixed);
it measures which users happen to be in the group, not the DP noise (whose spread over repeats is
printed as "sd"). Printed: per group and model the means; the gap (largest minus smallest group
mean) per attribute and model; and per group the ratio private / non-private NDCG@10 sampled with
a paired bootstrap CI (who pays for privacy). Groups of a few users (occupations such as doctor,
homemaker: 7 users) have wide CIs, and a max - min gap over many small groups is inflated by
their sampling noise alone.

Writes benchmarks/results/user_groups.json: flat records with attribute, group, model, epsilon
(null: no DP), users, ndcg10_sampled, ndcg10_full, hr10_sampled, ci_low, ci_high (of ndcg10_sampled).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a site-packages `benchmarks` shadows this folder
sys.path.insert(0, str(ROOT / "benchmarks"))

import federated_als  # noqa: E402
from results_file import write_records  # noqa: E402

from client.node_data import NodeData  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.data.schema import Dataset  # noqa: E402
from shared.data.sources import load_dataset  # noqa: E402
from shared.data.user_attributes import AGE_BAND_NAMES, UserAttributes, load_movielens_users  # noqa: E402
from shared.flower_internals import server_identity  # noqa: E402
from shared.metrics import ScoreFn, per_user_metrics, toppop_score_fn  # noqa: E402
from shared.params import score_all  # noqa: E402
from shared.wire import Arrays  # noqa: E402
from simulations.baselines import pooled_data, shard_data  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "user_groups.json"
DATASET = "ml100k"
CLIENTS = federated_als.CLIENTS
METRICS = ("ndcg10_sampled", "ndcg10_full", "hr10_sampled")
ATTRIBUTES = ("gender", "age band", "occupation")
BOOTSTRAP_SEED = 2024


@dataclass(frozen=True)
class PerUser:
    """One model's metrics per test user, all merchants together; `repeats` [R, users] per metric
    (one row without DP), the user's value being the mean over its rows."""

    name: str
    epsilon: float | None
    user_ids: np.ndarray  # object (str), sorted
    repeats: dict[str, np.ndarray]

    def value(self, metric: str) -> np.ndarray:
        return self.repeats[metric].mean(axis=0)


def _per_user(shards: list[NodeData], score_fns: list[ScoreFn]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every merchant's test users (merchants' users are disjoint) and their metrics, sorted by user id."""
    ids: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for data, score_fn in zip(shards, score_fns):
        result = per_user_metrics(score_fn, data.split, data.eval_negatives)
        ids.append(data.user_ids[result["user"]])
        for m in METRICS:
            values[m].append(result[m])
    user_ids = np.concatenate(ids)
    order = np.argsort(user_ids.astype(str), kind="stable")
    if len(np.unique(user_ids)) != len(user_ids):
        raise SystemExit("a user is a test user of two merchants: the IID partition should be user-disjoint")
    return user_ids[order], {m: np.concatenate(values[m])[order] for m in METRICS}


def _score_fn(user_factors: np.ndarray, arrays: Arrays) -> ScoreFn:
    """The model alone, as NodeData.evaluate scores a merchant's users without content affinity."""
    return lambda rows: score_all(user_factors[rows], arrays)


def model_scores(cfg: RunConfig, dataset: Dataset, shards: list[NodeData], check: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Train the cell federated and evaluate it per user; `check`: the per-user means against NodeData.evaluate."""
    arrays, users = federated_als.train(cfg, dataset.catalog, shards)
    score_fns = [_score_fn(factors, arrays) for factors in users]
    user_ids, values = _per_user(shards, score_fns)
    if check:  # the per-user path must be the harness's evaluation, split by user
        expected = [data.evaluate(arrays, factors, None) for data, factors in zip(shards, users)]
        weights = np.array([e["num-test-users"] for e in expected])
        for m in METRICS:
            pooled = float(np.dot([e[m] for e in expected], weights) / weights.sum())
            assert np.isclose(values[m].mean(), pooled, rtol=1e-9, atol=1e-12), (m, values[m].mean(), pooled)
    return user_ids, values


def popularity_scores(cfg: RunConfig, dataset: Dataset, shards: list[NodeData]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Global TopPop per user: the merchants' training popularity summed (users are disjoint, so it is the pooled data's)."""
    popularity = np.sum([data.split.ad_popularity() for data in shards], axis=0)
    user_ids, values = _per_user(shards, [toppop_score_fn(popularity)] * len(shards))
    # the pooled data's own TopPop evaluation: same users, test ads and per-user-seeded negatives
    expected = pooled_data(cfg, dataset).evaluate_popularity()
    for m in METRICS:
        assert np.isclose(values[m].mean(), expected[m], rtol=1e-9, atol=1e-12), (m, values[m].mean(), expected[m])
    return user_ids, values


def group_of(attributes: UserAttributes, attribute: str) -> str:
    if attribute == "gender":
        return attributes.gender
    if attribute == "age band":
        return attributes.age_band
    return attributes.occupation


def groups(attribute: str, members: dict[str, np.ndarray]) -> list[str]:
    """Report order: age bands young to old, the others largest group first."""
    if attribute == "age band":
        return [band for band in AGE_BAND_NAMES if band in members]
    return sorted(members, key=lambda g: (-len(members[g]), g))


def bootstrap_ci(values: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean."""
    if len(values) < 2:
        return float("nan"), float("nan")
    means = values[rng.integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def ratio_ci(private: np.ndarray, public: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """Paired percentile bootstrap 95% CI of mean(private) / mean(public) over the same users."""
    rows = rng.integers(0, len(private), size=(draws, len(private)))
    ratios = private[rows].mean(axis=1) / np.maximum(public[rows].mean(axis=1), 1e-12)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def main() -> int:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0, help="the private-ALS cell's epsilon (one of the experiment's)")
    parser.add_argument("--repeats", type=int, default=3, help="private trainings, each with fresh DP noise")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of each CI")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = federated_als.experiment_cell(DATASET)
    private = federated_als.experiment_cell(DATASET, args.epsilon)
    if not Path(base.data_path).exists():
        print(f"{base.data_path} is absent: nothing to measure")
        return 0
    started = time.perf_counter()
    print(f"{date.today()} on {platform.node()} ({platform.machine()}), {DATASET}, {CLIENTS} IID merchants; "
          f"federated ALS without DP ({base.num_rounds} rounds) and private ALS at epsilon {args.epsilon:g} "
          f"({private.num_rounds} releases, {args.repeats} repeats of fresh noise)", flush=True)
    attributes = load_movielens_users(base.data_path)
    dataset = load_dataset(base)
    if private.data_config() != base.data_config():
        raise SystemExit("the private cell cuts other data than the base cell: per-user comparison would not pair users")
    shards = [data for _, data in shard_data(base, dataset, CLIENTS)]

    models: list[PerUser] = []
    with server_identity():
        user_ids, values = model_scores(base, dataset, shards, check=True)
        models.append(PerUser("federated-als", None, user_ids, {m: values[m][None] for m in METRICS}))
        print(f"  federated-als: {time.perf_counter() - started:.0f} s", flush=True)
        runs = []
        for repeat in range(args.repeats):
            ids, values = model_scores(private, dataset, shards, check=repeat == 0)
            assert np.array_equal(ids, user_ids)
            runs.append(values)
            print(f"  private-als repeat {repeat + 1}: NDCG@10 sampled {values['ndcg10_sampled'].mean():.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        models.append(PerUser("private-als", args.epsilon, user_ids, {m: np.stack([r[m] for r in runs]) for m in METRICS}))
    ids, values = popularity_scores(base, dataset, shards)
    assert np.array_equal(ids, user_ids)
    models.append(PerUser("popularity", None, user_ids, {m: values[m][None] for m in METRICS}))

    missing = [u for u in user_ids if u not in attributes]
    if missing:
        raise SystemExit(f"{len(missing)} test users have no row in u.user (first: {missing[0]!r})")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    records: list[dict[str, Any]] = []
    by_model = {m.name: m for m in models}
    gaps: list[str] = []
    print(f"\n{len(user_ids)} test users ({time.perf_counter() - started:.0f} s). Per group: NDCG@10 sampled [95% CI], "
          "NDCG@10 full, HR@10 sampled; private: mean over repeats (sd of the group mean over repeats); "
          "ratio: private / no DP NDCG@10 sampled [paired 95% CI]")
    for attribute in ("all", *ATTRIBUTES):
        members: dict[str, list[int]] = {}
        for row, user in enumerate(user_ids):
            key = "all" if attribute == "all" else group_of(attributes[user], attribute)
            members.setdefault(key, []).append(row)
        index = {g: np.array(rows) for g, rows in members.items()}
        print(f"\n### {attribute}\n")
        print("| group | users | no DP: NDCG@10 s | full | HR@10 s | private: NDCG@10 s | full | HR@10 s | popularity: NDCG@10 s | full | HR@10 s "
              "| private / no DP |")
        print("|---|---:|---|---:|---:|---|---:|---:|---|---:|---:|---|")
        means: dict[str, dict[str, dict[str, float]]] = {m.name: {} for m in models}
        for group in groups(attribute, index):
            rows = index[group]
            cells = []
            for model in models:
                mean = {m: float(model.value(m)[rows].mean()) for m in METRICS}
                low, high = bootstrap_ci(model.value("ndcg10_sampled")[rows], args.bootstrap, rng)
                means[model.name][group] = mean
                spread = ""
                if model.repeats["ndcg10_sampled"].shape[0] > 1:
                    spread = f" (sd {float(model.repeats['ndcg10_sampled'][:, rows].mean(axis=1).std(ddof=1)):.3f})"
                cells += [f"{mean['ndcg10_sampled']:.3f} [{low:.3f}, {high:.3f}]{spread}",
                          f"{mean['ndcg10_full']:.3f}", f"{mean['hr10_sampled']:.3f}"]
                records.append({"attribute": attribute, "group": group, "model": model.name, "epsilon": model.epsilon, "users": len(rows),
                                **{m: round(mean[m], 4) for m in METRICS}, "ci_low": round(low, 4), "ci_high": round(high, 4)})
            ratio_of = (by_model["private-als"].value("ndcg10_sampled")[rows], by_model["federated-als"].value("ndcg10_sampled")[rows])
            low, high = ratio_ci(*ratio_of, args.bootstrap, rng)
            ratio = ratio_of[0].mean() / max(ratio_of[1].mean(), 1e-12)
            print(f"| {group} | {len(rows)} | " + " | ".join(cells) + f" | {ratio:.3f} [{low:.3f}, {high:.3f}] |")
        if attribute != "all":
            for model in models:
                of = means[model.name]
                ranked = sorted(of, key=lambda g: of[g]["ndcg10_sampled"])
                lowest, highest = ranked[0], ranked[-1]
                full = [of[g]["ndcg10_full"] for g in of]
                gaps.append(f"| {attribute} | {model.name} | {of[highest]['ndcg10_sampled'] - of[lowest]['ndcg10_sampled']:.3f} "
                            f"| {lowest} ({of[lowest]['ndcg10_sampled']:.3f}) | {highest} ({of[highest]['ndcg10_sampled']:.3f}) "
                            f"| {max(full) - min(full):.3f} |")
    print("\n### gap: largest minus smallest group mean\n")
    print("| attribute | model | gap NDCG@10 sampled | lowest group | highest group | gap NDCG@10 full |\n|---|---|---:|---|---|---:|")
    print("\n".join(gaps))
    write_records(args.output, records)
    print(f"\n{len(records)} records -> {args.output} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
