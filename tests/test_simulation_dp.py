"""User-level DP through Flower's simulation runtime: epsilon recorded every round, budgets
that survive a restart, and refusals that stop a run short of its plan, saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.storage import load_npz
from simulations.runtime import SimulationError, run_simulation
from tests.conftest import small_run_config

NUM_CLIENTS = 3
TARGET_EPSILON = 4.0


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("simdp")
    # mf-solver = "als" (the default): private ALS through Flower; DP-SGD's ClientApp path is in test_privacy.py
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 2, "target-epsilon": TARGET_EPSILON})
    run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=480)
    return tmp_path


def test_epsilon_is_recorded_every_round_and_stays_in_budget(dp_run):
    history = json.loads((dp_run / "out" / "history.json").read_text())
    spent = [h["privacy"]["epsilon_max"] for h in history[1:]]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= TARGET_EPSILON
    for h in history[1:]:
        assert len(h["clients"]) == NUM_CLIENTS and "refused" not in h
        for metrics in h["clients"].values():
            assert "train-loss" not in metrics and not any(k.startswith("merchant-pop-") for k in metrics)
    for pid in range(NUM_CLIENTS):
        ledger = json.loads((dp_run / "out" / "state" / f"partition-{pid}" / "privacy_ledger.json").read_text())["ledger"]
        assert ledger["rounds_trained"] == 2 and ledger["target_epsilon"] == TARGET_EPSILON
        assert ledger["non_private_releases"] == 0 and ledger["noise_multiplier"] > 0


def test_a_restart_keeps_the_budget_and_the_run_stops_short_saying_why(dp_run):
    """Resuming for a third round: every merchant's ledger (calibrated for two rounds) refuses;
    the round has no quorum, so the run fails (a non-zero exit), names each merchant's reason in
    run_status.json and keeps the model of round 2."""
    resumed = small_run_config(dp_run, privacy="user", resume=True, **{"num-rounds": 3, "target-epsilon": TARGET_EPSILON})
    with pytest.raises(SimulationError, match="ended after round 2 of 3"):
        run_simulation(resumed.to_flower(), NUM_CLIENTS, dp_run / "flower-resume", timeout=480)
    history = json.loads((dp_run / "out" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    status = json.loads((dp_run / "out" / "run_status.json").read_text())
    assert status["status"] == "ended-short" and status["rounds_planned"] == 3 and status["rounds_completed"] == 2
    participants = status["failed_round"]["participants"]
    assert status["failed_round"]["round"] == 3 and participants["replied"] == []
    assert sorted(participants["asked"]) == sorted(participants["refused"]) == [f"partition-{pid}" for pid in range(NUM_CLIENTS)]
    assert all("privacy budget exhausted" in reason for reason in participants["refused"].values())
    out = dp_run / "out" / "checkpoints"
    assert not (out / "round-0003.npz").exists()
    np.testing.assert_array_equal(load_npz(dp_run / "out" / "model" / "global_model.npz")["ad_factors"],
                                  load_npz(out / "round-0002.npz")["ad_factors"])
    for pid in range(NUM_CLIENTS):
        ledger = json.loads((dp_run / "out" / "state" / f"partition-{pid}" / "privacy_ledger.json").read_text())["ledger"]
        assert ledger["rounds_trained"] == 2


def test_client_level_dp_with_flowers_wrapper_and_accountant(tmp_path):
    """privacy = "client": Flower's server-side fixed clipping; its accountant's epsilon is
    recorded every round, and training stops (the run fails, short of its plan) when the next
    release would pass the budget."""
    cfg = small_run_config(tmp_path, privacy="client", **{
        "mf-solver": "sgd", "num-rounds": 3, "client-noise-multiplier": 4.0, "client-clip-norm": 0.5,
        # replace-one: noise 4 protects as noise 2 would under add-or-remove (test_client_level_dp.py);
        # two releases cost epsilon 1.38, three cost 1.83
        "target-epsilon": 1.5,
    })
    with pytest.raises(SimulationError, match="ended after round 2 of 3: round 3: the server's DP budget is spent"):
        run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=480)  # short of its plan: a failed run
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]  # round 3 would exceed the budget
    assert json.loads((tmp_path / "out" / "run_status.json").read_text())["status"] == "ended-short"
    spent = [h["privacy"]["epsilon_max"] for h in history[1:]]
    assert all(h["privacy"]["level"] == "client" for h in history[1:])
    assert spent == pytest.approx([0.8486, 1.3823], abs=1e-3)
    assert (tmp_path / "out" / "model" / "global_model.npz").is_file()


def test_secure_aggregation_through_flowers_runtime(tmp_path):
    """SecAgg+ in the simulation engine: every node keeps its protocol state in its context
    across the four messages of a round; each round's record holds the sum's guarantee."""
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 2, "secure-aggregation": True, "secure-threshold": 0.6})
    run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=480)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert h["secure"]["contributors"] == NUM_CLIENTS and h["secure"]["threshold"] == 2
        assert len(h["participants"]["replied"]) == NUM_CLIENTS and h["participants"]["failed"] == {}
        assert h["secure"]["sum_noise_multiplier"] > 0
    for pid in range(NUM_CLIENTS):
        ledger = json.loads((tmp_path / "out" / "state" / f"partition-{pid}" / "privacy_ledger.json").read_text())["ledger"]
        assert ledger["rounds_trained"] == 2


def test_neumf_with_content_under_dp_sgd_through_flowers_runtime(tmp_path):
    """NeuMF (mf-solver = "neumf", content tower on) under user-level DP-SGD through the ServerApp
    and ClientApp: every round recorded within the budget, the exported model holds NeuMF's global
    arrays (the server's public content embedding exactly as it was sent),
    and each merchant keeps its users' two embeddings."""
    from shared.params import global_shapes

    cfg = small_run_config(tmp_path, privacy="user", **{
        "mf-solver": "neumf", "neumf-content": True, "content-dim": 8, "num-rounds": 2, "target-epsilon": TARGET_EPSILON})
    run_simulation(cfg.to_flower(), NUM_CLIENTS, tmp_path / "flower", timeout=480)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(0 < h["privacy"]["epsilon_max"] <= TARGET_EPSILON + 1e-6 for h in history[1:])
    first, final = load_npz(tmp_path / "out" / "checkpoints" / "round-0000.npz"), load_npz(tmp_path / "out" / "model" / "global_model.npz")
    shapes = global_shapes(cfg, final["ad_bias"].shape[0])
    assert {key: tuple(value.shape) for key, value in final.items() if key != "ad_ids"} == shapes  # the export names its ads
    np.testing.assert_array_equal(final["ad_content"], first["ad_content"])  # the server's copy stands
    assert not np.allclose(final["ad_gmf"], first["ad_gmf"])
    for pid in range(NUM_CLIENTS):
        state = tmp_path / "out" / "state" / f"partition-{pid}"
        assert load_npz(state / "user_factors.npz")["factors"].shape[1] == 2 * cfg.factors
        assert json.loads((state / "privacy_ledger.json").read_text())["ledger"]["rounds_trained"] == 2
