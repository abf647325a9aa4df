"""What a client sends to the server: the ad parameters and aggregates, nothing keyed by a user.

The ClientApp is called in-process exactly as Flower calls it; the reply is serialized with
Flower's own wire encoding and the bytes are searched for every user id and every user-factor
row of the shard.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.node_state import NodeState
from shared.als import ALSSettings
from shared.flower_internals import wire_bytes as _wire_bytes
from shared.params import GLOBAL_KEYS, init_global_arrays
from shared.wire import CLIENT_FAILED, from_array_record, to_array_record
from tests.conftest import client_call as _call
from tests.conftest import simulated_node, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")

WITHOUT_DP = {"dp-epsilon", "dp-noise-multiplier"}  # every reply says what it costs: here, epsilon infinite
ALLOWED_METRICS = {
    "train": {"num-examples", "train-loss", "train-rows"} | WITHOUT_DP,
    "train-als": WITHOUT_DP,  # the server sums statistics: no weight, no count
    "evaluate": {
        "num-examples", "hr10_sampled", "ndcg10_sampled", "hr10_full", "ndcg10_full", "recall20_full", "auc_full",
        "merchant-pop-hr10_sampled", "merchant-pop-ndcg10_sampled", "merchant-pop-hr10_full", "merchant-pop-ndcg10_full",
        "merchant-pop-recall20_full", "merchant-pop-auc_full",
    } | WITHOUT_DP,
}


@pytest.mark.parametrize("solver", ["sgd", "als"])
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_reply_carries_no_user_id_and_no_user_factor(tmp_path, kind, solver):
    cfg = small_run_config(tmp_path, **{"mf-solver": solver})
    node = simulated_node(cfg, 0)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)

    reply = _call(kind, cfg, arrays)
    assert not reply.has_error()
    content = reply.content

    # exactly what the protocol allows
    assert set(content.metric_records) == {"metrics"}
    assert set(content["metrics"]) == ALLOWED_METRICS[f"{kind}-als" if kind == "train" and solver == "als" else kind]
    assert content["metrics"]["dp-epsilon"] == float("inf")  # an exact release: no DP claim
    assert dict(content["client"]) == {"name": node.name, "server-round": 1}  # who answers, and which round
    if kind == "train" and solver == "als":  # sums over users of the ALS statistics, per ad
        sent = from_array_record(content["arrays"])
        settings = ALSSettings.from_config(cfg)
        assert {k: v.shape for k, v in sent.items()} == settings.stat_shapes(node.data.split.num_ads, cfg.factors)
    elif kind == "train":
        sent = from_array_record(content["arrays"])
        assert set(sent) == set(GLOBAL_KEYS)
        assert sent["ad_factors"].shape == arrays["ad_factors"].shape
        assert sent["ad_bias"].shape == arrays["ad_bias"].shape
        assert not np.allclose(sent["ad_factors"], arrays["ad_factors"])  # it did train
    else:
        assert not content.array_records

    # the user factors exist on the merchant's disk ...
    state = NodeState(tmp_path / "out" / "state" / "partition-0")
    factors = state.load_user_factors(node.data.user_ids, cfg.factors)
    assert factors is not None and np.abs(factors).sum() > 0
    # ... and none of them, nor any user id, is in the bytes that leave
    wire = _wire_bytes(reply)
    assert len(wire) > 0
    # Without DP, an ALS statistic of an ad that one user alone interacted with *is* that user's
    # factor (as SGD's update of that ad is a function of it): what protects it is privacy =
    # "user", whose noised statistics tests/test_privacy.py searches the same way
    exposed = _sole_users_of_some_ad(node) if kind == "train" and solver == "als" else set()
    for index, (user_id, row) in enumerate(zip(node.data.user_ids, factors)):
        assert str(user_id).encode() not in wire
        if index not in exposed:
            assert row.astype(np.float32).tobytes() not in wire
            assert row.astype(np.float64).tobytes() not in wire


def _sole_users_of_some_ad(node) -> set[int]:
    rows = node.data.rows
    users_of_ad: dict[int, set[int]] = {}
    positive = rows.label > 0  # only positives enter the target statistic
    for user, ad in zip(rows.user[positive].tolist(), rows.ad[positive].tolist()):
        users_of_ad.setdefault(ad, set()).add(user)
    return {next(iter(users)) for users in users_of_ad.values() if len(users) == 1}


@pytest.mark.parametrize("solver", ["sgd", "als"])
def test_reply_is_deterministic_for_a_seed(tmp_path, solver):
    cfg = small_run_config(tmp_path, **{"mf-solver": solver})
    node = simulated_node(cfg, 1)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    first = from_array_record(_call("train", cfg, arrays, partition=1).content["arrays"])
    state = tmp_path / "out" / "state" / "partition-1"
    (state / "user_factors.npz").unlink()
    (state / "last_train_release.npz").unlink()  # else the same instruction gets the recorded release
    second = from_array_record(_call("train", cfg, arrays, partition=1).content["arrays"])
    assert set(first) == set(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_client_rejects_parameters_of_the_wrong_shape(tmp_path, caplog):
    """It answers with a bare failure: why (here, the shapes) stays in the merchant's own log, as
    any failure's text might quote its data."""
    cfg = small_run_config(tmp_path)
    arrays = init_global_arrays(cfg.synthetic_ads + 1, cfg.factors, cfg.seed)
    with caplog.at_level("ERROR", logger="flwr.fedads"):
        reply = _call("train", cfg, arrays)
    assert reply.has_error() and reply.error.code == CLIENT_FAILED and "shape" not in reply.error.reason
    assert "could not answer" in reply.error.reason and "shape" in caplog.text


def test_the_wire_search_finds_a_leak_when_there_is_one(tmp_path):
    """Control for the test above: the same search does catch a user id or factor row."""
    cfg = small_run_config(tmp_path)
    node = simulated_node(cfg, 2)
    arrays = init_global_arrays(node.data.split.num_ads, cfg.factors, cfg.seed)
    reply = _call("train", cfg, arrays, partition=2)
    factors = NodeState(tmp_path / "out" / "state" / "partition-2").load_user_factors(node.data.user_ids, cfg.factors)
    leaky = Message(
        content=RecordDict({
            **{k: v for k, v in reply.content.items()},
            "leak": ConfigRecord({"user": str(node.data.user_ids[3])}),
            "leak-factors": to_array_record({"p": factors[5:6]}),
        }),
        reply_to=Message(content=RecordDict(), dst_node_id=12, message_type="train"),
    )
    wire = _wire_bytes(leaky)
    assert str(node.data.user_ids[3]).encode() in wire
    assert factors[5].astype(np.float32).tobytes() in wire
