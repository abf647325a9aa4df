"""The server's round loop: it keeps only well-formed replies to the current round, one per
node, records who was asked, who replied and who failed (by name, in one line), retries a round
short of its quorum and then stops short, saying why."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg

from server.round_loop import (
    EVALUATED_WITH,
    EVALUATION_PENDING,
    TEST_USERS,
    TRAIN_USERS,
    RoundLog,
    RoundLoop,
    awaiting_evaluation,
    one_line,
)
from shared.envelope import ENVELOPE, is_sealed, opened, sealed
from shared.params import init_global_arrays, mf_shapes
from shared.wire import (
    ARRAYS,
    CLIENT,
    CONFIG,
    METRICS,
    SERVER_ROUND,
    Arrays,
    EvaluateReply,
    PrivacyReport,
    TrainReply,
    answered_round,
    evaluates_first,
    from_array_record,
    refusal,
    split_evaluation,
    to_array_record,
)

pytestmark = pytest.mark.usefixtures("as_server")

NUM_ADS, DIM = 5, 3


def _request(node: int = 3, server_round: int = 1) -> Message:
    content = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: server_round})})
    return Message(content=content, dst_node_id=node, message_type="train")


def _good(name: str, users: float, node: int = 3, server_round: int = 1) -> Message:
    reply = TrainReply(name, init_global_arrays(NUM_ADS, DIM, seed=1), users, {"train-loss": 0.4}).to_message(_request(node, server_round))
    assert reply.metadata.src_node_id == node  # a reply comes from the node its request went to
    return reply


def test_invalid_replies_are_dropped_and_refusals_recorded():
    loop = RoundLoop(FedAvg(), grid=None, shapes=mf_shapes(NUM_ADS, DIM))  # type: ignore[arg-type]
    wrong_shape = TrainReply("b", init_global_arrays(NUM_ADS + 1, DIM, seed=1), 10.0).to_message(_request(4))
    non_finite = init_global_arrays(NUM_ADS, DIM, seed=1)
    non_finite["ad_bias"][0] = np.nan
    unweighted = _good("d", 10.0, node=6)
    del unweighted.content[METRICS]["num-examples"]
    refused = refusal(_request(7), "e", "privacy budget exhausted")
    replies = [_good("a", 30.0), wrong_shape, TrainReply("c", non_finite, 10.0).to_message(_request(5)), unweighted, refused]

    round_log = RoundLog()
    kept = loop._train_replies(1, replies, round_log)
    assert kept == [replies[0], refused]  # error replies go on to the strategy, which leaves them out
    assert round_log.clients == {"a": {"train-loss": 0.4, TRAIN_USERS: 30.0}}
    assert list(round_log.refused.values()) == ["e refused: privacy budget exhausted"]
    assert set(round_log.failed) == {"b", "c", "d"} and round_log.replied == ["a"]
    assert all(reason.startswith("reply dropped: ") for reason in round_log.failed.values())


def test_a_reply_that_would_pack_apart_or_cannot_unpack_is_dropped_and_fedavg_aggregates_the_rest():
    """Records travel packed by dtype (shared/wire.py): a float64 reply would carry other keys than
    the float32 ones, and Flower's FedAvg aggregates nothing when the replies' keys differ."""
    loop = RoundLoop(FedAvg(), grid=None, shapes=mf_shapes(NUM_ADS, DIM))  # type: ignore[arg-type]
    as_float64 = {key: value.astype(np.float64) for key, value in init_global_arrays(NUM_ADS, DIM, seed=1).items()}
    wide = TrainReply("b", as_float64, 10.0).to_message(_request(4))
    malformed = _good("c", 10.0, node=5)
    (key,) = malformed.content[ARRAYS].keys()
    flat = malformed.content[ARRAYS].pop(key)
    malformed.content[ARRAYS][key.replace(f"ad_bias={NUM_ADS}", f"ad_bias={NUM_ADS + 1}")] = flat
    # the right arrays, but under other keys than the wire's: plain, split in two, an extra empty entry
    arrays = init_global_arrays(NUM_ADS, DIM, seed=1)
    plain, split, padded = (_good(name, 10.0, node=node) for name, node in (("e", 7), ("f", 8), ("g", 9)))
    plain.content[ARRAYS] = ArrayRecord({name: Array(value) for name, value in arrays.items()})
    split.content[ARRAYS] = ArrayRecord({f"packed.<f4:{name}={'x'.join(map(str, value.shape))}": Array(value.ravel())
                                         for name, value in arrays.items()})
    padded.content[ARRAYS]["packed.<f8:"] = Array(np.zeros(0))
    replies = [_good("a", 30.0), wide, malformed, _good("d", 10.0, node=6), plain, split, padded]
    round_log = RoundLog()
    kept = loop._train_replies(1, replies, round_log)
    assert kept == [replies[0], replies[3]]
    assert "float32" in round_log.failed["b"] and "hold 21 values" in round_log.failed["c"]
    assert all("not packed as the wire packs them" in round_log.failed[name] for name in "efg")
    aggregated, _ = FedAvg().aggregate_train(1, kept)
    assert aggregated is not None
    np.testing.assert_allclose(from_array_record(aggregated)["ad_factors"], init_global_arrays(NUM_ADS, DIM, seed=1)["ad_factors"], rtol=1e-6)


def test_stale_and_duplicate_replies_are_dropped():
    loop = RoundLoop(FedAvg(), grid=None, shapes=mf_shapes(NUM_ADS, DIM))  # type: ignore[arg-type]
    current, duplicate = _good("a", 30.0, node=3, server_round=2), _good("a", 99.0, node=3, server_round=2)
    stale = _good("b", 10.0, node=4, server_round=1)
    round_log = RoundLog()
    assert loop._train_replies(2, [current, stale, duplicate], round_log) == [current]
    assert round_log.failed == {"b": "reply dropped: a stale reply: it answers round 1, not 2"}
    assert round_log.clients["a"][TRAIN_USERS] == 30.0  # the first reply, not the duplicate


@pytest.mark.parametrize(("stype", "data", "says"), [("torch", b"x", "cannot be read: TypeError"), ("numpy.ndarray", b"", "cannot be read: EOFError"),
                                                     ("numpy.ndarray", b"\x93NUMPY garbage", "format version")])
def test_a_reply_whose_array_cannot_be_read_is_dropped_not_a_crash(stype, data, says):
    """A hostile or broken merchant's array (a serialization numpy cannot read) is screened out."""
    loop = RoundLoop(FedAvg(), grid=None, shapes=mf_shapes(NUM_ADS, DIM))  # type: ignore[arg-type]
    good, bad = _good("a", 30.0, node=3), _good("b", 10.0, node=4)
    key = next(iter(bad.content[ARRAYS].keys()))
    bad.content[ARRAYS] = ArrayRecord({key: Array(dtype="float32", shape=(1,), stype=stype, data=data)})
    round_log = RoundLog()
    assert loop._train_replies(1, [good, bad], round_log) == [good]
    assert round_log.failed["b"].startswith("reply dropped: ") and says in round_log.failed["b"]


