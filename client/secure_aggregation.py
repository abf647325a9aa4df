"""The merchant's side of secure aggregation: Flower's SecAgg+ mod around the training handler.

A training message of Flower's SecAgg+ protocol (server/secure_round.py) goes through Flower's
`secaggplus_mod` (shared/flower_internals.py): key agreement, secret sharing, masking,
unmasking. At the stage that collects the masked vectors the mod calls the training handler;
this module adapts the protocol's legacy messages to the app's and back (the app's side is
adapted, not Flower's):
- in: the legacy FitIns (global arrays in key order, and the round) becomes the app's
  instruction; the reconstruction threshold the merchant's own mod stored at setup (the value
  it enforces: it helps unmask no sum of fewer releases) goes to the handler through the
  node's context, never through the message, so a server cannot claim a secure round;
- the handler's privacy plan adds its share of the noise (client/privacy/private_als.py);
- out: the release, each block divided by its public scale (shared/secure_sum.py), becomes the
  legacy FitRes the mod quantizes and masks; the unscaled arrays are dropped from the reply.
  The app's identity and metric records (merchant name, round, privacy report) leave in the clear.
A merchant that refuses (its policy, its budget) answers the collect stage with its refusal;
the protocol then counts it as dropped and unmasks the sum of the others.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message

from shared import flower_internals
from shared.als import ALSSettings
from shared.app_log import log
from shared.config import RunConfig
from shared.secure_sum import ARRAY_KEYS, SecureScales
from shared.wire import ALS_RELEASE, ARRAYS, CONFIG, SERVER_ROUND, from_array_record, to_array_record

SECURE_RELEASE = "fedads.secure-release"  # the node context's record of the release under way (never from a message)


class _Declined(Exception):
    """The handler answered with an error (a refusal or a failure): the protocol is left."""

    def __init__(self, reply: Message) -> None:
        super().__init__("declined")
        self.reply = reply


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A Flower mod: SecAgg+ training messages through Flower's mod, everything else as it is."""
    if msg.metadata.message_type != "train" or not flower_internals.is_secure_aggregation(msg):
        return call_next(msg, context)

    def collect(stage_msg: Message, stage_context: Context) -> Message:
        return _release(stage_msg, stage_context, call_next)

    try:
        return flower_internals.secaggplus(msg, context, collect)
    except _Declined as declined:
        return declined.reply


def secure_threshold(context: Context) -> int | None:
    """The threshold of the secure release under way on this node, if any (for the handler)."""
    record = context.state.config_records.get(SECURE_RELEASE)
    return int(str(record["threshold"])) if record is not None else None


def _release(msg: Message, context: Context, handler: Callable[[Message, Context], Message]) -> Message:
    vectors, config = flower_internals.fit_instruction(msg)
    keys = str(config[ARRAY_KEYS]).split(",")
    msg.content.array_records[ARRAYS] = to_array_record(dict(zip(keys, vectors, strict=True)))
    instruction = ConfigRecord({SERVER_ROUND: int(config[SERVER_ROUND])})
    if ALS_RELEASE in config:
        instruction[ALS_RELEASE] = str(config[ALS_RELEASE])
    msg.content.config_records[CONFIG] = instruction
    threshold, _ = flower_internals.secure_threshold(context)
    context.state.config_records[SECURE_RELEASE] = ConfigRecord({"threshold": threshold})
    try:
        reply = handler(msg, context)
    finally:
        del context.state.config_records[SECURE_RELEASE]
    if reply.has_error():
        raise _Declined(reply)
    stats = from_array_record(reply.content.array_records.pop(ARRAYS))
    cfg = RunConfig.from_flower(context.run_config)
    scales = SecureScales.for_release(ALSSettings.from_config(cfg), list(stats), cfg.max_users_per_merchant)
    scaled, clipped = scales.to_vectors(stats)
    if clipped:
        log.warning("secure aggregation will clip %d coordinates of this release (beyond max-users-per-merchant %d users' worth)",
                    clipped, cfg.max_users_per_merchant)
    flower_internals.add_fit_result(reply.content, scaled)
    return reply
