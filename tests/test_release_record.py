"""A merchant answers an instruction it has already answered with the release it recorded: a
server that crashed between the merchants' release and its checkpoint resumes, sends the
same round again, and no budget is spent twice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.params import init_global_arrays
from shared.wire import EVALUATION, METRICS, NUM_EXAMPLES, SERVER_ROUND, answered_round, from_array_record, plain_metrics
from tests.conftest import client_call, simulated_node, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")


def _ledger(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "state" / "partition-0" / "privacy_ledger.json").read_text())["ledger"]


@pytest.mark.parametrize("solver", ["als", "sgd"])
def test_the_same_instruction_gets_the_recorded_release_and_spends_nothing(tmp_path, solver):
    cfg = small_run_config(tmp_path, privacy="user", **{"mf-solver": solver, "num-rounds": 3})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    first = client_call("train", cfg, arrays, server_round=1)
    spent = _ledger(tmp_path)
    again = client_call("train", cfg, arrays, server_round=1)
    assert _ledger(tmp_path) == spent  # nothing new released, nothing recorded
    assert not again.has_error() and answered_round(again) == 1
    for key, value in from_array_record(first.content["arrays"]).items():
        np.testing.assert_array_equal(from_array_record(again.content["arrays"])[key], value)
    assert plain_metrics(again.content.metric_records["metrics"]) == plain_metrics(first.content.metric_records["metrics"])

    # a different instruction (the next round, or other parameters) is a new release, accounted
    client_call("train", cfg, arrays, server_round=2)
    assert _ledger(tmp_path)["rounds_trained"] == spent["rounds_trained"] + 1
    other = {key: value + 0.01 for key, value in arrays.items()}
    client_call("train", cfg, other, server_round=2)
    assert _ledger(tmp_path)["rounds_trained"] == spent["rounds_trained"] + 2


def test_evaluation_is_recorded_too(tmp_path):
    cfg = small_run_config(tmp_path, privacy="user")
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    first = client_call("evaluate", cfg, arrays, server_round=0)
    spent = _ledger(tmp_path)
    again = client_call("evaluate", cfg, arrays, server_round=0)
    assert _ledger(tmp_path) == spent
    assert plain_metrics(again.content.metric_records["metrics"]) == plain_metrics(first.content.metric_records["metrics"])
    assert again.content.config_records["client"][SERVER_ROUND] == 0


def test_a_training_message_that_carries_the_evaluation_spends_what_both_messages_would(tmp_path):
    """carry-evaluation: the evaluation of the model the message carries (as the previous
    round's), then training from it; the ledger holds the same releases as after an evaluate
    message and a training message, and the same message again gets both recorded releases."""
    cfg = small_run_config(tmp_path / "carried", privacy="user", **{"num-rounds": 3})
    apart = small_run_config(tmp_path / "apart", privacy="user", **{"num-rounds": 3})
    arrays = init_global_arrays(simulated_node(cfg, 0).data.split.num_ads, cfg.factors, cfg.seed)
    first = client_call("train", cfg, arrays, server_round=1, evaluate_first=True)
    assert not first.has_error() and answered_round(first) == 1
    carried = plain_metrics(first.content.metric_records[EVALUATION])
    assert carried["ndcg10_sampled"] >= 0 and carried[NUM_EXAMPLES] > 0  # noised under DP, but there
    client_call("evaluate", apart, arrays, server_round=0)
    client_call("train", apart, arrays, server_round=1)
    both = _ledger(tmp_path / "carried")
    assert both == _ledger(tmp_path / "apart")
    again = client_call("train", cfg, arrays, server_round=1, evaluate_first=True)
    assert _ledger(tmp_path / "carried") == both  # nothing new released
    assert plain_metrics(again.content.metric_records[EVALUATION]) == carried
    assert plain_metrics(again.content.metric_records[METRICS]) == plain_metrics(first.content.metric_records[METRICS])
    # the same round without the evaluation is another question: its own release
    client_call("train", cfg, arrays, server_round=1)
    assert _ledger(tmp_path / "carried")["rounds_trained"] == both["rounds_trained"] + 1


def test_a_refused_carried_evaluation_leaves_the_training_as_a_refused_evaluate_message_would(tmp_path, monkeypatch):
    from client.privacy.ledger import PrivacyRefusal
    from client.privacy.plan import UserLevelPlan

    def refuse(*args, **kwargs):
        raise PrivacyRefusal("no metrics left in the plan")

    monkeypatch.setattr(UserLevelPlan, "release_metrics", refuse)
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 3})
    arrays = init_global_arrays(simulated_node(cfg, 0).data.split.num_ads, cfg.factors, cfg.seed)
    reply = client_call("train", cfg, arrays, server_round=1, evaluate_first=True)
    assert not reply.has_error() and EVALUATION not in reply.content.metric_records
    assert from_array_record(reply.content["arrays"]) and _ledger(tmp_path)["rounds_trained"] == 1


def test_a_carried_evaluation_is_recorded_as_the_evaluate_message_s_release(tmp_path, monkeypatch):
    """Made first, the evaluation is recorded at once as an evaluate message's release: training
    that then refuses (or fails) leaves it spent but recorded, so the same message again, or an
    evaluate message of that round (a resume with carry-evaluation off), spends nothing new."""
    from client.privacy.ledger import PrivacyRefusal
    from client.privacy.private_als import PrivateALS

    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 3})
    arrays = init_global_arrays(simulated_node(cfg, 0).data.split.num_ads, cfg.factors, cfg.seed)

    def refuse(*args, **kwargs):
        raise PrivacyRefusal("no training today")

    with monkeypatch.context() as patched:
        patched.setattr(PrivateALS, "release_update", refuse)
        patched.setattr(PrivateALS, "release_popularity", refuse)
        refused = client_call("train", cfg, arrays, server_round=1, evaluate_first=True)
        assert refused.has_error() and "no training today" in refused.error.reason
        spent = _ledger(tmp_path)
        assert client_call("train", cfg, arrays, server_round=1, evaluate_first=True).has_error()
        assert _ledger(tmp_path) == spent  # the evaluation was not released again
    separate = client_call("evaluate", cfg, arrays, server_round=0)
    assert _ledger(tmp_path) == spent
    trained = client_call("train", cfg, arrays, server_round=1, evaluate_first=True)  # training allowed again
    assert plain_metrics(trained.content.metric_records[EVALUATION]) == plain_metrics(separate.content.metric_records[METRICS])
    assert _ledger(tmp_path)["rounds_trained"] == spent["rounds_trained"] + 1


def test_a_resumed_run_gets_the_recorded_release(tmp_path):
    """The resumed server's instruction differs from the original only in its bookkeeping
    (resume, where it writes): the merchant answers it with what it released before."""
    cfg = small_run_config(tmp_path, privacy="user")
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    first = client_call("train", cfg, arrays, server_round=1)
    spent = _ledger(tmp_path)
    resumed = cfg.with_values(resume=True, output_dir=str(tmp_path / "elsewhere"), resume_accept_changes="seed")
    again = client_call("train", resumed, arrays, server_round=1)
    assert _ledger(tmp_path) == spent
    for key, value in from_array_record(first.content["arrays"]).items():
        np.testing.assert_array_equal(from_array_record(again.content["arrays"])[key], value)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_record_means_a_new_release_not_a_failed_merchant(tmp_path, caplog, damage):
    """A record cut short (a full disk, a crash of the file system) reads as no record: the
    instruction is released again, accounted as any release, instead of every later message
    of that kind failing on the file."""
    cfg = small_run_config(tmp_path, privacy="user", **{"num-rounds": 3})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    client_call("train", cfg, arrays, server_round=1)
    spent = _ledger(tmp_path)
    record = tmp_path / "out" / "state" / "partition-0" / "last_train_release.npz"
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2] if damage == "truncated" else b"")
    again = client_call("train", cfg, arrays, server_round=1)
    assert not again.has_error() and answered_round(again) == 1
    assert _ledger(tmp_path)["rounds_trained"] == spent["rounds_trained"] + 1  # released afresh, accounted
    assert "last_train_release.npz unreadable" in caplog.text