def test_a_carried_evaluation_without_the_client_record_is_dropped_not_a_crash():
    reply = TrainReply("a", init_global_arrays(NUM_ADS, DIM, seed=1), 10.0, evaluation=EvaluateReply("a", 5.0, {"x": 1.0})).to_message(_request(3))
    del reply.content[CLIENT]
    trained, evaluated = split_evaluation(reply)
    assert evaluated is not None and answered_round(trained) is None and answered_round(evaluated) is None


def test_a_raw_traceback_becomes_one_readable_line():
    traceback = ("\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=127.0.0.1)\n"
                 "  File \"x.py\", line 3, in run\n    raise ValueError('boom')\nValueError: boom\n")
    assert one_line(traceback) == "ValueError: boom"
    assert one_line("") == "no reason given" and len(one_line("x" * 1000)) == 300


class _Strategy(FedAvg):
    """FedAvg that asks nodes 1..3 (no Grid needed to sample them)."""

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:  # type: ignore[no-untyped-def, override]
        return [_request(node, server_round) for node in (1, 2, 3)]

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:  # type: ignore[no-untyped-def, override]
        return []


class _Grid:
    """Answers each exchange with the next scripted list of replies."""

    def __init__(self, script: list[list[Message]]) -> None:
        self.script: Iterator[list[Message]] = iter(script)
        self.exchanges = 0

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        if not list(messages):  # the (empty) evaluation
            return []
        self.exchanges += 1
        return next(self.script, [])


