"""Federated (private) ALS: sensitivity bounds, exactness without noise, the accountant, the budget.

- sensitivity: removing one user's rows moves each released statistic (before noise) by at
  most the bound the noise is calibrated to;
- without noise, the federated ALS round (sum of the clients' statistics, then the server's
  solve) equals ALS on the pooled data: with one client and with several;
- the ledger is charged exactly once per release, with the planned noise multiplier, and the
  planned rounds compose to the target epsilon; past it the client refuses, also after a restart;
- the server's solve is unbiased enough to learn: noise-free ALS beats popularity on synthetic data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from client.privacy.ledger import PrivacyLedger
from client.solvers.als import ALSSolver
from server.als_aggregation import ALSAggregation
from shared.accounting import epsilon_of
from shared.als import ALSSettings, Rows, ad_statistics, add_noise, augmented, round_budget_shares, solve_ads, solve_users
from shared.config import ConfigError
from shared.data.sources import load_dataset
from shared.data.split import leave_last_out
from shared.params import init_global_arrays
from shared.wire import PRIVACY_REFUSED, from_array_record, to_array_record
from tests.conftest import client_call as _call
from tests.conftest import simulated_node, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")


def _settings(mode: str, **overrides) -> ALSSettings:
    values = dict(alpha0=0.5, user_l2=1.0, ad_l2=1.0, max_rows=5, user_clip=0.3, gram_mode=mode)
    values.update(overrides)
    return ALSSettings(**values)


def _synthetic_rows(tmp_path) -> tuple[Rows, int]:
    cfg = small_run_config(tmp_path)
    dataset = load_dataset(cfg)
    split = leave_last_out(dataset.log, len(dataset.catalog))
    return Rows.from_split(split), len(dataset.catalog)


def _without_user(rows: Rows, user: int) -> Rows:
    keep = rows.user != user
    return Rows(rows.user[keep], rows.ad[keep], rows.label[keep], rows.num_users)


@pytest.mark.parametrize("mode", ["shared", "per-ad"])
def test_one_user_moves_each_statistic_by_at_most_its_sensitivity(tmp_path, mode):
    rows, num_ads = _synthetic_rows(tmp_path)
    settings = _settings(mode)
    rng = np.random.default_rng(0)
    # large factors, so clipping binds; the heaviest users, so the row weighting binds
    factors = rng.normal(0, 3.0, size=(rows.num_users, 8))
    full = ad_statistics(rows, factors, num_ads, settings)
    bounds = settings.sensitivities()
    heaviest = np.argsort(rows.counts())[::-1][:5]
    moved_most = {key: 0.0 for key in full}
    for user in [*heaviest, int(rng.integers(rows.num_users))]:
        partial = ad_statistics(_without_user(rows, user), factors, num_ads, settings)
        partial["als_user_gram"] = _user_gram_without(factors, rows, user, settings)  # G sums over every user
        for key in full:
            moved = float(np.linalg.norm(full[key] - partial[key]))
            moved_most[key] = max(moved_most[key], moved)
            assert moved <= bounds[key] * (1 + 1e-9), (key, moved, bounds[key])
    # the bounds are not vacuous: the heaviest user comes close to them
    assert moved_most["als_target"] > 0.5 * bounds["als_target"]
    assert moved_most["als_positives"] > 0.5 * bounds["als_positives"]


def _user_gram_without(factors: np.ndarray, rows: Rows, user: int, settings: ALSSettings) -> np.ndarray:
    weights = rows.user_weights(settings.max_rows)
    keep = np.arange(rows.num_users) != user
    aug = augmented(factors[keep], settings.user_clip, settings.clip)
    return (aug * weights[keep][:, None]).T @ aug


def test_noise_is_calibrated_per_block_to_one_unit_sensitivity():
    settings = _settings("shared")
    stds = settings.noise_stds(2.0)
    sens = settings.sensitivities()
    # each block's sensitivity in units of its noise std, squared, sums to (1 / sigma)^2
    total = sum((sens[key] / std) ** 2 for key, std in stds.items())
    assert total == pytest.approx(1 / 2.0**2)
    # a popularity release: the positive counts alone carry the whole release
    popularity = settings.noise_stds(2.0, "popularity")
    assert set(popularity) == {"als_positives"} and (sens["als_positives"] / popularity["als_positives"]) ** 2 == pytest.approx(1 / 2.0**2)
    # and noise reaches every coordinate, also of ads nobody touched
    rng = np.random.default_rng(1)
    zeros = {"als_target": np.zeros((50, 4)), "als_count": np.zeros(50), "als_user_gram": np.zeros((5, 5))}
    noisy = add_noise(zeros, stds, rng)
    assert all(np.all(noisy[key] != 0) for key in noisy)
    assert np.allclose(noisy["als_user_gram"], noisy["als_user_gram"].T)


@pytest.mark.parametrize("clients", [1, 3])
@pytest.mark.parametrize("mode", ["per-ad", "shared"])
def test_federated_als_without_noise_equals_centralized_als(tmp_path, clients, mode):
    rows, num_ads = _synthetic_rows(tmp_path)
    settings = _settings(mode, max_rows=None, clip=False)
    arrays = init_global_arrays(num_ads, 8, seed=3)
    # centralized: every user in one place
    central = dict(arrays)
    for _ in range(3):
        users = solve_users(rows, central["ad_factors"], central["ad_bias"], settings.alpha0, settings.user_l2)
        central = solve_ads(ad_statistics(rows, users, num_ads, settings), settings)
    # federated: users cut into shards, each shard's statistics summed by the server's strategy
    shard_of = np.arange(rows.num_users) % clients
    federated = dict(arrays)
    strategy = ALSAggregation(settings, num_ads, 8)
    for server_round in range(1, 4):
        replies = []
        for shard in range(clients):
            members = np.flatnonzero(shard_of == shard)
            keep = np.isin(rows.user, members)
            local = Rows(np.searchsorted(members, rows.user[keep]), rows.ad[keep], rows.label[keep], len(members))
            users = solve_users(local, federated["ad_factors"], federated["ad_bias"], settings.alpha0, settings.user_l2)
            stats = ad_statistics(local, users, num_ads, settings)
            replies.append(_reply(stats, {"num-examples": float(len(members))}))
        record, _ = strategy.aggregate_train(server_round, replies)
        federated = from_array_record(record)
    for key in central:
        np.testing.assert_allclose(federated[key], central[key], rtol=1e-4, atol=1e-5)


def _reply(stats: dict[str, np.ndarray], metrics: dict[str, float]) -> Message:
    content = RecordDict({"arrays": to_array_record(stats), "metrics": MetricRecord(metrics)})
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    return Message(content=content, reply_to=request)


def test_round_budget_shares_compose_to_one_release():
    shares = round_budget_shares(4, 2.0)
    assert shares.sum() == pytest.approx(1.0) and np.all(np.diff(shares) > 0)
    sigma, delta = 1.3, 1e-4
    rounds = [(sigma / math.sqrt(w), 1.0, 1) for w in shares]
    assert epsilon_of(rounds, delta) == pytest.approx(epsilon_of([(sigma, 1.0, 1)], delta), rel=1e-9)


def test_client_charges_the_ledger_once_per_release_and_refuses_past_the_budget(tmp_path):
    cfg = small_run_config(tmp_path, privacy="user", **{"target-epsilon": 4.0, "num-rounds": 2, "dp-metrics": "none"})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    settings = ALSSettings.from_config(cfg)
    assert settings.gram_mode == "shared" and settings.clip and settings.max_rows == cfg.als_max_rows

    sigmas = []
    for server_round in (1, 2):
        reply = _call("train", cfg, arrays, server_round)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        sent = from_array_record(reply.content["arrays"])
        assert set(sent) == set(settings.stat_shapes(node.data.split.num_ads, cfg.factors))
        assert all(value.dtype == np.float16 for value in sent.values())  # the noisy release travels compact
        sigmas.append(float(reply.content["metrics"]["dp-noise-multiplier"]))
        ledger = PrivacyLedger.open(node.state.directory)
        assert ledger.state.rounds_trained == server_round and ledger.state.mechanism == "private-als"
        assert [s for s, _, _ in ledger.state.history] == pytest.approx(sigmas)  # one entry per release
        assert all(q == 1.0 and steps == 1 for _, q, steps in ledger.state.history)
    assert sigmas[1] < sigmas[0]  # the later release gets the larger share
    spent = PrivacyLedger.open(node.state.directory).epsilon()
    assert 0.97 * 4.0 <= spent <= 4.0  # the plan spends (nearly) the whole budget, never more

    refused = _call("train", cfg, arrays, 3)  # a third round was never planned
    assert refused.has_error() and refused.error.code == PRIVACY_REFUSED
    assert "budget" in refused.error.reason
    assert PrivacyLedger.open(node.state.directory).epsilon() == pytest.approx(spent)


def test_a_budget_planned_for_dp_sgd_is_not_reused_by_als(tmp_path):
    cfg = small_run_config(tmp_path, privacy="user", **{"mf-solver": "sgd", "num-rounds": 1, "dp-metrics": "none"})
    node = simulated_node(cfg, 1)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    assert not _call("train", cfg, arrays, 1, partition=1).has_error()
    als_cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 1, "dp-metrics": "none"})
    reply = _call("train", als_cfg, arrays, 2, partition=1)
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSED and "dp-sgd" in reply.error.reason


def test_noise_free_federated_als_learns_beyond_popularity(tmp_path):
    cfg = small_run_config(tmp_path)
    nodes = [simulated_node(cfg, pid) for pid in range(3)]
    settings = ALSSettings.from_config(cfg)
    num_ads = nodes[0].data.split.num_ads
    arrays = init_global_arrays(num_ads, cfg.factors, cfg.seed)
    strategy = ALSAggregation(settings, num_ads, cfg.factors)
    solvers = [ALSSolver(cfg, node.data) for node in nodes]
    rng = np.random.default_rng(0)  # ALS's steps draw nothing from it
    for server_round in range(1, 4):
        replies = []
        for solver in solvers:
            users = solver.fit_users(arrays, rng, None)
            replies.append(_reply(solver.local_update(arrays, users, rng).arrays, {"num-examples": 1.0}))
        arrays = from_array_record(strategy.aggregate_train(server_round, replies)[0])
    ndcg, popularity = [], []
    for node, solver in zip(nodes, solvers):
        ndcg.append(node.data.evaluate(arrays, solver.fit_users(arrays, rng, None), None)["ndcg10_sampled"])
        popularity.append(node.data.evaluate_popularity()["ndcg10_sampled"])
    assert np.mean(ndcg) > np.mean(popularity) + 0.05


def test_count_shrinkage_pulls_unseen_ads_to_their_catalog_group():
    """An ad nobody (noisily) counted takes its category's factors, solved from the category's
    summed statistics; a much-seen ad keeps nearly its own solution."""
    rng = np.random.default_rng(5)
    num_ads, dim = 6, 3
    groups = np.eye(2)[[0, 0, 0, 1, 1, 1]]  # one tag per ad: its category
    counts = np.array([0.0, 50.0, 50.0, 0.0, 400.0, 10.0])
    target = rng.normal(size=(num_ads, dim)) * counts[:, None] / 10
    user_gram = np.eye(dim + 1) * 0.04 * 100
    stats = {"als_target": target, "als_positives": counts / 2, "als_count": counts, "als_user_gram": user_gram}
    plain = solve_ads(stats, _settings("shared", user_clip=0.2))
    # kappa = 1 noise std of the summed counts = 20
    shrunk = solve_ads(stats, _settings("shared", user_clip=0.2, count_shrinkage=1.0, prior_weight=1.0), {"als_count": 20.0}, tags=groups)
    group_only = solve_ads({**stats, "als_target": np.stack([target[:3].sum(0)] * 3 + [target[3:].sum(0)] * 3),
                            "als_count": np.repeat([counts[:3].sum(), counts[3:].sum()], 3)}, _settings("shared", user_clip=0.2))
    np.testing.assert_allclose(shrunk["ad_factors"][0], group_only["ad_factors"][0], rtol=1e-5)
    np.testing.assert_allclose(shrunk["ad_factors"][3], group_only["ad_factors"][3], rtol=1e-5)
    assert np.linalg.norm(shrunk["ad_factors"][4] - plain["ad_factors"][4]) < 0.1 * np.linalg.norm(plain["ad_factors"][4])
    np.testing.assert_allclose(shrunk["ad_bias"], plain["ad_bias"])  # biases are the ads' own


def test_count_shrinkage_is_counted_in_noise_stds_of_the_counts():
    """The rule needs no tuning per data set or epsilon: an ad's weight n / (n + kappa std) is the
    same whenever its count is the same number of noise stds, and without noise nothing shrinks."""
    rng = np.random.default_rng(7)
    dim = 3
    counts = np.array([5.0, 40.0, 300.0])
    stats = {"als_target": rng.normal(size=(3, dim)), "als_positives": counts / 2, "als_count": counts, "als_user_gram": np.eye(dim + 1) * 4.0}
    settings = _settings("shared", user_clip=0.2, count_shrinkage=1.0)
    plain = solve_ads(stats, settings)["ad_factors"]
    np.testing.assert_array_equal(solve_ads(stats, settings, {"als_count": 0.0})["ad_factors"], plain)
    for std in (10.0, 40.0):
        shrunk = solve_ads(stats, settings, {"als_count": std})["ad_factors"]
        np.testing.assert_allclose(shrunk, plain * (counts / (counts + std))[:, None], rtol=1e-6)


def test_an_unseen_ad_with_several_tags_takes_the_mean_of_their_factors():
    """Tags overlap (ad 2 carries both): each tag is solved from all its ads' sums, and an ad
    nobody counted gets the mean of its tags' factors."""
    rng = np.random.default_rng(6)
    dim = 3
    tags = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    counts = np.array([80.0, 120.0, 0.0, 40.0])
    target = rng.normal(size=(4, dim)) * counts[:, None] / 10
    stats = {"als_target": target, "als_positives": counts / 2, "als_count": counts, "als_user_gram": np.eye(dim + 1) * 4.0}
    settings = _settings("shared", user_clip=0.2, count_shrinkage=1.0, prior_weight=1.0)
    shrunk = solve_ads(stats, settings, {"als_count": 20.0}, tags=tags)
    per_tag = [solve_ads({**stats, "als_target": np.stack([tags[:, t] @ target] * 4), "als_positives": np.full(4, tags[:, t] @ counts / 2),
                          "als_count": np.full(4, tags[:, t] @ counts)}, _settings("shared", user_clip=0.2))["ad_factors"][0] for t in (0, 1)]
    np.testing.assert_allclose(shrunk["ad_factors"][2], (per_tag[0] + per_tag[1]) / 2, rtol=1e-5)
    assert np.linalg.norm(shrunk["ad_factors"][1] - shrunk["ad_factors"][2]) > 1e-3  # a counted ad keeps mostly its own


