"""Leave-last-out splits, evaluation negatives, and the ranking metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.data.partition import shard_log
from shared.data.schema import Event, InteractionLog
from shared.data.split import NO_TEST, UserSplit, leave_last_out, sample_eval_negatives
from shared.data.synthetic import SyntheticSpec, generate
from shared.metrics import METRIC_NAMES, evaluate, rank_metrics, toppop_score_fn

I, C, P = Event.IMPRESSION, Event.CLICK, Event.PURCHASE  # noqa: E741 (the rows read like a log)


def make_log(rows: list[tuple[str, int, int, Event]]) -> InteractionLog:
    users, ads, times, events = zip(*rows)
    return InteractionLog(
        user=np.array(users, dtype=object),
        ad=np.array(ads, dtype=np.int64),
        timestamp=np.array(times, dtype=np.int64),
        event=np.array([int(e) for e in events], dtype=np.int8),
    )


# Rows deliberately out of time order and interleaved between users.
HAND_LOG = [
    ("u1", 2, 60, C),  # repeat of ad 2
    ("u2", 4, 5, C),
    ("u1", 0, 10, C),
    ("u0", 2, 1, I),  # u0 only ever saw an impression
    ("u1", 1, 20, I),  # impression of ad 1 ...
    ("u1", 3, 50, I),
    ("u1", 1, 70, C),  # ... that became u1's most recent new positive
    ("u1", 2, 30, P),
    ("u2", 4, 6, C),  # u2 has a single distinct positive, seen twice
    ("u1", 0, 40, C),  # repeat of ad 0
    ("u2", 5, 7, I),
    ("u3", 5, 100, C),  # same timestamp: file order decides, ad 3 is the later one
    ("u3", 3, 100, C),
    ("u4", 0, 1, C),  # A, B, A: deduplicated at the first occurrence, B is the last new positive
    ("u4", 1, 2, C),
    ("u4", 0, 3, P),
]


@pytest.fixture
def hand_split() -> UserSplit:
    return leave_last_out(make_log(HAND_LOG), num_ads=6)


def by_user(split: UserSplit) -> dict[str, tuple[list[int], int, list[int]]]:
    """user -> (training positives in order, test ad, impressions kept as negatives)."""
    out = {}
    for u, user in enumerate(split.user_ids):
        impressions = split.imp_ads[split.imp_offsets[u] : split.imp_offsets[u + 1]]
        out[user] = (list(split.positives(u)), int(split.test_ad[u]), sorted(impressions))
    return out


# ------------------------------------------------------------------ leave_last_out
def test_leave_last_out_on_a_hand_made_log(hand_split):
    assert list(hand_split.user_ids) == ["u0", "u1", "u2", "u3", "u4"]
    assert hand_split.num_ads == 6
    assert by_user(hand_split) == {
        "u0": ([], NO_TEST, [2]),  # impressions are not positives
        "u1": ([0, 2], 1, [3]),  # ad 1 was shown before it was clicked: a positive, not an impression
        "u2": ([4], NO_TEST, [5]),  # one distinct positive: nothing to hold out
        "u3": ([5], 3, []),
        "u4": ([0], 1, []),
    }
    assert list(hand_split.test_users) == [1, 3, 4]
    assert list(hand_split.positive_counts()) == [0, 2, 1, 1, 1]
    assert list(hand_split.positive_user_index()) == [1, 1, 2, 3, 4]
    assert list(hand_split.impression_user_index()) == [0, 1, 2]
    np.testing.assert_array_equal(hand_split.ad_popularity(), [2, 0, 1, 0, 1, 1])


def test_test_ad_never_among_training_positives_on_synthetic_data():
    dataset = generate(SyntheticSpec(users=150, ads=80, merchants=2, seed=3))[0]
    split = leave_last_out(dataset.log, len(dataset.catalog))
    log = dataset.log
    for u in split.test_users[:50]:
        rows = (log.user == split.user_ids[u]) & (log.event >= Event.CLICK)
        ads, times = log.ad[rows], log.timestamp[rows]
        first_seen = {ad: times[ads == ad].min() for ad in set(ads)}
        assert split.test_ad[u] not in split.positives(u)
        assert set(split.positives(u)) | {split.test_ad[u]} == set(ads)
        assert first_seen[split.test_ad[u]] == max(first_seen.values())


# ------------------------------------------------------------------ evaluation negatives
@pytest.fixture(scope="module")
def synthetic():
    dataset = generate(SyntheticSpec(users=200, ads=300, merchants=3, seed=5))[0]
    return dataset, leave_last_out(dataset.log, len(dataset.catalog))


def test_eval_negatives_exclude_positives_and_test_ad(synthetic):
    _, split = synthetic
    negatives = sample_eval_negatives(split, num_negatives=99, seed=0)
    assert negatives.shape == (split.num_users, 99)
    assert len(split.test_users) > 0
    for u in range(split.num_users):
        row = negatives[u]
        if split.test_ad[u] == NO_TEST:
            assert (row == -1).all()
            continue
        assert (row >= 0).all() and (row < split.num_ads).all()
        assert len(set(row)) == 99
        assert not set(row) & set(split.positives(u))
        assert split.test_ad[u] not in row


def test_eval_negatives_do_not_depend_on_the_other_users_in_the_shard(synthetic):
    dataset, split = synthetic
    full = sample_eval_negatives(split, seed=4)
    some_users = split.user_ids[::3]
    shard = leave_last_out(shard_log(dataset.log, some_users), len(dataset.catalog))
    in_shard = sample_eval_negatives(shard, seed=4)
    position = {user: u for u, user in enumerate(split.user_ids)}
    assert list(shard.user_ids) == list(some_users)
    for u, user in enumerate(shard.user_ids):
        np.testing.assert_array_equal(in_shard[u], full[position[user]])
    # and the seed matters
    assert not np.array_equal(sample_eval_negatives(split, seed=5), full)


def test_eval_negatives_pad_when_fewer_ads_are_left(hand_split):
    negatives = sample_eval_negatives(hand_split, num_negatives=99)
    u1 = 1  # positives {0, 2}, test ad 1: only ads 3, 4, 5 remain
    assert sorted(negatives[u1][negatives[u1] >= 0]) == [3, 4, 5]
    assert (negatives[u1][3:] == -1).all()
    assert (negatives[0] == -1).all() and (negatives[2] == -1).all()  # users without a test ad


# ------------------------------------------------------------------ metrics, hand-computed
def hand_split_for_metrics() -> UserSplit:
    """Three users over six ads.

    A: trains on ad 0, test ad 1.   B: trains on ads 2 and 3, test ad 4.   C: no test ad.
    """
    return UserSplit(
        user_ids=np.array(["A", "B", "C"], dtype=object),
        num_ads=6,
        pos_offsets=np.array([0, 1, 3, 4]),
        pos_ads=np.array([0, 2, 3, 5]),
        imp_offsets=np.zeros(4, dtype=np.int64),
        imp_ads=np.zeros(0, dtype=np.int64),
        test_ad=np.array([1, 4, NO_TEST]),
    )


HAND_NEGATIVES = np.array([[2, 3, 4, 5], [0, 1, 5, -1], [-1, -1, -1, -1]])
HAND_SCORES = np.array(
    [
        # A: target (ad 1) scores 5; only ad 2 (7) beats it; its own training positive ad 0 (9) does not count
        [9.0, 5.0, 7.0, 1.0, 2.0, 3.0],
        # B: target (ad 4) scores 4; ads 0 (6) and 5 (8) beat it; training positives 2, 3 (100) do not count
        [6.0, 3.0, 100.0, 100.0, 4.0, 8.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


def test_rank_metrics_per_user_by_hand():
    split = hand_split_for_metrics()
    values = rank_metrics(HAND_SCORES[[0, 1]], np.array([0, 1]), split, HAND_NEGATIVES)
    # A: rank 1 among {2,3,4,5}; B: rank 2 among {0,1,5}
    np.testing.assert_allclose(values["hr10_sampled"], [1.0, 1.0])
    np.testing.assert_allclose(values["ndcg10_sampled"], [1 / math.log2(3), 1 / math.log2(4)])
    np.testing.assert_allclose(values["hr10_full"], [1.0, 1.0])
    np.testing.assert_allclose(values["ndcg10_full"], [1 / math.log2(3), 0.5])
    np.testing.assert_allclose(values["recall20_full"], [1.0, 1.0])
    np.testing.assert_allclose(values["auc_full"], [1 - 1 / 4, 1 - 2 / 3])


def test_evaluate_averages_over_test_users_only():
    split = hand_split_for_metrics()
    result = evaluate(lambda users: HAND_SCORES[users], split, HAND_NEGATIVES)
    assert result["num-test-users"] == 2.0
    assert result["hr10_sampled"] == pytest.approx(1.0)
    assert result["ndcg10_sampled"] == pytest.approx((1 / math.log2(3) + 0.5) / 2)
    assert result["ndcg10_full"] == pytest.approx((1 / math.log2(3) + 0.5) / 2)
    assert result["recall20_full"] == pytest.approx(1.0)
    assert result["auc_full"] == pytest.approx((0.75 + 1 / 3) / 2)
    chunked = evaluate(lambda users: HAND_SCORES[users], split, HAND_NEGATIVES, chunk=1)
    assert chunked == pytest.approx(result)


def test_a_perfect_scorer_gets_ones():
    split = hand_split_for_metrics()
    scores = np.zeros((3, 6))
    scores[0, 1] = scores[1, 4] = 1.0
    result = evaluate(lambda users: scores[users], split, HAND_NEGATIVES)
    assert {name: result[name] for name in METRIC_NAMES} == pytest.approx({name: 1.0 for name in METRIC_NAMES})


def one_user_split(num_ads: int, train: list[int], test_ad: int) -> UserSplit:
    return UserSplit(
        user_ids=np.array(["solo"], dtype=object),
        num_ads=num_ads,
        pos_offsets=np.array([0, len(train)]),
        pos_ads=np.array(train, dtype=np.int64),
        imp_offsets=np.zeros(2, dtype=np.int64),
        imp_ads=np.zeros(0, dtype=np.int64),
        test_ad=np.array([test_ad]),
    )


@pytest.mark.parametrize(
    "above, hr10, recall20",
    [(0, 1.0, 1.0), (9, 1.0, 1.0), (10, 0.0, 1.0), (19, 0.0, 1.0), (20, 0.0, 0.0), (38, 0.0, 0.0)],
)
def test_cutoffs_of_full_ranking(above, hr10, recall20):
    # 40 ads: ad 0 is a training positive, ad 1 the target; 38 candidates (ads 2..39)
    split = one_user_split(40, train=[0], test_ad=1)
    scores = np.zeros((1, 40))
    scores[0, 0] = 1e9  # a training positive, never a candidate
    scores[0, 2:] = np.where(np.arange(38) < above, 2.0, -2.0)
    scores[0, 1] = 0.0
    values = rank_metrics(scores, np.array([0]), split, np.full((1, 99), -1))
    assert values["hr10_full"][0] == hr10
    assert values["recall20_full"][0] == recall20
    expected_ndcg = 1 / math.log2(above + 2) if above < 10 else 0.0
    assert values["ndcg10_full"][0] == pytest.approx(expected_ndcg)
    assert values["auc_full"][0] == pytest.approx(1 - above / 38)


def test_ties_count_half():
    split = one_user_split(6, train=[0], test_ad=1)
    # target 5; ad 2 above; ads 3 and 4 tied with it; ad 5 below -> expected rank 1 + 2/2 = 2
    scores = np.array([[50.0, 5.0, 9.0, 5.0, 5.0, 0.0]])
    negatives = np.array([[2, 3, 4, 5]])
    values = rank_metrics(scores, np.array([0]), split, negatives)
    assert values["ndcg10_sampled"][0] == pytest.approx(1 / math.log2(4))
    assert values["ndcg10_full"][0] == pytest.approx(0.5)
    assert values["auc_full"][0] == pytest.approx(1 - 2 / 4)


def test_constant_scorer_gets_auc_one_half(synthetic):
    _, split = synthetic
    negatives = sample_eval_negatives(split)
    result = evaluate(lambda users: np.ones((len(users), split.num_ads)), split, negatives)
    assert result["auc_full"] == 0.5
    # every candidate ties: expected rank 49.5 of 99 sampled, far outside the top 10
    assert result["hr10_sampled"] == 0.0 and result["ndcg10_sampled"] == 0.0


def test_random_scorer_is_at_chance_level():
    num_users, num_ads = 4000, 200
    rng = np.random.default_rng(123)
    train = rng.integers(num_ads, size=num_users)
    test = (train + rng.integers(1, num_ads, size=num_users)) % num_ads  # never the training ad
    split = UserSplit(
        user_ids=np.array([f"user-{u:05d}" for u in range(num_users)], dtype=object),
        num_ads=num_ads,
        pos_offsets=np.arange(num_users + 1, dtype=np.int64),
        pos_ads=train.astype(np.int64),
        imp_offsets=np.zeros(num_users + 1, dtype=np.int64),
        imp_ads=np.zeros(0, dtype=np.int64),
        test_ad=test.astype(np.int64),
    )
    negatives = sample_eval_negatives(split, seed=0)
    scorer = np.random.default_rng(7)
    result = evaluate(lambda users: scorer.random((len(users), num_ads)), split, negatives)
    # HR@10 against 99 negatives is Bernoulli(10/100) per user: sd = sqrt(.09 / 4000) ~ 0.005
    assert result["hr10_sampled"] == pytest.approx(0.10, abs=0.02)
    expected_ndcg = sum(1 / math.log2(r + 2) for r in range(10)) / 100
    assert result["ndcg10_sampled"] == pytest.approx(expected_ndcg, abs=0.01)
    # full ranking: 198 candidates
    assert result["hr10_full"] == pytest.approx(10 / 199, abs=0.015)
    assert result["recall20_full"] == pytest.approx(20 / 199, abs=0.02)
    assert result["auc_full"] == pytest.approx(0.5, abs=0.02)


def test_toppop_ranks_by_training_popularity():
    # popularity from training positives: ad 3 (3 users) > ad 1 (2) > ad 4 (1) > others (0)
    split = UserSplit(
        user_ids=np.array(["a", "b", "c", "d"], dtype=object),
        num_ads=6,
        pos_offsets=np.array([0, 2, 4, 5, 6]),
        pos_ads=np.array([3, 1, 3, 4, 3, 1]),
        imp_offsets=np.zeros(5, dtype=np.int64),
        imp_ads=np.zeros(0, dtype=np.int64),
        test_ad=np.array([4, 1, 0, 3]),
    )
    popularity = split.ad_popularity()
    np.testing.assert_array_equal(popularity, [0, 2, 0, 3, 1, 0])
    score_fn = toppop_score_fn(popularity)
    scores = score_fn(np.array([0, 2]))
    assert scores.shape == (2, 6)
    np.testing.assert_array_equal(scores[0], popularity)
    np.testing.assert_array_equal(scores[1], popularity)
    assert list(np.argsort(-scores[0], kind="stable")[:3]) == [3, 1, 4]

    values = rank_metrics(np.asarray(score_fn(np.arange(4))), np.arange(4), split, np.full((4, 3), -1))
    # a trains on 3 and 1: its target 4 is the most popular ad left       -> rank 0
    # b trains on 3 and 4: its target 1 is the most popular ad left       -> rank 0
    # d trains on 1: its target 3 is the most popular ad of all           -> rank 0
    # c trains on 3: ads 1 and 4 beat its target 0, which ties with 2, 5  -> rank 2 + 2/2 = 3 of 4
    np.testing.assert_allclose(values["ndcg10_full"], [1.0, 1.0, 1 / math.log2(3 + 2), 1.0])
    np.testing.assert_allclose(values["auc_full"], [1.0, 1.0, 1 - 3 / 4, 1.0])