def _failed(node: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=_request(node))


def _run(grid: _Grid, min_replies: int, retries: int):  # type: ignore[no-untyped-def]
    loop = RoundLoop(_Strategy(), grid, mf_shapes(NUM_ADS, DIM), timeout=5, min_replies=min_replies, retries=retries)  # type: ignore[arg-type]
    records: list[dict] = []
    outcome = loop.run(to_array_record(init_global_arrays(NUM_ADS, DIM, seed=0)), 1, 2, ConfigRecord(), ConfigRecord(),
                       on_round_end=lambda r, arrays, record: records.append(record))
    return outcome, records


def test_a_round_short_of_its_quorum_is_retried_then_the_run_stops_short():
    one_of_three = [_good("a", 10.0, node=1), _failed(2, "\x1b[31mTraceback\nMemoryError: oom\x1b[0m")]  # node 3: no reply
    grid = _Grid([one_of_three, one_of_three])
    outcome, records = _run(grid, min_replies=2, retries=1)
    assert grid.exchanges == 2 and records == []  # asked twice, nothing aggregated
    assert outcome.last_round == 0 and "1 valid training replies of 3 asked, below the quorum of 2" in outcome.short_reason
    participants = outcome.failed_round["participants"]
    assert participants["asked"] == ["a", "node-2", "node-3"] and participants["replied"] == ["a"]
    assert participants["failed"] == {"node-2": "MemoryError: oom", "node-3": "no reply within 5 s"}


def test_a_retry_that_reaches_the_quorum_goes_on_and_the_record_names_everyone():
    full = [_good("a", 10.0, node=1, server_round=1), _good("b", 10.0, node=2), _good("c", 10.0, node=3)]
    second = [_good(n, 10.0, node=i + 1, server_round=2) for i, n in enumerate("abc")]
    grid = _Grid([[full[0]], full, second[:2]])
    outcome, records = _run(grid, min_replies=2, retries=1)
    assert outcome.short_reason is None and outcome.last_round == 2 and grid.exchanges == 3
    assert records[0]["participants"]["replied"] == ["a", "b", "c"]
    assert records[1]["participants"] == {"asked": ["a", "b", "c"], "replied": ["a", "b"], "refused": {},
                                          "failed": {"c": "no reply within 5 s"}}


def test_a_reply_whose_envelope_cannot_be_opened_is_recorded_as_failed_not_as_silent():
    broken = sealed(_good("b", 10.0, node=2))
    del broken.content[ENVELOPE]["records"]
    replies = [sealed(_good("a", 10.0, node=1)), broken, _good("c", 10.0, node=3)]  # sealed or not, both are read
    outcome, records = _run(_Grid([replies]), min_replies=2, retries=0)
    assert records[0]["participants"]["replied"] == ["a", "c"]
    assert records[0]["participants"]["failed"] == {"node-2": "reply dropped: the envelope has no entry 'records'"}


def test_refusals_are_not_retried():
    refusals = [refusal(_request(n), name, "privacy budget exhausted") for n, name in ((1, "a"), (2, "b"), (3, "c"))]
    grid = _Grid([refusals])
    outcome, _ = _run(grid, min_replies=1, retries=3)
    assert grid.exchanges == 1 and outcome.last_round == 0
    assert set(outcome.failed_round["participants"]["refused"]) == {"a", "b", "c"}  # named by their refusals


def test_replies_flowers_fedavg_refuses_leave_the_model_unchanged_and_the_run_goes_on():
    """Flower's FedAvg raises InconsistentMessageReplies (an exit of the ServerApp) when the
    replies' metric records hold different keys: one merchant's extra metric must not end the run."""
    odd = _good("b", 10.0, node=2)
    odd.content[METRICS]["an-extra-metric"] = 1.0
    first = [_good("a", 10.0, node=1), odd]
    second = [_good(n, 10.0, node=i + 1, server_round=2) for i, n in enumerate("ab")]
    outcome, records = _run(_Grid([first, second]), min_replies=1, retries=0)
    assert outcome.short_reason is None and outcome.last_round == 2 and len(records) == 2
    assert records[0]["train"] == {}  # round 1 aggregated nothing


