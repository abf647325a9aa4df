"""The closed delivery loop (issue 18): the merchant's append-only log, the simulated users, the
A/B/n loop on a small synthetic market."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from client.delivery_log import DeliveryLog, DeliveryLogError, LogRow
from client.privacy.ledger import PrivacyRefusal
from shared.config import RunConfig
from shared.data.loaders import load_log_file
from shared.data.schema import Event
from shared.data.synthetic import SyntheticSpec, generate
from simulations.delivery.ab_test import assign_policy, ratio_uplift
from simulations.delivery.loop import DeliveryLoop, Served
from simulations.delivery.policies import choose_slate
from simulations.delivery.settings import DeliverySettings, ResponseSettings
from simulations.delivery.world import SimulatedUsers
from simulations.report import _delivery_section

SPEC = SyntheticSpec(users=900, ads=150, merchants=3, seed=5)


@pytest.fixture(scope="module")
def market():
    return generate(SPEC)


def _rows(batch: int, n: int) -> list[LogRow]:
    return [LogRow(f"u{i}", f"ad-{(batch * 7 + i) % 150:05d}", 1_800_000_000 + batch, Event.CLICK if i % 3 else Event.IMPRESSION)
            for i in range(n)]


# ====================================================================== the merchant's log
def test_a_batch_is_appended_once_across_reopens(tmp_path: Path, market):
    dataset, _ = market
    log = DeliveryLog(tmp_path / "log.csv")
    assert log.append("round-1", _rows(1, 4)) == 4
    assert log.append("round-1", _rows(1, 4)) == 0  # a replayed round writes nothing
    reopened = DeliveryLog(tmp_path / "log.csv")  # a restarted merchant
    assert reopened.batches == {"round-1": 4}
    assert reopened.append("round-1", _rows(1, 4)) == 0
    assert reopened.append("round-2", _rows(2, 3)) == 3
    read = load_log_file(tmp_path / "log.csv", dataset.catalog)
    assert len(read) == 7
    assert read.user.tolist() == [f"u{i}" for i in range(4)] + [f"u{i}" for i in range(3)]
    assert read.event.tolist() == [int(r.event) for r in _rows(1, 4) + _rows(2, 3)]


def test_a_batch_torn_by_a_crash_is_cut_away_and_replayed_whole(tmp_path: Path, market):
    dataset, _ = market
    path = tmp_path / "log.csv"
    DeliveryLog(path).append("round-1", _rows(1, 5))
    committed = path.read_bytes()
    with path.open("ab") as handle:  # the crash: half of round 2's rows on disk, no journal line
        handle.write(b"u0,ad-00014,1800000002,click\nu1,ad-0")
    log = DeliveryLog(path)
    assert path.read_bytes() == committed
    assert log.append("round-2", _rows(2, 5)) == 5
    read = load_log_file(path, dataset.catalog)
    assert len(read) == 10
    assert sorted(read.timestamp.tolist()) == [1_800_000_001] * 5 + [1_800_000_002] * 5


def test_a_torn_journal_line_uncommits_its_batch(tmp_path: Path, market):
    dataset, _ = market
    path = tmp_path / "log.csv"
    log = DeliveryLog(path)
    log.append("round-1", _rows(1, 2))
    log.append("round-2", _rows(2, 2))
    journal = log.journal_path.read_text().splitlines()
    log.journal_path.write_text(journal[0] + "\n" + journal[1][:10])  # the crash tore the last journal line
    reopened = DeliveryLog(path)
    assert reopened.batches == {"round-1": 2}
    assert len(load_log_file(path, dataset.catalog)) == 2
    assert reopened.append("round-2", _rows(2, 2)) == 2
    assert len(load_log_file(path, dataset.catalog)) == 4


def test_a_damaged_journal_is_refused(tmp_path: Path):
    log = DeliveryLog(tmp_path / "log.csv")
    log.append("round-1", _rows(1, 2))
    log.append("round-2", _rows(2, 2))
    lines = log.journal_path.read_text().splitlines()
    log.journal_path.write_text("not json\n" + lines[1] + "\n")
    with pytest.raises(DeliveryLogError, match=r"log.csv.batches:1"):
        DeliveryLog(tmp_path / "log.csv")


# ====================================================================== users and slates
def test_a_users_answers_do_not_depend_on_who_else_is_served(market):
    _, truth = market
    users = SimulatedUsers(truth, ResponseSettings(), seed=3)
    ads = np.array([3, 17, 40, 99, 120])
    alone = users.respond("m0-u000001", ads, server_round=4)
    users.respond("m1-u000500", ads, server_round=4)  # another user answers in between
    again = users.respond("m0-u000001", ads, server_round=4)
    assert np.array_equal(alone.clicked, again.clicked) and np.array_equal(alone.purchased, again.purchased)
    assert not np.any(alone.purchased & ~alone.clicked)


def test_position_bias_lowers_the_click_rate_down_the_slate(market):
    _, truth = market
    users = SimulatedUsers(truth, ResponseSettings(click_noise=0.0), seed=3)
    user = next(iter(truth.user_taste))
    ad = np.array([int(np.argmax(truth.ad_vectors @ truth.user_taste[user]))])
    clicks = np.zeros(5)
    for server_round in range(1, 3001):
        slate = np.concatenate([ad, np.setdiff1d(np.arange(5) + 1, ad)[:4]])
        answered = users.respond(user, np.roll(slate, server_round % 5), server_round)
        clicks[(np.flatnonzero(answered.ads == ad[0])[0])] += answered.clicked[answered.ads == ad[0]][0]
    rate = clicks / 600
    assert rate[0] > 1.5 * rate[1] > 0 and rate[1] > rate[4]  # examination 1, 1/2, ..., 1/5


def test_a_slate_never_holds_an_excluded_ad_or_a_repeat():
    rng = np.random.default_rng(0)
    scores = rng.random(50)
    excluded = np.zeros(50, dtype=bool)
    excluded[np.argsort(-scores)[:5]] = True  # the five best are the user's own clicks
    for exploration in (0.0, 0.5, 1.0):
        for _ in range(50):
            slate = choose_slate(scores, excluded, 8, exploration, rng)
            assert len(set(slate.tolist())) == 8 and not excluded[slate].any()
    greedy = choose_slate(scores, excluded, 8, 0.0, rng)
    assert greedy.tolist() == np.argsort(-scores)[5:13].tolist()


# ====================================================================== the loop
def _arm_totals(served: Served, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([served.clicks[u] for u in users], float), np.array([served.impressions[u] for u in users], float)


def test_the_learned_policy_beats_random_and_popularity_with_a_significant_ab_result(tmp_path: Path, market):
    dataset, truth = market
    # the model ranked alone: this test is of the loop and its A/B test; the synthetic users carry
    # no loyalty to their last choices' tags, so the shipped content affinity narrows the margin
    # (+36%, p = 0.014 over popularity; docs/BENCHMARKS.md "The closed loop of ad delivery")
    cfg = RunConfig.from_flower({"privacy": "none", "factors": 8, "seed": 5, "content-affinity": 0.0})
    settings = DeliverySettings(rounds=5, active_share=0.6, arms=["federated", "popularity", "random"])
    result = DeliveryLoop(cfg, settings, dataset, truth, tmp_path).run()

    served = result.served
    federated = _arm_totals(served["federated"], list(served["federated"].impressions))
    for control in ("popularity", "random"):
        baseline = _arm_totals(served[control], list(served[control].impressions))
        test = ratio_uplift(baseline[0], baseline[1], federated[0], federated[1])
        assert test.uplift > 0.2 and test.p_value < 0.01, (control, test)

    # every impression served is in the merchants' logs exactly once, beside their history
    history = {m: int((dataset.log.merchant == m).sum()) for m in ("merchant-0", "merchant-1", "merchant-2")}
    impressions = sum(r.impressions for r in result.rounds)
    logged = sum(len(load_log_file(tmp_path / m / "log.csv", dataset.catalog)) - rows for m, rows in history.items())
    assert logged == impressions == sum(sum(s.impressions.values()) for s in served.values())
    # the A/B/n split is the users' stable arm, balanced over the arms
    assert all(arm == assign_policy(user, settings.experiment, settings.arms) for user, arm in result.arms_of.items())
    shares = np.array([sum(a == arm for a in result.arms_of.values()) for arm in settings.arms]) / len(result.arms_of)
    assert np.all(np.abs(shares - 1 / 3) < 0.06)


def test_a_restarted_loop_logs_no_round_twice(tmp_path: Path, market):
    dataset, truth = market
    cfg = RunConfig.from_flower({"privacy": "none", "factors": 4, "seed": 5})
    settings = DeliverySettings(rounds=3, active_share=0.3, arms=["federated", "random"])
    first = DeliveryLoop(cfg, settings.model_copy(update={"rounds": 2}), dataset, truth, tmp_path).run()
    # a crash after round 2's batch, then a restart that resumes at round 2 (it replays it)
    again = DeliveryLoop(cfg, settings, dataset, truth, tmp_path).run(first_round=2)
    log = DeliveryLog(tmp_path / "merchant-0" / "log.csv")
    assert sorted(log.batches) == ["round-1", "round-2", "round-3"]
    first_rows = {r.server_round: r for r in first.rounds if r.merchant == "merchant-0" and r.arm == "federated"}
    history = int((dataset.log.merchant == "merchant-0").sum())
    expected = history + sum(r.impressions for r in first.rounds if r.merchant == "merchant-0")
    expected += sum(r.impressions for r in again.rounds if r.merchant == "merchant-0" and r.server_round == 3)
    assert len(load_log_file(log.path, dataset.catalog)) == expected
    assert first_rows[1].impressions > 0


def test_private_delivery_spends_the_merchants_budget_and_no_more(tmp_path: Path, market):
    dataset, truth = market
    cfg = RunConfig.from_flower({"privacy": "user", "target-epsilon": 4.0, "dp-metrics": "none", "factors": 4, "seed": 5})
    settings = DeliverySettings(rounds=2, retrain_every=1, active_share=0.2, arms=["federated", "local-only"])
    result = DeliveryLoop(cfg, settings, dataset, truth, tmp_path).run()
    assert all(3.9 < spent <= 4.0 + 1e-9 for spent in result.epsilon.values())
    # a third round was never planned: every merchant's ledger refuses it
    with pytest.raises(PrivacyRefusal, match="budget"):
        DeliveryLoop(cfg, settings.model_copy(update={"rounds": 3}), dataset, truth, tmp_path).run(first_round=3)


# ====================================================================== the experiment file and its report
SMALL_EXPERIMENT = """dataset = "synthetic"
synthetic-users = 400
synthetic-ads = 100
synthetic-merchants = 3
factors = 4
privacy = "none"