def test_catalog_tags_default_to_category_and_brand_and_amazon_attributes_are_tags(tmp_path):
    import json

    from shared.data.public_sets import load_amazon_catalog
    from shared.data.schema import AdCatalog

    catalog = AdCatalog(("a", "b", "c"), ("shoes", "bags", "shoes"), ("acme", None, "zeta"), (None, None, None))
    assert catalog.tags == (("shoes", "acme"), ("bags",), ("shoes", "zeta"))
    np.testing.assert_array_equal(catalog.tag_membership(), [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]])  # acme, bags, shoes, zeta
    path = tmp_path / "item2attributes.json"
    path.write_text(json.dumps({"1": [7, 9], "2": [9], "3": []}))
    amazon = load_amazon_catalog(path)
    assert dict(zip(amazon.ad_ids, amazon.tags)) == {"1": ("attr-7", "attr-9"), "2": ("attr-9",), "3": ("unknown",)}




def test_the_round_log_says_how_much_of_the_model_rests_on_popularity(caplog):
    """With noise far above the ads' counts the model is popularity: the aggregation reports the
    share of ads that keep under half their own factors and warns; exact statistics report none."""
    import logging

    from shared.wire import PrivacyReport

    rng = np.random.default_rng(8)
    settings = _settings("shared", user_clip=0.2, count_shrinkage=1.0)
    num_ads, dim = 40, 3
    counts = rng.uniform(0, 30, num_ads)
    total = {"als_target": rng.normal(size=(num_ads, dim)), "als_count": counts, "als_user_gram": np.eye(dim + 1) * 4.0}

    def on_prior(noise_multiplier: float) -> float | None:
        strategy = ALSAggregation(settings, num_ads, dim)
        # the pooled popularity releases (round 1), which the statistics rounds' solve reads
        strategy.restore({"als_positives": counts / 2, "variance/als_positives": np.array(noise_multiplier**2), "signal": np.array(20.0)})
        _, metrics = strategy.solve({k: v.copy() for k, v in total.items()}, [PrivacyReport(1.0, noise_multiplier).metrics()])
        return metrics.get("als-ads-on-prior")

    with caplog.at_level(logging.WARNING):
        assert on_prior(100.0) == 1.0  # count noise std in the thousands
    assert "ranks by (noisy) popularity" in caplog.text
    assert 0.0 <= on_prior(0.01) < 0.2
    assert on_prior(0.0) is None