class _EvaluatingStrategy(FedAvg):
    """FedAvg over nodes 1..3 that passes the loop's config on, as Flower's FedAvg does."""

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:  # type: ignore[no-untyped-def, override]
        return [_instruction("train", node, server_round, arrays, config) for node in (1, 2, 3)]

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:  # type: ignore[no-untyped-def, override]
        return [_instruction("evaluate", node, server_round, arrays, config) for node in (1, 2, 3)]


def _instruction(kind: str, node: int, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> Message:
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**dict(config), SERVER_ROUND: server_round})})
    return Message(content=content, dst_node_id=node, message_type=kind)


class _MerchantsGrid:
    """Three merchants answering as the ClientApp does: a training reply (with the evaluation of
    the model it carries when asked, EVALUATE_FIRST), an evaluate reply; "c" refuses from round
    `c_refuses_from` on. Each merchant's metric is the model's first factor, so a record's
    evaluation names the model it evaluated."""

    def __init__(self, c_refuses_from: int = 99, silent_in: tuple[int, ...] = ()) -> None:
        self.exchanges: list[str] = []
        self.c_refuses_from = c_refuses_from
        self.silent_in = silent_in  # rounds whose training messages nobody answers

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        sent = list(messages)
        assert all(is_sealed(msg) for msg in sent)  # the loop seals what it sends; a merchant opens it (client_app.envelope)
        messages = [opened(msg) for msg in sent]
        self.exchanges.append(messages[0].metadata.message_type + ("+evaluation" if evaluates_first(messages[0]) else ""))
        replies: list[Message] = []
        for msg in messages:
            name, server_round = "abc"[msg.metadata.dst_node_id - 1], msg.content[CONFIG][SERVER_ROUND]
            if msg.metadata.message_type == "train" and server_round in self.silent_in:
                continue
            if name == "c" and server_round >= self.c_refuses_from:
                replies.append(refusal(msg, name, "privacy budget exhausted"))
                continue
            arrays = from_array_record(msg.content[ARRAYS])
            # epsilon after a round's training: the round; after its model's evaluation, half more
            model_round = server_round if msg.metadata.message_type == "evaluate" else server_round - 1
            evaluation = EvaluateReply(name, 10.0, {"ndcg": float(arrays["ad_factors"][0, 0])}, privacy=PrivacyReport(model_round + 0.5, 1.0))
            if msg.metadata.message_type == "evaluate":
                replies.append(evaluation.to_message(msg))
                continue
            trained = {key: value + 1.0 for key, value in arrays.items()}  # each round's model: one more than the last
            carried = evaluation if evaluates_first(msg) else None
            replies.append(TrainReply(name, trained, 10.0, {"train-loss": 0.1}, privacy=PrivacyReport(float(server_round), 1.0),
                                      evaluation=carried).to_message(msg))
        return [sealed(reply) for reply in replies]


def _carried_run(grid: _MerchantsGrid, carry: bool, pending: dict | None = None, first: int = 1):  # type: ignore[no-untyped-def]
    loop = RoundLoop(_EvaluatingStrategy(), grid, mf_shapes(NUM_ADS, DIM), timeout=5, carry_evaluation=carry, min_replies=2)  # type: ignore[arg-type]
    ended: list[tuple[int, bool]] = []  # (round, its evaluation was pending) at each checkpoint
    evaluated: list[int] = []
    records: list[dict] = []

    def on_round_end(server_round: int, arrays: Arrays, record: dict) -> None:
        ended.append((server_round, EVALUATION_PENDING in record))
        records.append(record)

    start = to_array_record(init_global_arrays(NUM_ADS, DIM, seed=0))
    outcome = loop.run(start, first, 2, ConfigRecord(), ConfigRecord(), on_round_end=on_round_end, pending=pending,
                       on_evaluated=lambda record: evaluated.append(record["round"]))
    return outcome, records, ended, evaluated


