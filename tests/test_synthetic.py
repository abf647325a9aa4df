"""The synthetic market: deterministic, one merchant per user, heavy-tailed, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.schema import Event
from shared.data.split import leave_last_out, sample_eval_negatives
from shared.data.synthetic import SyntheticSpec, generate, synthetic_catalog
from shared.metrics import evaluate, toppop_score_fn

SPEC = SyntheticSpec(users=800)  # the default market, fewer users to stay fast


@pytest.fixture(scope="module")
def market():
    return generate(SPEC)


def test_generation_is_deterministic_for_a_seed(market):
    dataset, truth = market
    again, truth_again = generate(SPEC)
    assert again.catalog == dataset.catalog
    for name in ("user", "ad", "timestamp", "event", "merchant", "region"):
        np.testing.assert_array_equal(getattr(again.log, name), getattr(dataset.log, name))
    np.testing.assert_array_equal(truth_again.ad_vectors, truth.ad_vectors)
    np.testing.assert_array_equal(truth_again.ad_popularity_logit, truth.ad_popularity_logit)
    assert truth_again.user_taste.keys() == truth.user_taste.keys()
    assert all(np.array_equal(truth_again.user_taste[u], truth.user_taste[u]) for u in truth.user_taste)


def test_another_seed_gives_another_market():
    first = generate(SyntheticSpec(users=50, ads=40, seed=1))[0]
    second = generate(SyntheticSpec(users=50, ads=40, seed=2))[0]
    assert first.catalog != second.catalog
    assert len(first.log) != len(second.log) or not np.array_equal(first.log.ad, second.log.ad)


def test_synthetic_catalog_is_the_generated_catalog(market):
    dataset, _ = market
    assert synthetic_catalog(SPEC) == dataset.catalog
    assert len(dataset.catalog) == SPEC.ads
    assert len(set(dataset.catalog.categories)) <= SPEC.categories


def test_every_user_belongs_to_exactly_one_merchant(market):
    dataset, truth = market
    log = dataset.log
    users = np.unique(log.user)
    assert len(users) == SPEC.users
    assert set(users) == set(truth.user_taste)
    merchant_of: dict[str, set] = {}
    region_of: dict[str, set] = {}
    for user, merchant, region in zip(log.user, log.merchant, log.region):
        merchant_of.setdefault(user, set()).add(merchant)
        region_of.setdefault(user, set()).add(region)
    assert all(len(m) == 1 for m in merchant_of.values())
    assert all(len(r) == 1 for r in region_of.values())
    # the user id names its merchant
    assert all(next(iter(m)) == f"merchant-{user.split('-')[0][1:]}" for user, m in merchant_of.items())
    assert {next(iter(m)) for m in merchant_of.values()} == {f"merchant-{k}" for k in range(SPEC.merchants)}


def test_clicks_are_distinct_per_user_and_at_least_the_minimum(market):
    dataset, _ = market
    log = dataset.log
    positive = log.event >= Event.CLICK
    for user in np.unique(log.user)[:200]:
        clicked = log.ad[(log.user == user) & positive]
        assert len(clicked) >= SPEC.min_clicks_per_user
        assert len(np.unique(clicked)) == len(clicked)  # drawn without replacement
        shown = log.ad[(log.user == user) & ~positive]
        assert not set(shown) & set(clicked)  # impressions are ads the user did not click


def test_ad_popularity_is_heavy_tailed(market):
    dataset, _ = market
    log = dataset.log
    clicks = np.bincount(log.ad[log.event >= Event.CLICK], minlength=SPEC.ads)
    top = np.sort(clicks)[::-1][: SPEC.ads // 10]
    share = top.sum() / clicks.sum()
    assert share > 0.35, f"top 10% of ads get {share:.1%} of clicks"


def test_oracle_beats_toppop_clearly(market):
    dataset, truth = market
    split = leave_last_out(dataset.log, len(dataset.catalog))
    negatives = sample_eval_negatives(split, seed=0)
    taste = np.stack([truth.user_taste[user] for user in split.user_ids])
    oracle_scores = truth.taste_strength * taste @ truth.ad_vectors.T + truth.ad_popularity_logit[None, :]
    oracle = evaluate(lambda users: oracle_scores[users], split, negatives)
    toppop = evaluate(toppop_score_fn(split.ad_popularity()), split, negatives)
    assert oracle["num-test-users"] == toppop["num-test-users"] == SPEC.users
    assert oracle["ndcg10_sampled"] > toppop["ndcg10_sampled"] + 0.05, (oracle, toppop)
    # and TopPop itself is well above chance (10/100 HR@10 sampled): popularity explains part of the clicks
    assert toppop["hr10_sampled"] > 0.2