@pytest.mark.parametrize("mode", ["shared", "per-ad"])
def test_the_prior_weight_scales_only_what_the_tags_lend(mode):
    """`prior_weight` w: an ad nobody counted takes w x its tags' mean factors (the tags' solve
    itself unchanged); an ad's own share of its factors is untouched; biases are the ads' own."""
    rng = np.random.default_rng(8)
    dim = 3
    tags = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    counts = np.array([80.0, 120.0, 0.0, 40.0])
    stats = {"als_target": rng.normal(size=(4, dim)) * counts[:, None] / 10, "als_positives": counts / 2,
             "als_user_gram": np.eye(dim + 1) * 4.0}
    if mode == "shared":
        stats["als_count"] = counts
    else:
        stats["als_gram"] = counts[:, None, None] * np.eye(dim + 1)[None] * 0.04
    stds = {"als_count": 20.0} if mode == "shared" else {"als_gram": 20.0 * 0.2**2}  # a count std of 20 either way
    settings = {"user_clip": 0.2, "count_shrinkage": 1.0}
    full = solve_ads(stats, _settings(mode, **settings, prior_weight=1.0), stds, tags=tags)
    none = solve_ads(stats, _settings(mode, **settings, prior_weight=1.0), stds)
    small = solve_ads(stats, _settings(mode, **settings, prior_weight=0.01), stds, tags=tags)
    lent = full["ad_factors"] - none["ad_factors"]  # what the tags lend each ad at full weight
    assert np.linalg.norm(lent[2]) > 1e-3  # the uncounted ad takes its tags' factors
    np.testing.assert_allclose(small["ad_factors"], none["ad_factors"] + 0.01 * lent, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(small["ad_bias"], full["ad_bias"])


def test_the_run_config_sets_the_prior_weight(tmp_path):
    cfg = small_run_config(tmp_path, privacy="user", **{"als-catalog-prior": True, "als-catalog-prior-weight": 0.25})
    assert ALSSettings.from_config(cfg).prior_weight == 0.25
    assert ALSSettings.from_config(small_run_config(tmp_path / "default", privacy="user")).prior_weight == 0.01
    with pytest.raises(ConfigError):
        small_run_config(tmp_path / "bad", privacy="user", **{"als-catalog-prior-weight": 2.0})