def test_a_carried_evaluation_is_the_one_an_exchange_of_its_own_gives_in_one_exchange_per_round():
    first = float(init_global_arrays(NUM_ADS, DIM, seed=0)["ad_factors"][0, 0])
    apart = _MerchantsGrid()
    _, apart_records, apart_ended, _ = _carried_run(apart, carry=False)
    assert apart.exchanges == ["train", "evaluate", "train", "evaluate"] and apart_ended == [(1, False), (2, False)]

    grid = _MerchantsGrid()
    initial = {"round": 0, "train": {}, "evaluate": {}, "clients": {}, "participants": RoundLog().participants(), EVALUATION_PENDING: True}
    outcome, records, ended, evaluated = _carried_run(grid, carry=True, pending=initial)
    # round 1's messages carry round 0's evaluation, round 2's round 1's; the last model on its own
    assert grid.exchanges == ["train+evaluation", "train+evaluation", "evaluate"] and outcome.short_reason is None
    assert ended == [(1, True), (2, True)] and evaluated == [0, 1, 2]
    assert initial["evaluate"]["ndcg"] == pytest.approx(first) and initial[EVALUATED_WITH] == 1
    for ours, theirs in zip(records, apart_records, strict=True):
        assert ours["evaluate"] == pytest.approx(theirs["evaluate"]) and ours["train"] == theirs["train"]
        assert ours["clients"] == theirs["clients"] and ours["participants"] == theirs["participants"]
        assert EVALUATION_PENDING not in ours
    assert records[0][EVALUATED_WITH] == 2 and EVALUATED_WITH not in records[1]  # the last: an exchange of its own
    assert "train-loss" in records[0]["train"] and "ndcg" not in records[0]["train"]  # the strategy's training replies hold no evaluation


def test_a_merchant_that_refuses_a_carrying_message_is_named_in_the_evaluation_it_did_not_send():
    grid = _MerchantsGrid(c_refuses_from=2)
    initial = {"round": 0, "train": {}, "evaluate": {}, "clients": {}, "participants": RoundLog().participants(), EVALUATION_PENDING: True}
    _, records, _, _ = _carried_run(grid, carry=True, pending=initial)
    privacy = {"dp-epsilon", "dp-noise-multiplier"}
    assert set(records[0]["clients"]["a"]) == {"train-loss", TRAIN_USERS, "ndcg", TEST_USERS} | privacy
    assert set(records[0]["clients"]["c"]) == {"train-loss", TRAIN_USERS} | privacy  # trained in round 1, refused round 2's message
    assert records[0]["participants"]["failed"] == {"c (evaluate)": "c refused: privacy budget exhausted"}
    assert records[1]["participants"]["refused"] == {"c": "c refused: privacy budget exhausted"}


def test_a_pending_evaluation_without_carrying_gets_an_exchange_of_its_own_first():
    """A resume with carry-evaluation now off, from a checkpoint whose last model awaited its evaluation."""
    grid = _MerchantsGrid()
    pending = {"round": 0, "train": {}, "evaluate": {}, "clients": {}, "participants": RoundLog().participants(), EVALUATION_PENDING: True}
    _, _, _, evaluated = _carried_run(grid, carry=False, pending=pending)
    assert grid.exchanges == ["evaluate", "train", "evaluate", "train", "evaluate"] and evaluated == [0]
    assert "ndcg" in pending["evaluate"] and EVALUATION_PENDING not in pending


def test_a_carried_evaluation_counts_in_its_round_s_epsilon_as_an_evaluation_apart_does():
    _, apart, _, _ = _carried_run(_MerchantsGrid(), carry=False)
    initial = {"round": 0, "train": {}, "evaluate": {}, "clients": {}, "participants": RoundLog().participants(), EVALUATION_PENDING: True}
    _, carried, _, _ = _carried_run(_MerchantsGrid(), carry=True, pending=initial)
    assert [r["privacy"]["epsilon_max"] for r in apart] == [1.5, 2.5]
    assert [r["privacy"] for r in carried] == [r["privacy"] for r in apart]
    assert "privacy" not in initial  # round 0, as apart: no training, no round epsilon


