"""Sealed messages (shared/envelope.py): fewer objects on the wire, the same records after it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from client.client_app import app as client_app
from shared.envelope import ENVELOPE, SEAL_MAX_BYTES, is_sealed, opened, sealed
from shared.flower_internals import message_from_wire, wire_objects
from shared.params import init_global_arrays
from shared.wire import (
    ALS_COUNT,
    ALS_GRAM,
    ALS_POSITIVES,
    ALS_TARGET,
    ARRAYS,
    CLIENT_FAILED,
    CONFIG,
    EVALUATE_FIRST,
    SERVER_ROUND,
    EvaluateReply,
    PrivacyReport,
    TrainReply,
    from_array_record,
    to_array_record,
)
from tests.conftest import client_call, small_run_config

pytestmark = pytest.mark.usefixtures("as_server")


def _instruction(arrays: dict[str, np.ndarray] | None = None) -> Message:
    arrays = arrays if arrays is not None else init_global_arrays(1682, 32, seed=0)
    config = ConfigRecord({SERVER_ROUND: 4, EVALUATE_FIRST: True, "note": "x", "weights": [0.5, 1.5], "blob": b"\x00\x01"})
    return Message(RecordDict({ARRAYS: to_array_record(arrays), CONFIG: config}), dst_node_id=7, message_type="train")


def _private_als_reply(instruction: Message) -> Message:
    """A carried private ALS release as the ClientApp writes it (MovieLens-100K's shapes)."""
    rng = np.random.default_rng(0)
    statistics = {ALS_GRAM: rng.normal(size=(32, 32)), ALS_TARGET: rng.normal(size=(1682, 32)).astype(np.float32),
                  ALS_COUNT: rng.normal(size=1682).astype(np.float32), ALS_POSITIVES: rng.normal(size=1682).astype(np.float32)}
    evaluation = EvaluateReply("merchant-a", 31.5, {"ndcg10_full": 0.25}, privacy=PrivacyReport(3.0, 1.1))
    return TrainReply("merchant-a", statistics, None, {"dp-steps": 2, "train-loss": 0.5}, PrivacyReport(4.0, 1.1),
                      evaluation).to_message(instruction)


def _records(msg: Message) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    """Every record's name, kind and items in order; an Array as its dtype, shape, serialization and bytes."""
    out = []
    for name, record in msg.content.items():
        items = [(key, (v.dtype, tuple(v.shape), v.stype, v.data) if isinstance(v, Array) else (type(v).__name__, v))
                 for key, v in record.items()]
        out.append((name, type(record).__name__, items))
    return out


def _over_the_wire(msg: Message) -> tuple[int, Message]:
    objects = wire_objects(msg)
    return len(objects), message_from_wire(msg.object_id, objects)


@pytest.mark.parametrize("make", ["instruction", "reply"])
def test_a_sealed_message_is_three_objects_and_opens_to_the_same_records(make):
    instruction = _instruction()
    msg = instruction if make == "instruction" else _private_als_reply(instruction)
    plain_objects, _ = _over_the_wire(msg)
    sealed_objects, received = _over_the_wire(sealed(msg))
    # the reply: message, RecordDict, 3 records, an Array and its chunk per dtype (float64 and float32)
    assert (plain_objects, sealed_objects) == ((6, 3) if make == "instruction" else (10, 3))
    assert is_sealed(received) and list(received.content.keys()) == [ENVELOPE]
    restored = opened(received)
    assert _records(restored) == _records(msg)  # names, kinds, key order, values and their types, array bytes
    assert restored.metadata.dst_node_id == msg.metadata.dst_node_id and restored.metadata.message_type == msg.metadata.message_type
    assert restored.metadata.reply_to_message_id == msg.metadata.reply_to_message_id
    if make == "reply":
        assert TrainReply.from_message(restored).arrays.keys() == TrainReply.from_message(msg).arrays.keys()


def test_what_is_not_to_be_sealed_is_left_as_it_is():
    error = Message(Error(code=CLIENT_FAILED, reason="no"), reply_to=_instruction())
    empty = Message(RecordDict(), dst_node_id=7, message_type="query")
    large = _instruction({"ad_factors": np.zeros(SEAL_MAX_BYTES // 4 + 1, dtype=np.float32)})  # Flower's chunks bound its requests
    for msg in (error, empty, large):
        assert sealed(msg) is msg and opened(msg) is msg
    once = sealed(_instruction())
    assert sealed(once) is once


def _tampered(change) -> Message:  # type: ignore[no-untyped-def]
    msg = sealed(_instruction())
    entries = dict(msg.content.config_records[ENVELOPE])
    change(entries)
    msg.content = RecordDict({ENVELOPE: ConfigRecord(entries)})
    return msg


@pytest.mark.parametrize(("change", "says"), [
    (lambda e: e.pop("0/0/dtype"), "no entry '0/0/dtype'"),
    (lambda e: e.update({"extra": 1}), "entries no record names"),
    (lambda e: e.update({"0/0": "not bytes"}), "is a str"),
    (lambda e: e.update({"0/0/shape": "2,x"}), "has the shape"),
    (lambda e: e.update({"records": ["aarrays", "aarrays"]}), "twice"),
    (lambda e: e.update({"records": ["zarrays", "cconfig"]}), "not a kind and a name"),
    (lambda e: e.update({"1": ["server-round", "server-round"]}), "not distinct"),
    (lambda e: e.update({"records": ["aarrays", "mconfig"], "1/2": "text"}), "cannot be rebuilt"),
])
def test_a_malformed_envelope_is_refused_with_its_reason(change, says):
    with pytest.raises(ValueError, match=says):
        opened(_tampered(change))
    beside = sealed(_instruction())
    beside.content[CONFIG] = ConfigRecord({SERVER_ROUND: 1})
    with pytest.raises(ValueError, match="only its"):
        opened(beside)


def test_a_merchant_answers_a_sealed_message_sealed_and_with_the_same_release(tmp_path):
    """The ClientApp's outermost mod opens the message for the handlers and seals their reply;
    the release is the one the same message unsealed gets (fresh state both times: same seed)."""
    arrays = init_global_arrays(200, 8, seed=7)
    replies = {}
    for seal in (False, True):
        cfg = small_run_config(tmp_path / str(seal), **{"mf-solver": "als", "factors": 8})
        replies[seal] = client_call("train", cfg, arrays, seal=seal)
    assert not is_sealed(replies[False]) and is_sealed(replies[True])
    plain, received = replies[False], opened(replies[True])
    assert _records(received) == _records(plain)
    got, want = from_array_record(received.content[ARRAYS]), from_array_record(plain.content[ARRAYS])
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert dict(received.content.metric_records["metrics"]) == dict(plain.content.metric_records["metrics"])


def test_a_merchant_answers_an_envelope_it_cannot_open_with_a_bare_failure(tmp_path, caplog):
    cfg = small_run_config(tmp_path)
    msg = _tampered(lambda e: e.pop("0/0"))
    context = Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config=cfg.to_flower())
    with caplog.at_level("WARNING", logger="flwr.fedads"):
        reply = client_app(msg, context)
    assert reply.has_error() and reply.error.code == CLIENT_FAILED and "0/0" not in reply.error.reason
    assert "cannot open a message" in caplog.text and "no entry '0/0'" in caplog.text


def test_metric_and_config_values_keep_their_types_and_any_record_name_its_record():
    msg = Message(RecordDict({"": MetricRecord({"i": 3, "f": 3.0, "li": [1, 2], "lf": [0.5]}),
                              "c": ConfigRecord({"b": True, "i": 1, "s": "", "lb": [b"a", b""]})}), dst_node_id=7, message_type="train")
    _, received = _over_the_wire(sealed(msg))
    assert _records(opened(received)) == _records(msg)
    assert [type(v) for v in opened(received).content["c"].values()] == [bool, int, str, list]
