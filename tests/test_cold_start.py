"""Cold-start ads ranked by content alone (issue 17, item 3; simulations/cold_start.py)."""

from __future__ import annotations

import numpy as np
import pytest

from client.node_data import NodeData
from client.solvers.registry import solver_for
from shared.config import RunConfig
from shared.content import content_features
from shared.data.synthetic import SyntheticSpec, generate
from shared.params import initial_arrays
from simulations.cold_start import cold_split, evaluate_cold_start, rank_cold

SPEC = SyntheticSpec(users=1200, ads=400)


def test_cold_split_holds_cold_ads_out_entirely() -> None:
    dataset, _ = generate(SPEC)
    split = cold_split(dataset.log, len(dataset.catalog), seed=3)
    assert split.cold.sum() == 40
    assert not split.cold[split.warm_log.ad].any()
    assert len(split.warm_log) == int((~split.cold[dataset.log.ad]).sum())  # nothing else dropped
    assert split.cold[split.target].all()
    log = dataset.log
    for user, target, other in zip(split.test_users[:50], split.target[:50], split.excluded[:50]):
        mine = (log.user == user) & (log.event >= 1) & split.cold[log.ad]
        first = log.ad[mine][np.argmin(log.timestamp[mine])]
        assert target == first and target not in other
        assert set(other) | {target} == set(log.ad[mine])


def test_content_ranks_cold_ads_above_category_popularity_and_random() -> None:
    dataset, _ = generate(SPEC)
    split = cold_split(dataset.log, len(dataset.catalog), seed=0)
    cfg = RunConfig.from_flower({"privacy": "none", "factors": 16})
    data = NodeData.prepare(split.warm_log, dataset.catalog, cfg.seed)
    solver = solver_for(cfg, data)
    arrays = initial_arrays("random", dataset.catalog, cfg.factors, cfg.seed)
    rng = np.random.default_rng(0)
    for _ in range(4):
        arrays = solver.solve_alone(solver.local_update(arrays, solver.fit_users(arrays, rng, None), rng))
    results = evaluate_cold_start(dataset.catalog, content_features(dataset.catalog), split, arrays, data.user_ids,
                                  solver.fit_users(arrays, rng, None))
    assert results["content"]["cold_test_users"] > 500
    for baseline in ("category-popularity", "random"):
        assert results["content"]["ndcg10_cold"] > 1.5 * results[baseline]["ndcg10_cold"], results
        assert results["content"]["hr10_cold"] > results[baseline]["hr10_cold"] + 0.05, results


def test_ties_are_broken_at_random_in_expectation() -> None:
    dataset, _ = generate(SPEC)
    split = cold_split(dataset.log, len(dataset.catalog), seed=0)
    candidates = np.array([int(split.cold.sum()) - len(other) for other in split.excluded])  # the target among them
    constant = rank_cold(np.zeros((len(split.target), len(dataset.catalog))), split)
    # a constant score puts the target at each of its n places with probability 1 / n
    assert constant["hr10_cold"] == pytest.approx(float(np.mean(np.minimum(10, candidates) / candidates)))
    ndcg = np.mean([sum(1 / np.log2(r + 2) for r in range(min(10, n))) / n for n in candidates])
    assert constant["ndcg10_cold"] == pytest.approx(float(ndcg))
    # a scorer that puts every target first scores 1
    perfect = np.zeros((len(split.target), len(dataset.catalog)))
    perfect[np.arange(len(split.target)), split.target] = 1.0
    assert rank_cold(perfect, split)["ndcg10_cold"] == pytest.approx(1.0)
