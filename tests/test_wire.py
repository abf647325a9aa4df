"""The wire contract (shared/wire.py): both sides read and write the same records and keys."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from shared.als import ALSSettings
from shared.wire import (
    ALS_COUNT,
    ALS_GRAM,
    ALS_POSITIVES,
    ALS_TARGET,
    ALS_USER_GRAM,
    ARRAYS,
    CLIENT,
    CLIENT_NAME,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY_REFUSED,
    SERVER_ROUND,
    EvaluateReply,
    PrivacyReport,
    TrainReply,
    read_instruction,
    refusal,
    to_array_record,
)

pytestmark = pytest.mark.usefixtures("as_server")


def _request(kind: str = "train") -> Message:
    return Message(content=RecordDict(), dst_node_id=7, message_type=kind)


def test_train_reply_round_trips_through_a_message():
    arrays = {"ad_factors": np.arange(6, dtype=np.float32).reshape(3, 2), "ad_bias": np.zeros(3, dtype=np.float32)}
    sent = TrainReply("merchant-a", arrays, 120.0, {"train-loss": 0.5}, PrivacyReport(1.5, 0.8))
    msg = sent.to_message(_request())
    assert set(msg.content.array_records) == {ARRAYS} and set(msg.content.metric_records) == {METRICS}
    assert dict(msg.content[CLIENT]) == {CLIENT_NAME: "merchant-a"}
    assert dict(msg.content[METRICS]) == {NUM_EXAMPLES: 120.0, "train-loss": 0.5, "dp-epsilon": 1.5, "dp-noise-multiplier": 0.8}
    received = TrainReply.from_message(msg)
    assert (received.client, received.num_examples, received.metrics, received.privacy) == ("merchant-a", 120.0, {"train-loss": 0.5},
                                                                                              PrivacyReport(1.5, 0.8))
    for key in arrays:
        np.testing.assert_array_equal(received.arrays[key], arrays[key])


def test_evaluate_reply_round_trips_with_its_merchant_popularity_floor():
    sent = EvaluateReply("m", 40.0, {"hr10_sampled": 0.5}, {"hr10_sampled": 0.3})
    metrics = dict(sent.to_message(_request("evaluate")).content[METRICS])
    assert metrics == {"hr10_sampled": 0.5, "merchant-pop-hr10_sampled": 0.3, NUM_EXAMPLES: 40.0}
    received = EvaluateReply.from_message(sent.to_message(_request("evaluate")))
    assert received == sent


def test_a_refusal_is_an_error_reply_with_the_reason():
    msg = refusal(_request(), "merchant-a", "privacy budget exhausted")
    assert msg.has_error() and msg.error.code == PRIVACY_REFUSED
    assert msg.error.reason == "merchant-a refused: privacy budget exhausted"


def test_flowers_fedavg_sends_what_the_clients_read():
    """The server's instructions come from Flower's FedAvg, configured with the contract's names."""

    class OneNodeGrid:
        def get_node_ids(self) -> list[int]:
            return [7]

    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, arrayrecord_key=ARRAYS, configrecord_key=CONFIG)
    arrays = {"ad_factors": np.ones((3, 2), dtype=np.float32), "ad_bias": np.zeros(3, dtype=np.float32)}
    (msg,) = strategy.configure_train(4, to_array_record(arrays), ConfigRecord(), OneNodeGrid())  # type: ignore[arg-type]
    received, server_round = read_instruction(msg)
    assert server_round == 4 and set(received) == set(arrays)
    assert SERVER_ROUND in msg.content[CONFIG]


def test_als_statistic_keys_are_the_contracts():
    shared = ALSSettings(alpha0=0.5, user_l2=1.0, ad_l2=1.0, max_rows=5, user_clip=0.3, gram_mode="shared")
    per_ad = ALSSettings(alpha0=0.5, user_l2=1.0, ad_l2=1.0, max_rows=5, user_clip=0.3, gram_mode="per-ad")
    # under DP (max_rows set) the positive counts travel alone, in the popularity releases
    assert set(shared.stat_shapes(10, 4)) == {ALS_COUNT, ALS_TARGET, ALS_USER_GRAM}
    assert set(per_ad.stat_shapes(10, 4)) == {ALS_GRAM, ALS_TARGET, ALS_USER_GRAM}
    assert set(shared.stat_shapes(10, 4, "popularity")) == set(per_ad.stat_shapes(10, 4, "popularity")) == {ALS_POSITIVES}
    assert set(shared.noise_stds(1.0)) == set(shared.stat_shapes(10, 4))
    assert set(shared.noise_stds(1.0, "popularity")) == {ALS_POSITIVES}
    # exact statistics hold everything in every round
    exact = ALSSettings(alpha0=0.5, user_l2=1.0, ad_l2=1.0, max_rows=None, user_clip=0.3, gram_mode="shared", clip=False)
    assert set(exact.stat_shapes(10, 4)) == {ALS_COUNT, ALS_TARGET, ALS_POSITIVES, ALS_USER_GRAM}
    with pytest.raises(ValueError, match="one of"):
        shared.stat_shapes(10, 4, "everything")
