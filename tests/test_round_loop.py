"""The server's round loop keeps only well-formed training replies and records refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.round_loop import TRAIN_USERS, RoundLog, RoundLoop
from shared.params import init_global_arrays
from shared.wire import METRICS, TrainReply, refusal

pytestmark = pytest.mark.usefixtures("as_server")

NUM_ADS, DIM = 5, 3


def _request() -> Message:
    return Message(content=RecordDict(), dst_node_id=3, message_type="train")


def _good(name: str, users: float) -> Message:
    return TrainReply(name, init_global_arrays(NUM_ADS, DIM, seed=1), users, {"train-loss": 0.4}).to_message(_request())


def test_invalid_replies_are_dropped_and_refusals_recorded():
    loop = RoundLoop(FedAvg(), grid=None, num_ads=NUM_ADS, dim=DIM)  # type: ignore[arg-type]
    wrong_shape = TrainReply("b", init_global_arrays(NUM_ADS + 1, DIM, seed=1), 10.0).to_message(_request())
    non_finite = init_global_arrays(NUM_ADS, DIM, seed=1)
    non_finite["ad_bias"][0] = np.nan
    unweighted = _good("d", 10.0)
    del unweighted.content[METRICS]["num-examples"]
    refused = refusal(_request(), "e", "privacy budget exhausted")
    replies = [_good("a", 30.0), wrong_shape, TrainReply("c", non_finite, 10.0).to_message(_request()), unweighted, refused]

    round_log = RoundLog()
    kept = loop._train_replies(1, replies, round_log)
    assert kept == [replies[0], refused]  # error replies go on to the strategy, which leaves them out
    assert round_log.clients == {"a": {"train-loss": 0.4, TRAIN_USERS: 30.0}}
    assert list(round_log.refused.values()) == ["e refused: privacy budget exhausted"]
