"""A user's randomness on the SGD path does not depend on which other users are present (issue 13).

Negative sampling and the positive cap (client/solvers/sgd_rows.build_user_rows) draw from one
stream per user, keyed by a base drawn once per call and the user's id, as the evaluation
negatives are (shared/data/split.sample_eval_negatives). Removing one user from a shard must
leave every other user's training rows, factors (the SGD user step) and per-user metric values
exactly as they were: otherwise one user's presence leaks into everyone else's released metric
sums and ad-step contributions, and the per-user sensitivity bounds of DP do not hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from client.node_data import EVAL_NEGATIVES, NodeData
from client.solvers.sgd import SGDSolver
from client.solvers.sgd_rows import UserRows, build_user_rows
from client.user_step import SGDUserStep
from shared.config import RunConfig
from shared.data.schema import InteractionLog
from shared.data.sources import load_dataset, simulated_shards
from shared.data.split import UserSplit, leave_last_out, sample_eval_negatives
from shared.metrics import METRIC_NAMES, rank_metrics
from shared.params import init_global_arrays, score_all
from shared.wire import AD_BIAS, AD_FACTORS, Arrays
from tests.conftest import simulated_node, small_run_config


@dataclass(frozen=True, repr=False)
class Shard:
    cfg: RunConfig
    log: InteractionLog
    num_ads: int
    split: UserSplit
    eval_negatives: np.ndarray
    arrays: Arrays


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Shard:
    """Simulated node 0 of 3 of the small SGD run, with its shard's log (to rebuild it without a user)."""
    cfg = small_run_config(Path(tmp_path_factory.mktemp("run")), **{"mf-solver": "sgd", "max-positives-per-user": 4})
    node = simulated_node(cfg, 0)
    data = cfg.data_config()
    dataset = load_dataset(data)
    name, log = simulated_shards(data, dataset, 3)[0]
    assert name == node.name
    split = leave_last_out(log, len(dataset.catalog))
    np.testing.assert_array_equal(split.user_ids, node.data.split.user_ids)  # the node's own split
    # global parameters away from zero, so that every user's factors and scores depend on its rows
    arrays = init_global_arrays(len(dataset.catalog), cfg.factors, seed=3)
    arrays[AD_FACTORS] = arrays[AD_FACTORS] * 10
    arrays[AD_BIAS] = np.random.default_rng(4).normal(0.0, 0.5, len(dataset.catalog)).astype(np.float32)
    return Shard(cfg, log, len(dataset.catalog), split, node.data.eval_negatives, arrays)


def _victims(shard: Shard) -> list[str]:
    """Users to remove: the first (every other user's row index shifts), a middle one with the most
    positives (the widest rows), and the last."""
    split = shard.split
    busiest = int(np.argmax(split.positive_counts()))
    return sorted({str(split.user_ids[0]), str(split.user_ids[busiest]), str(split.user_ids[-1])})


def _without(shard: Shard, victim: str) -> UserSplit:
    rows = np.flatnonzero(shard.log.user.astype(str) != victim)
    return leave_last_out(shard.log.subset(rows), shard.num_ads)


def _user_rows(rows: UserRows, u: int) -> tuple[np.ndarray, np.ndarray]:
    mask = rows.mask[u].numpy()
    return rows.ads[u].numpy()[mask], rows.labels[u].numpy()[mask]


def _others(full: UserSplit, reduced: UserSplit) -> list[tuple[int, int]]:
    """(row in full, row in reduced) of every user present in both."""
    index = {str(uid): j for j, uid in enumerate(reduced.user_ids)}
    pairs = [(i, index[str(uid)]) for i, uid in enumerate(full.user_ids) if str(uid) in index]
    assert len(pairs) == full.num_users - 1 == reduced.num_users
    return pairs


