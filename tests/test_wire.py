"""The wire contract (shared/wire.py): both sides read and write the same records and keys."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
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
    array_names,
    from_array_record,
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


def _objects(obj: object) -> int:
    """How many objects Flower moves for `obj` (a message and everything under it), one request each per hop."""
    return 1 + sum(_objects(child) for child in (getattr(obj, "children", None) or {}).values())


def test_an_array_record_travels_packed_one_array_per_dtype():
    arrays = {
        "ad_factors": np.arange(12, dtype=np.float32).reshape(4, 3), "ad_bias": np.linspace(0, 1, 4, dtype=np.float32),
        "als_ads": np.array([0, 2**24 + 1, 10**7 - 1], dtype=np.int64), "half": np.float16([1.5, -2.0]),
        "scalar": np.array(3.25), "empty": np.zeros((0, 3), dtype=np.float32),
    }
    record = to_array_record(arrays)
    assert sorted(record) == ["packed.<f2:half=2", "packed.<f4:ad_bias=4;ad_factors=4x3;empty=0x3", "packed.<f8:scalar=",
                              "packed.<i8:als_ads=3"]
    assert array_names(record) == set(arrays)
    received = from_array_record(record)
    assert set(received) == set(arrays)
    for key, value in arrays.items():
        assert received[key].dtype == value.dtype and received[key].shape == value.shape
        np.testing.assert_array_equal(received[key], value)
    # the same arrays in another order pack under the same keys (Flower's FedAvg compares the replies' keys)
    assert list(to_array_record(dict(reversed(list(arrays.items()))))) == list(record)


def test_packing_cuts_the_objects_of_a_model_message_and_of_a_private_release():
    model = {"ad_factors": np.ones((50, 8), dtype=np.float32), "ad_bias": np.zeros(50, dtype=np.float32)}
    plain = ArrayRecord({key: Array(value) for key, value in model.items()})
    sent = Message(content=RecordDict({ARRAYS: to_array_record(model), CONFIG: ConfigRecord({SERVER_ROUND: 1})}),
                   dst_node_id=7, message_type="train")
    before = Message(content=RecordDict({ARRAYS: plain, CONFIG: ConfigRecord({SERVER_ROUND: 1})}), dst_node_id=7, message_type="train")
    assert (_objects(before), _objects(sent)) == (8, 6)
    release = {ALS_COUNT: np.ones(50, np.float16), ALS_TARGET: np.ones((50, 8), np.float16), ALS_USER_GRAM: np.eye(8, dtype=np.float32)}
    reply = TrainReply("m", release, None, {}, PrivacyReport(1.0, 2.0)).to_message(_request())
    assert _objects(reply) == 9  # message, records (arrays, metrics, client), a float16 and a float32 array of one chunk each


@pytest.mark.parametrize(("key", "flat", "problem"), [
    ("packed.<f4:b=2;a=2", np.zeros(4, np.float32), "canonical"),  # names out of order
    ("packed.<f4:a=2;a=2", np.zeros(4, np.float32), "canonical"),  # a name twice
    ("packed.<f4:a=3", np.zeros(4, np.float32), "hold 3 values"),
    ("packed.<f8:a=4", np.zeros(4, np.float32), "does not match"),  # the key's dtype is not the array's
    ("packed.<f4:a=2x2", np.zeros((2, 2), np.float32), "does not match"),  # not flat
    ("packed.<f4:a=-1", np.zeros(4, np.float32), "malformed"),
    ("packed.<f4:a=two", np.zeros(4, np.float32), "malformed"),
    ("packed.<f4:a b=4", np.zeros(4, np.float32), "malformed"),
    ("packed.<f4", np.zeros(4, np.float32), "does not match"),
    ("packed.<f4:a=04", np.zeros(4, np.float32), "canonical"),
])
def test_a_malformed_packed_array_is_refused(key: str, flat: np.ndarray, problem: str):
    with pytest.raises(ValueError, match=problem):
        from_array_record(ArrayRecord({key: Array(flat)}))


def test_a_name_packed_and_plain_at_once_is_refused():
    record = ArrayRecord({"packed.<f4:a=2": Array(np.zeros(2, np.float32)), "a": Array(np.zeros(2, np.float32))})
    with pytest.raises(ValueError, match="twice"):
        from_array_record(record)
    with pytest.raises(ValueError, match="must not start"):
        to_array_record({"packed.<f4:a=2": np.zeros(2, np.float32)})


def test_flowers_fedavg_of_packed_replies_is_the_average_of_each_array():
    rng = np.random.default_rng(0)
    replies = [{"ad_factors": rng.standard_normal((6, 3)).astype(np.float32), "ad_bias": rng.standard_normal(6).astype(np.float32)}
               for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    messages = [TrainReply(f"m{i}", arrays, weight).to_message(_request()) for i, (arrays, weight) in enumerate(zip(replies, weights))]
    aggregated, _ = FedAvg(arrayrecord_key=ARRAYS, configrecord_key=CONFIG).aggregate_train(1, messages)
    assert aggregated is not None
    averaged = from_array_record(aggregated)
    for key in ("ad_factors", "ad_bias"):
        expected = sum(w * r[key] for w, r in zip(weights, replies)) / sum(weights)
        np.testing.assert_allclose(averaged[key], expected, rtol=1e-6, atol=1e-6)