[sweep]
epsilons = [8]

[delivery]
rounds = 3
retrain-every = 2
arms = ["federated", "local-only", "random"]
"""


def test_a_delivery_experiment_file_runs_every_epsilon_and_writes_its_report(tmp_path: Path):
    from simulations.delivery.__main__ import main

    path = tmp_path / "small.toml"
    path.write_text(SMALL_EXPERIMENT)
    assert main([str(path), "--output", str(tmp_path / "out" / "delivery")]) == 0
    out = tmp_path / "out" / "delivery"
    records = json.loads((out / "delivery.json").read_text())
    own = [r for r in records if r["uplift_vs"] is None]
    assert {(r["policy"], r["epsilon"]) for r in own} == {(p, e) for p in ("federated", "local-only", "random") for e in (None, 8.0)}
    uplift = [r for r in records if r["uplift_vs"] == "random" and r["merchant"] is None]
    assert {(r["epsilon"], r["metric"]) for r in uplift} == {(None, "ctr"), (None, "cvr"), (8.0, "ctr"), (8.0, "cvr")}
    assert all(r["ci_low"] <= r["uplift"] <= r["ci_high"] and 0 <= r["p_value"] <= 1 for r in uplift)
    rounds = json.loads((out / "rounds.json").read_text())
    assert len(rounds) == 3 * 3 * 2 * (1 + 3)  # rounds x policies x runs x (all merchants, each of 3)
    overall = [r for r in rounds if r["merchant"] is None and r["impressions"]]
    assert all(r["impressions"] == sum(m["impressions"] for m in rounds if m["merchant"] is not None and
                                       (m["round"], m["policy"], m["epsilon"]) == (r["round"], r["policy"], r["epsilon"])) for r in overall)
    assert {p.name for p in (out / "plots").iterdir()} == {"ctr_rounds.png", "uplift.png", "per_merchant.png", "exposure.png"}
    assert "A/B uplift of federated" in (out / "report.html").read_text()
    batches = DeliveryLog(out / "runs" / "eps8" / "merchant-0" / "log.csv").batches
    assert sorted(batches) == ["round-1", "round-2", "round-3"]
    # a sweep of the same file puts the loop under its run folder: its report shows the loop's tables and figures
    section = _delivery_section(tmp_path / "out")
    assert section.count("<img") == 4 and "delivery/plots/uplift.png" in section and "small_advertiser_coverage" in section
    assert _delivery_section(tmp_path) == ""


def test_a_bad_delivery_table_names_its_file_line_and_field(tmp_path: Path, capsys):
    from simulations.delivery.__main__ import main

    path = tmp_path / "bad.toml"
    path.write_text(SMALL_EXPERIMENT.replace('arms = ["federated", "local-only", "random"]', "slate-size = 0"))
    assert main([str(path)]) == 1
    assert re.search(r"bad.toml.*:14.*slate-size", capsys.readouterr().err)
    path.write_text(SMALL_EXPERIMENT.replace('dataset = "synthetic"', 'dataset = "logs"\ndata-path = "x.csv"'))
    assert main([str(path)]) == 1
    assert "needs the synthetic market" in capsys.readouterr().err
