"""Private ALS's popularity release and rule (shared/als.py, server/als_aggregation.py): the
first release is the ads' noisy positive counts alone; from it the server decides once whether
a personal model can beat popularity at this noise, and if not every later round releases
counts and the model ranks by them: the run then ends exactly at the DP-popularity floor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.node_data import load_node
from server.als_aggregation import POPULARITY_SIGNAL, RANKS_BY_POPULARITY, ALSAggregation
from server.checkpoint import Checkpointer
from shared.als import (
    POPULARITY_MIN_SIGNAL,
    POPULARITY_SHARE,
    ALSSettings,
    lean_on_popularity,
    popularity_model,
    popularity_signal,
    popularity_statistics,
    release_budget_shares,
)
from shared.node_config import NodeConfig
from shared.params import init_global_arrays
from shared.wire import (
    AD_BIAS,
    AD_FACTORS,
    ALS_POSITIVES,
    ALS_RELEASE,
    ARRAYS,
    DP_NOISE_MULTIPLIER,
    DP_RELEASE_SHARE,
    METRICS,
    POPULARITY,
    PRIVACY_REFUSED,
    STATISTICS,
    PrivacyReport,
    TrainReply,
    from_array_record,
    plain_metrics,
    to_array_record,
)
from tests.conftest import client_call, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")


def _settings() -> ALSSettings:
    return ALSSettings(alpha0=0.5, user_l2=1.0, ad_l2=1.0, max_rows=5, user_clip=0.2, gram_mode="shared", count_shrinkage=1.0)


def test_the_plan_spends_the_popularity_share_first_and_exactly_the_budget():
    shares = release_budget_shares(4, 2.0)
    assert shares[0] == pytest.approx(POPULARITY_SHARE) and shares.sum() == pytest.approx(1.0)
    assert np.all(np.diff(shares[1:]) > 0)  # later statistics rounds get more, as before
    assert release_budget_shares(1, 2.0).tolist() == [1.0]  # one round: popularity with the whole budget


def test_the_signal_reads_the_typical_count_through_the_noise():
    rng = np.random.default_rng(3)
    counts = rng.pareto(1.5, 5000) * 10  # skewed, as ad popularity is
    truth = float(np.square(counts).sum() / counts.sum())
    std = 20.0
    estimates = [popularity_signal(counts + rng.normal(0, std, counts.size), std, 4.0) for _ in range(20)]
    assert np.median(estimates) == pytest.approx(truth / 4.0, rel=0.1)
    # pure noise carries no signal; exact counts (no noise) are always signal enough
    assert popularity_signal(rng.normal(0, std, 5000), std, 4.0) < 1.0
    assert popularity_signal(counts, 0.0, 0.0) == math.inf


def _popularity_replies(positives: list[np.ndarray], noise_multiplier: float) -> list[Message]:
    replies = []
    for values in positives:
        request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
        replies.append(TrainReply("m", {ALS_POSITIVES: values}, None, privacy=PrivacyReport(1.0, noise_multiplier)).to_message(request))
    return replies


@pytest.mark.parametrize(("scale", "chooses_popularity"), [(1000.0, False), (0.01, True)])
def test_round_one_asks_for_popularity_and_the_rule_decides_once(scale: float, chooses_popularity: bool, caplog):
    settings, num_ads, dim = _settings(), 300, 4
    strategy = ALSAggregation(settings, num_ads, dim, num_rounds=3)
    sent = init_global_arrays(num_ads, dim, seed=0)
    assert strategy.begin_round(1, sent) == (POPULARITY, sent)
    rng = np.random.default_rng(0)
    counts = [scale * rng.pareto(1.5, num_ads) for _ in range(3)]
    arrays, metrics = strategy.aggregate_train(1, _popularity_replies(counts, 1.0))
    assert arrays is not None and metrics is not None
    signal = strategy.signal
    assert signal is not None and metrics[POPULARITY_SIGNAL] == pytest.approx(signal)
    assert (signal < POPULARITY_MIN_SIGNAL) is chooses_popularity and metrics[RANKS_BY_POPULARITY] == float(chooses_popularity)
    model = from_array_record(arrays)
    pooled = strategy.state()[ALS_POSITIVES]  # the noisy summed counts
    counts_order = np.argsort(-pooled.astype(np.float32), kind="stable")
    assert np.array_equal(np.argsort(-model[AD_BIAS], kind="stable"), counts_order)
    if chooses_popularity:
        assert "ranks by popularity" in caplog.text
        # the model is the pooled counts' ranking: no factors, biases in the counts' order
        assert not model[AD_FACTORS].any()
        assert strategy.begin_round(2, model)[0] == POPULARITY and strategy.begin_round(3, model)[0] == POPULARITY
    else:
        # until the first statistics release the model serves the released counts (the warm
        # start's own bias, 0, ranks at random); that release trains from the warm start itself
        assert np.array_equal(model[AD_FACTORS], sent[AD_FACTORS]) and not sent[AD_BIAS].any()
        release, trains_from = strategy.begin_round(2, model)
        assert release == STATISTICS and all(np.array_equal(trains_from[key], sent[key]) for key in sent)
        assert strategy.sent is trains_from
    assert strategy.signal == signal  # decided once


def test_a_popularity_round_leaves_a_trained_model_as_it_was():
    """A popularity round after the model has learned (a resumed run whose counts were lost)
    keeps the model: only a warm start, whose bias is 0, takes the counts as its bias."""
    num_ads, dim = 300, 4
    strategy = ALSAggregation(_settings(), num_ads, dim, num_rounds=3)
    trained = init_global_arrays(num_ads, dim, seed=1)
    trained[AD_BIAS] = np.random.default_rng(1).normal(size=num_ads).astype(np.float32)
    assert strategy.begin_round(4, trained)[0] == POPULARITY
    rng = np.random.default_rng(0)
    arrays, _ = strategy.aggregate_train(4, _popularity_replies([1000 * rng.pareto(1.5, num_ads) for _ in range(3)], 1.0))
    assert arrays is not None and strategy.signal is not None and strategy.signal >= POPULARITY_MIN_SIGNAL
    model = from_array_record(arrays)
    assert all(np.array_equal(model[key], trained[key]) for key in trained)


def test_the_warm_start_serves_the_counts_and_the_first_statistics_release_trains_without_them(tmp_path: Path):
    """Private ALS in-process: after the popularity release the model ranks by the released
    counts (its bias) on the warm start's factors; the first statistics release trains from the
    warm start itself (bias 0: the counts are a ranking to serve, not residuals for the users to
    fit), and from then on every round trains from the model as it is."""
    from client.solvers.als import ALSSolver
    from simulations.in_process import private_als_round
    from tests.conftest import simulated_node

    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 3})
    nodes = [simulated_node(cfg, pid) for pid in range(3)]
    num_ads = nodes[0].data.split.num_ads
    strategy = ALSAggregation(ALSSettings.from_config(cfg), num_ads, cfg.factors, num_rounds=3)
    strategy.min_signal = 0.0  # a personal model whatever the noise of this small market
    solvers = [ALSSolver(cfg, node.data) for node in nodes]
    warm = init_global_arrays(num_ads, cfg.factors, cfg.seed)
    rng = np.random.default_rng(0)
    served = private_als_round(strategy, solvers, warm, 1, 1.0, rng)
    pooled = strategy.state()[ALS_POSITIVES]
    assert np.array_equal(served[AD_FACTORS], warm[AD_FACTORS])
    assert np.array_equal(np.argsort(-served[AD_BIAS], kind="stable"), np.argsort(-pooled.astype(np.float32), kind="stable"))
    trained = private_als_round(strategy, solvers, served, 2, 1.0, rng)
    assert not strategy.sent[AD_BIAS].any() and np.array_equal(strategy.sent[AD_FACTORS], warm[AD_FACTORS])
    assert trained[AD_BIAS].any() and not np.array_equal(trained[AD_FACTORS], warm[AD_FACTORS])
    private_als_round(strategy, solvers, trained, 3, 1.0, rng)
    assert all(np.array_equal(strategy.sent[key], trained[key]) for key in trained)  # its own bias now


def test_the_rule_reads_each_release_at_its_share_and_one_liar_cannot_move_it():
    """The signal is the same whichever release of the plan carried the counts (a retry, a
    resumed run: each reply says its share), and one merchant reporting a huge noise multiplier
    (which would make the counts look like noise) does not flip the decision for everyone."""
    rng = np.random.default_rng(5)
    counts = [30 * rng.pareto(1.5, 400) for _ in range(5)]
    plan_sigma = 2.0

    def signal(shares: list[float], multipliers: list[float]) -> float:
        strategy = ALSAggregation(_settings(), 400, 4, num_rounds=3)
        strategy.begin_round(1, init_global_arrays(400, 4, seed=0))
        replies = []
        for values, share, sigma in zip(counts, shares, multipliers, strict=True):
            request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
            reply = TrainReply("m", {ALS_POSITIVES: values}, None, {DP_RELEASE_SHARE: share}, PrivacyReport(1.0, sigma))
            replies.append(reply.to_message(request))
        strategy.aggregate_train(1, replies)
        assert strategy.signal is not None
        return strategy.signal

    first = signal([0.17] * 5, [plan_sigma / math.sqrt(0.17)] * 5)
    later = signal([0.25] * 5, [plan_sigma / math.sqrt(0.25)] * 5)  # less noise, and a larger share of the budget
    assert later == pytest.approx(first, rel=0.1)
    liar = signal([0.17] * 5, [plan_sigma / math.sqrt(0.17)] * 4 + [1e6])
    assert liar == pytest.approx(first, rel=0.1)


def test_after_the_rule_chose_popularity_the_pooled_counts_carry_the_floor_noise():
    """Every release on counts: their inverse-variance pool has the noise of one release of the
    whole budget, the DP-popularity floor's (the rule's fallback costs nothing against it)."""
    settings, num_ads, rounds, sigma = _settings(), 200, 4, 3.0
    strategy = ALSAggregation(settings, num_ads, 4, num_rounds=rounds)
    shares = release_budget_shares(rounds, 2.0)
    zeros = [np.zeros(num_ads)] * 5
    for server_round in range(1, rounds + 1):
        assert strategy.begin_round(server_round, init_global_arrays(num_ads, 4, seed=0))[0] == POPULARITY
        strategy.aggregate_train(server_round, _popularity_replies(zeros, sigma / math.sqrt(shares[server_round - 1])))
    pooled_variance = float(strategy.state()["variance/" + ALS_POSITIVES])
    floor_variance = 5 * (sigma * math.sqrt(settings.max_rows or 0)) ** 2  # five merchants, each its full noise
    assert pooled_variance == pytest.approx(floor_variance)


def test_the_lean_on_popularity_orders_equal_personal_scores_by_count():
    num_ads, dim = 6, 3
    arrays = {AD_FACTORS: np.tile(np.array([[0.5, 0.0, 0.1]], dtype=np.float32), (num_ads, 1)), AD_BIAS: np.zeros(num_ads, np.float32)}
    positives = np.array([5.0, 50.0, 1.0, 20.0, 0.0, 9.0])
    gram = np.diag([2.0, 1.0, 1.0, 0.04 * 10])  # ten users' worth at C = 0.2
    leaned = lean_on_popularity(arrays, positives, gram, 0.2, 1.0)
    assert np.array_equal(np.argsort(-leaned[AD_BIAS]), np.argsort(-positives))
    assert lean_on_popularity(arrays, positives, gram, 0.2, 0.0) is arrays
    assert popularity_model(positives, dim)[AD_BIAS].argmax() == 1


def test_state_survives_a_checkpoint(tmp_path: Path):
    strategy = ALSAggregation(_settings(), 50, 4, num_rounds=3)
    warm = init_global_arrays(50, 4, seed=0)
    strategy.begin_round(1, warm)
    counts = np.random.default_rng(2).pareto(1.5, 50) * 100
    aggregated, _ = strategy.aggregate_train(1, _popularity_replies([counts] * 2, 0.5))
    assert aggregated is not None
    model = from_array_record(aggregated)  # the warm start serving the counts
    assert model[AD_BIAS].any()
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save_round(1, model, [{"round": 1}], {}, strategy.state())
    resumed = ALSAggregation(_settings(), 50, 4, num_rounds=3)
    state = checkpointer.server_state(1)
    assert state is not None
    resumed.restore(state)
    assert resumed.signal == strategy.signal
    # both train the first statistics release from the warm start, not from the served counts
    for release, trains_from in (resumed.begin_round(2, model), strategy.begin_round(2, model)):
        assert release == STATISTICS and all(np.array_equal(trains_from[key], warm[key]) for key in warm)
    assert np.array_equal(resumed.state()[ALS_POSITIVES], strategy.state()[ALS_POSITIVES])
    # a resume that lost the state asks for popularity again rather than solving without counts
    assert ALSAggregation(_settings(), 50, 4, num_rounds=3).begin_round(2, {})[0] == POPULARITY
    assert checkpointer.server_state(2) is None


def test_an_earlier_statistics_release_serves_more_popularity_and_trains_as_solved(tmp_path: Path):
    """With the run's budget plan known (the ServerApp's strategy), a statistics release before the
    plan's last is noisier, so the model it serves leans further on the pooled counts (by
    lean / signal x (sqrt(last share / its share) - 1) spreads); the next round trains from the
    model as solved, and the last release serves exactly what it solved."""
    from client.solvers.als import ALSSolver
    from shared.als import release_budget_shares
    from simulations.in_process import private_als_round
    from tests.conftest import simulated_node

    rounds = 4
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": rounds})
    nodes = [simulated_node(cfg, pid) for pid in range(3)]
    num_ads = nodes[0].data.split.num_ads
    strategy = ALSAggregation(ALSSettings.from_config(cfg), num_ads, cfg.factors, num_rounds=rounds)
    strategy.min_signal = 0.0
    strategy.release_shares = release_budget_shares(rounds, cfg.als_budget_growth)
    solvers = [ALSSolver(cfg, node.data) for node in nodes]
    rng = np.random.default_rng(1)
    served = private_als_round(strategy, solvers, init_global_arrays(num_ads, cfg.factors, cfg.seed), 1, 1.0, rng)
    assert strategy.serving_lean(1) == pytest.approx(strategy.lean / strategy.signal * (math.sqrt(
        strategy.release_shares[-1] / strategy.release_shares[0]) - 1))
    leans = [strategy.serving_lean(r) for r in range(2, rounds + 1)]
    assert leans[0] > leans[1] > leans[2] == 0.0  # the noisier the release, the more it leans
    pooled = strategy.state()[ALS_POSITIVES].astype(np.float64)
    for server_round in range(2, rounds + 1):
        served = private_als_round(strategy, solvers, served, server_round, 1.0, rng)
        solved = strategy.state().get("train-bias")
        if server_round < rounds:  # served: the solved bias plus more of the counts' standardized order
            assert solved is not None and served[AD_BIAS].shape == solved.shape
            extra = served[AD_BIAS].astype(np.float64) - solved
            assert np.corrcoef(extra, pooled)[0, 1] > 0.999 and np.all(extra[np.argsort(pooled)[-5:]] > 0)
            _, trains_from = strategy.begin_round(server_round + 1, served)
            assert np.array_equal(trains_from[AD_BIAS], solved) and np.array_equal(trains_from[AD_FACTORS], served[AD_FACTORS])
            resumed = ALSAggregation(ALSSettings.from_config(cfg), num_ads, cfg.factors, num_rounds=rounds)
            resumed.restore(strategy.state())  # the checkpoint's server state keeps it
            assert np.array_equal(resumed.begin_round(server_round + 1, served)[1][AD_BIAS], solved)
        else:
            assert solved is None  # the last release serves what it solved


def test_the_serving_lean_reads_each_release_at_its_reported_share(tmp_path: Path):
    from server.strategies import build_strategy
    from shared.als import release_budget_shares
    from shared.data.sources import load_catalog

    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 5})
    strategy, _ = build_strategy(cfg, 3, load_catalog(cfg))
    assert isinstance(strategy, ALSAggregation) and strategy.warm_factors is not None
    shares = release_budget_shares(5, cfg.als_budget_growth)
    assert strategy.release_shares is not None and np.allclose(strategy.release_shares, shares)
    assert strategy.serving_lean(3) == 0.0  # no signal yet: nothing to lean on
    strategy.signal = 20.0
    base = strategy.lean / 20.0
    assert strategy.serving_lean(5) == 0.0 and strategy.serving_lean(2, float(shares[-1])) == 0.0
    assert strategy.serving_lean(2) == pytest.approx(base * (math.sqrt(shares[-1] / shares[1]) - 1))
    # a merchant whose release count ran ahead (a retry) reports its own share: that one is read
    assert strategy.serving_lean(2, float(shares[3])) == pytest.approx(base * (math.sqrt(shares[-1] / shares[3]) - 1))
    assert strategy.serving_lean(9) == 0.0  # past the plan
    none, _ = build_strategy(small_run_config(tmp_path / "plain", **{"num-rounds": 5}), 3, load_catalog(cfg))
    assert isinstance(none, ALSAggregation) and none.release_shares is None


def test_the_catalog_prior_is_built_where_it_acts_and_bounded(tmp_path: Path, monkeypatch, caplog):
    """Under DP the strategy holds the catalog's tags and the prior's weight (0.01 by default);
    without DP, where no ad's factors are shrunk, no tag matrix is built; a catalog whose
    [ads, tags] matrix would be too large gets no prior, and the run says so."""
    import server.strategies as strategies
    from shared.data.sources import load_catalog

    private = small_run_config(tmp_path, privacy="user")
    catalog = load_catalog(private)
    strategy, _ = strategies.build_strategy(private, 3, catalog)
    assert isinstance(strategy, ALSAggregation) and strategy.tags is not None and strategy.tags.shape[0] == len(catalog)
    assert strategy.settings.prior_weight == 0.01
    exact, _ = strategies.build_strategy(small_run_config(tmp_path / "exact", privacy="none"), 3, catalog)
    assert isinstance(exact, ALSAggregation) and exact.tags is None
    off, _ = strategies.build_strategy(small_run_config(tmp_path / "off", privacy="user", **{"als-catalog-prior": False}), 3, catalog)
    assert isinstance(off, ALSAggregation) and off.tags is None
    monkeypatch.setattr(strategies, "PRIOR_MAX_ENTRIES", len(catalog))
    with caplog.at_level("WARNING"):
        bounded, _ = strategies.build_strategy(private, 3, catalog)
    assert isinstance(bounded, ALSAggregation) and bounded.tags is None
    assert "catalog prior: not applied" in caplog.text


def test_the_strategy_takes_the_warm_start_the_server_app_built(tmp_path: Path):
    """A fresh run builds its initial model once (the ServerApp's, handed over); without one the
    strategy builds the same model from the run config (a resume)."""
    from server.strategies import build_strategy
    from shared.data.sources import load_catalog
    from shared.params import initial_model

    cfg = small_run_config(tmp_path, privacy="user")
    catalog = load_catalog(cfg)
    built, _ = build_strategy(cfg, 3, catalog)
    assert isinstance(built, ALSAggregation) and built.warm_factors is not None
    assert np.array_equal(built.warm_factors, initial_model(cfg, catalog)[AD_FACTORS])
    handed = {**initial_model(cfg, catalog), AD_FACTORS: np.full_like(built.warm_factors, 0.5)}
    taken, _ = build_strategy(cfg, 3, catalog, initial=handed)
    assert isinstance(taken, ALSAggregation) and taken.warm_factors is handed[AD_FACTORS]


def test_a_resume_that_lost_the_state_still_trains_the_first_statistics_release_from_the_warm_start(tmp_path: Path):
    """The round-1 checkpoint's model carries the counts as its bias; a resume without the server
    state asks for popularity again. Knowing the run's warm-start factors (the ServerApp's
    strategy does), the strategy serves the new counts and still trains from the warm start."""
    warm = init_global_arrays(50, 4, seed=0)
    rng = np.random.default_rng(3)
    first = ALSAggregation(_settings(), 50, 4, num_rounds=4)
    first.begin_round(1, warm)
    aggregated, _ = first.aggregate_train(1, _popularity_replies([rng.pareto(1.5, 50) * 100] * 2, 0.5))
    assert aggregated is not None
    served = from_array_record(aggregated)
    resumed = ALSAggregation(_settings(), 50, 4, num_rounds=4)  # no state restored
    resumed.warm_factors = warm[AD_FACTORS]
    assert resumed.begin_round(2, served)[0] == POPULARITY
    again, _ = resumed.aggregate_train(2, _popularity_replies([rng.pareto(1.5, 50) * 100] * 2, 0.5))
    assert again is not None
    reserved = from_array_record(again)
    pooled = resumed.state()[ALS_POSITIVES]
    assert np.array_equal(np.argsort(-reserved[AD_BIAS], kind="stable"), np.argsort(-pooled.astype(np.float32), kind="stable"))
    release, trains_from = ALSAggregation(_settings(), 50, 4, num_rounds=4).begin_round(3, reserved)
    assert release == POPULARITY  # a strategy that knows neither the state nor the warm start
    resumed_again = ALSAggregation(_settings(), 50, 4, num_rounds=4)
    resumed_again.restore({key: value for key, value in resumed.state().items() if key != "train-bias"})
    resumed_again.warm_factors = warm[AD_FACTORS]
    release, trains_from = resumed_again.begin_round(3, reserved)
    assert release == STATISTICS and all(np.array_equal(trains_from[key], warm[key]) for key in warm)


def test_a_merchant_releases_its_counts_alone_at_the_planned_share(tmp_path: Path):
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 3})
    arrays = init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0)
    reply = client_call("train", cfg, arrays, 1, release=POPULARITY)
    assert not reply.has_error(), reply.error
    sent = from_array_record(reply.content.array_records[ARRAYS])
    assert set(sent) == {ALS_POSITIVES} and sent[ALS_POSITIVES].shape == (cfg.synthetic_ads,)
    ledger = json.loads((Path(cfg.state_dir) / "partition-0" / "privacy_ledger.json").read_text())["ledger"]
    reported = plain_metrics(reply.content.metric_records[METRICS])
    sigma = reported[DP_NOISE_MULTIPLIER]
    assert sigma == pytest.approx(ledger["noise_multiplier"] / math.sqrt(POPULARITY_SHARE))
    assert reported[DP_RELEASE_SHARE] == pytest.approx(POPULARITY_SHARE)
    # noised on every ad, at the popularity release's std (the counts carry the whole release)
    node = load_node(cfg, NodeConfig.from_flower({"partition-id": 0, "num-partitions": 3}))
    settings = ALSSettings.from_config(cfg)
    exact = popularity_statistics(node.data.rows, node.data.num_ads, settings.max_rows)[ALS_POSITIVES]
    noise = sent[ALS_POSITIVES].astype(np.float64) - exact
    assert np.all(noise != 0)
    assert np.std(noise) == pytest.approx(settings.noise_stds(sigma, POPULARITY)[ALS_POSITIVES], rel=0.25)
    # the next release is the statistics, without the counts
    stats = client_call("train", cfg, arrays, 2, release=STATISTICS)
    assert not stats.has_error() and ALS_POSITIVES not in from_array_record(stats.content.array_records[ARRAYS])


def test_only_private_als_makes_a_popularity_release(tmp_path: Path):
    cfg = small_run_config(tmp_path, privacy="user", **{"mf-solver": "sgd"})
    reply = client_call("train", cfg, init_global_arrays(cfg.synthetic_ads, cfg.factors, seed=0), 1, release=POPULARITY)
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSED and "popularity" in reply.error.reason


def test_configure_train_asks_what_the_rule_says():
    strategy = ALSAggregation(_settings(), 20, 4, num_rounds=3, min_train_nodes=1, min_available_nodes=1)

    class OneNode:
        def get_node_ids(self) -> list[int]:
            return [7]

        def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str) -> Message:
            return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    messages = list(strategy.configure_train(1, to_array_record(init_global_arrays(20, 4, seed=0)), ConfigRecord(), OneNode()))  # type: ignore[arg-type]
    assert messages and all(msg.content.config_records["config"][ALS_RELEASE] == POPULARITY for msg in messages)


def test_the_harness_says_what_the_rule_chose():
    from simulations.report import _model
    from simulations.simulate import _popularity_choice

    assert _popularity_choice({}) is None and _model({"popularity_signal": None}) == "-"
    assert "ranks by noisy popularity" in (_popularity_choice({POPULARITY_SIGNAL: 3.2, RANKS_BY_POPULARITY: 1.0}) or "")
    assert "a personal model" in (_popularity_choice({POPULARITY_SIGNAL: 12.0, RANKS_BY_POPULARITY: 0.0}) or "")
    assert _model({"popularity_signal": 3.2, "ranks_by_popularity": 1.0}).startswith("noisy popularity (signal 3.2 < 7")
    assert _model({"popularity_signal": 30.0, "ranks_by_popularity": 1.0}) == "noisy popularity (a run of one round releases popularity only)"
    assert _model({"popularity_signal": 12.0, "ranks_by_popularity": 0.0}) == "personal (signal 12.0)"


def test_a_long_private_run_is_refused_where_its_first_statistics_release_would_overflow(tmp_path: Path):
    """The plan's shares grow as growth^r: over hundreds of rounds the first statistics release
    gets 1e-100 of the budget and noise past float32's range (a 300-round run ended at round 2 on
    a non-finite release). Such a config is refused where it enters, naming the largest growth
    its rounds allow; at that growth the smallest release is finite."""
    from shared.config import ConfigError

    with pytest.raises(ConfigError, match=r"als-budget-growth.*num-rounds 300.*at most 1\.20"):
        small_run_config(tmp_path, privacy="user", **{"num-rounds": 300})
    small_run_config(tmp_path, privacy="none", **{"num-rounds": 300})  # no plan without DP
    small_run_config(tmp_path, privacy="user")  # the shipped growth over a usual run
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 300, "als-budget-growth": 1.2})
    arrays = init_global_arrays(200, cfg.factors, seed=0)
    client_call("train", cfg, arrays, server_round=1, release=POPULARITY)
    reply = client_call("train", cfg, arrays, server_round=2, release=STATISTICS)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    released = from_array_record(reply.content.array_records[ARRAYS])
    assert released and all(np.all(np.isfinite(value)) for value in released.values())
    noise_multiplier = plain_metrics(reply.content.metric_records[METRICS])[DP_NOISE_MULTIPLIER]
    assert noise_multiplier > 1e9  # the smallest share of the plan indeed