@pytest.mark.parametrize("max_positives", [4, None])
def test_removing_a_user_leaves_the_others_training_rows(shard: Shard, max_positives: int | None) -> None:
    capped = shard.split.positive_counts() > 4
    assert capped.any()  # the cap samples somewhere
    for victim in _victims(shard):
        reduced = _without(shard, victim)
        full_rows = build_user_rows(shard.split, np.random.default_rng(5), shard.cfg.negatives, max_positives)
        reduced_rows = build_user_rows(reduced, np.random.default_rng(5), shard.cfg.negatives, max_positives)
        changed = [
            str(shard.split.user_ids[i])
            for i, j in _others(shard.split, reduced)
            if any(not np.array_equal(a, b) for a, b in zip(_user_rows(full_rows, i), _user_rows(reduced_rows, j)))
        ]
        assert not changed, f"removing {victim} changed the rows of {len(changed)} of {reduced.num_users} other users"


def test_removing_a_user_leaves_the_others_factors_and_metrics(shard: Shard) -> None:
    step = SGDUserStep.from_config(shard.cfg)
    full_factors = step.fit(shard.split, shard.arrays, np.random.default_rng(11))
    full_users = shard.split.test_users
    full_metrics = rank_metrics(score_all(full_factors[full_users], shard.arrays), full_users, shard.split, shard.eval_negatives)
    full_at = {int(u): k for k, u in enumerate(full_users)}
    for victim in _victims(shard):
        reduced = _without(shard, victim)
        factors = step.fit(reduced, shard.arrays, np.random.default_rng(11))
        pairs = _others(shard.split, reduced)
        full_index, reduced_index = (np.array(side) for side in zip(*pairs))
        gap = np.abs(full_factors[full_index] - factors[reduced_index]).max(axis=1)
        assert (gap <= 1e-6).all(), f"removing {victim} moved the factors of {int((gap > 1e-6).sum())} other users (max {gap.max():.3g})"

        # per-user metric values: evaluation negatives are per user already, so only the factors could move them
        negatives = sample_eval_negatives(reduced, EVAL_NEGATIVES, shard.cfg.seed)
        users = reduced.test_users
        metrics = rank_metrics(score_all(factors[users], shard.arrays), users, reduced, negatives)
        back = {j: i for i, j in pairs}
        rows_in_full = np.array([full_at[back[int(u)]] for u in users])
        for name in METRIC_NAMES:
            np.testing.assert_allclose(metrics[name], full_metrics[name][rows_in_full], rtol=0, atol=1e-12, err_msg=f"{name}, without {victim}")


def test_removing_a_user_leaves_the_others_epoch_rows(shard: Shard) -> None:
    """The ad step's rows, epoch after epoch, with draws from the same Generator between epochs whose
    size depends on who is present (the ad step's batch order is a permutation of all users)."""
    victim = _victims(shard)[0]
    reduced = _without(shard, victim)
    pairs = _others(shard.split, reduced)
    epochs: dict[int, list[UserRows]] = {}
    for split in (shard.split, reduced):
        # rows need no eval negatives, nor tags
        solver = SGDSolver(shard.cfg, NodeData(split, np.zeros((split.num_users, 0), dtype=np.int64), sp.csr_array((split.num_ads, 0))))
        rng = np.random.default_rng(13)
        rng.integers(1 << 30)  # what the user step before it draws
        next_rows = solver.epoch_rows(rng)
        epochs[split.num_users] = []
        for _ in range(3):
            epochs[split.num_users].append(next_rows())
            rng.random(split.num_users)  # as many draws as users (permutation(n)'s count moves with n in steps)
    for epoch, (full_rows, reduced_rows) in enumerate(zip(epochs[shard.split.num_users], epochs[reduced.num_users])):
        for i, j in pairs:
            for a, b in zip(_user_rows(full_rows, i), _user_rows(reduced_rows, j)):
                np.testing.assert_array_equal(a, b, err_msg=f"epoch {epoch}, user {shard.split.user_ids[i]}, without {victim}")