def test_a_round_short_of_its_quorum_leaves_the_evaluation_it_carried_to_be_asked_again():
    """Round 2's training fails its quorum: round 1's record holds what came, but a resume must
    send round 2's question again (the merchants answer it from their records, no new budget):
    awaiting_evaluation gives that record back, and the resumed run fills it anew."""
    initial = {"round": 0, "train": {}, "evaluate": {}, "clients": {}, "participants": RoundLog().participants(), EVALUATION_PENDING: True}
    history = [initial]
    outcome, records, _, _ = _carried_run(_MerchantsGrid(silent_in=(2,)), carry=True, pending=initial)
    history += records
    assert outcome.last_round == 1 and outcome.short_reason is not None
    assert records[0][EVALUATED_WITH] == 2 and set(records[0]["participants"]["failed"]) == {"a (evaluate)", "b (evaluate)", "c (evaluate)"}
    assert awaiting_evaluation(history, carry_evaluation=True) is records[0]
    assert awaiting_evaluation(history, carry_evaluation=False) is None  # evaluated apart next time: no question to repeat
    resumed = _MerchantsGrid()
    _, _, _, evaluated = _carried_run(resumed, carry=True, pending=records[0], first=2)
    assert resumed.exchanges == ["train+evaluation", "evaluate"] and evaluated == [1, 2]
    assert records[0]["participants"]["failed"] == {} and "ndcg" in records[0]["evaluate"]
    # a completed run's last record was evaluated apart: nothing to ask again
    assert awaiting_evaluation([{"round": 3, "evaluate": {"ndcg": 1.0}}], carry_evaluation=True) is None


class _BudgetedStrategy(_EvaluatingStrategy):
    """Client-level DP's server budget, spent after round 1: configure_train raises from round 2 on."""

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:  # type: ignore[no-untyped-def, override]
        if server_round >= 2:
            raise PrivacyBudgetExhausted("the server's epsilon is spent")
        return super().configure_train(server_round, arrays, config, grid)


def test_a_server_out_of_budget_evaluates_the_model_whose_evaluation_was_to_be_carried():
    grid = _MerchantsGrid()
    loop = RoundLoop(_BudgetedStrategy(), grid, mf_shapes(NUM_ADS, DIM), timeout=5, carry_evaluation=True)  # type: ignore[arg-type]
    records: list[dict] = []
    evaluated: list[int] = []
    outcome = loop.run(to_array_record(init_global_arrays(NUM_ADS, DIM, seed=0)), 1, 3, ConfigRecord(), ConfigRecord(),
                       on_round_end=lambda r, arrays, record: records.append(record), on_evaluated=lambda record: evaluated.append(record["round"]))
    assert outcome.last_round == 1 and "DP budget is spent" in (outcome.short_reason or "")
    assert grid.exchanges == ["train", "evaluate"] and evaluated == [1]  # round 1's model, in an exchange of its own
    assert "ndcg" in records[0]["evaluate"] and EVALUATION_PENDING not in records[0] and EVALUATED_WITH not in records[0]


def test_a_retried_round_fills_the_evaluation_with_each_merchant_s_latest_carried_reply():
    """Round 2 short of its quorum at first (only "a" answers), asked again: the record of round 1
    holds every merchant's evaluation, "a"'s from either attempt (the same recorded release)."""

    class _FirstAttemptShort(_MerchantsGrid):
        def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
            replies = super().send_and_receive(messages, timeout)
            if len(self.exchanges) == 2:  # round 2's first attempt
                return replies[:1]
            return replies

    grid = _FirstAttemptShort()
    loop = RoundLoop(_EvaluatingStrategy(), grid, mf_shapes(NUM_ADS, DIM), timeout=5, carry_evaluation=True,  # type: ignore[arg-type]
                     min_replies=2, retries=1)
    records: list[dict] = []
    outcome = loop.run(to_array_record(init_global_arrays(NUM_ADS, DIM, seed=0)), 1, 2, ConfigRecord(), ConfigRecord(),
                       on_round_end=lambda r, arrays, record: records.append(record))
    assert outcome.short_reason is None and grid.exchanges == ["train", "train+evaluation", "train+evaluation", "evaluate"]
    assert sorted(records[0]["clients"]) == ["a", "b", "c"] and all("ndcg" in m for m in records[0]["clients"].values())
    assert records[0]["participants"]["failed"] == {} and records[0][EVALUATED_WITH] == 2
