"""The wire contract between the ServerApp and the merchants' ClientApps: every record name,
key and reply shape, in one place both sides use.

Server -> client (Flower's FedAvg `configure_train` / `configure_evaluate`):
    "arrays": ArrayRecord, the global parameters (GLOBAL_KEYS)
    "config": ConfigRecord {"server-round": int}
    a training message's "config" may hold EVALUATE_FIRST (carry-evaluation): evaluate the model it
    carries, round N - 1's, before training from it
Client -> server:
    train:    "arrays" (GLOBAL_KEYS, or with ALS the statistics ALS_*), "metrics",
              "client" {"name", "server-round": the round it answers (the server drops stale replies)},
              and after EVALUATE_FIRST "evaluation": the evaluate reply's "metrics" of that model
    evaluate: "metrics", "client"
    refused:  an Error reply, code PRIVACY_REFUSED, with the merchant's reason (public values only)
    failed:   an Error reply, code CLIENT_FAILED, that says only that (details stay with the merchant)
Between the server's round loop and a merchant's ClientApp a message of at most 5 MB of arrays
travels sealed, its records in one ConfigRecord (shared/envelope.py); both sides read and write
the records above, opened.
"metrics" holds NUM_EXAMPLES, the weight a FedAvg reads (not in ALS training replies: the server
sums statistics; under user-level DP a public constant or a noised count), and from a private
merchant DP_EPSILON and DP_NOISE_MULTIPLIER. No record holds a user id or a user factor.

Flower's records are imported where messages are built or read, not with this module: the
numpy-only code that names its keys (and the merchant agent's start-up) does not pay for them.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message, MetricRecord

# record names
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"
# keys of the "config" and "client" records
SERVER_ROUND = "server-round"  # set by Flower's FedAvg
EVALUATE_FIRST = "evaluate-first"  # in a training message's config: evaluate the model it carries first
EVALUATION = "evaluation"  # the record of that evaluation's metrics in the training reply
ALS_RELEASE = "als-release"  # in an ALS training message's config: what it asks for (shared/als.py)
STATISTICS, POPULARITY = "statistics", "popularity"  # the ad step's statistics | the ads' positive counts alone
RELEASES = (STATISTICS, POPULARITY)
CLIENT_NAME = "name"
# metric keys
NUM_EXAMPLES = "num-examples"
DP_EPSILON = "dp-epsilon"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
# a private-ALS release's share of its merchant's budget (public: its plan's, shared/als.py
# release_budget_shares): with the noise multiplier, what one whole-budget release would carry
DP_RELEASE_SHARE = "dp-release-share"
# private ALS's popularity rule in a round's train metrics (server/als_aggregation.py)
POPULARITY_SIGNAL = "als-popularity-signal"  # the rule's signal, in noise stds (shared/als.py popularity_signal)
RANKS_BY_POPULARITY = "als-ranks-by-popularity"  # 1: the rule chose popularity (or a one-round run)
DP_STEPS = "dp-steps"
TRAIN_LOSS = "train-loss"
TRAIN_ROWS = "train-rows"
# each merchant's own popularity ranking, evaluated on its shard (not the global TopPop baseline)
MERCHANT_POP_PREFIX = "merchant-pop-"
# the Error code of a reply refused under the merchant's privacy budget, ledger or policy
PRIVACY_REFUSED = 4001
# the Error code of a merchant that failed to answer; its reason says nothing more (the details,
# which may quote its data, stay in its own log)
CLIENT_FAILED = 4002
# array keys: the global parameters, and the ALS statistics a training reply carries instead
AD_FACTORS = "ad_factors"
AD_BIAS = "ad_bias"
GLOBAL_KEYS = (AD_FACTORS, AD_BIAS)
# NeuMF (mf-solver = "neumf", shared/neumf_arrays.py): its ad embeddings, towers and output layer
NEUMF_GMF = "ad_gmf"
NEUMF_MLP = "ad_mlp"
NEUMF_OUTPUT_WEIGHT = "output_weight"
NEUMF_OUTPUT_BIAS = "output_bias"
NEUMF_CONTENT = "ad_content"  # the catalog's public content embedding: sent by the server, never trained
NEUMF_CONTENT_GMF = "content_gmf"
NEUMF_CONTENT_MLP = "content_mlp"
ALS_GRAM = "als_gram"
ALS_COUNT = "als_count"
ALS_TARGET = "als_target"
ALS_POSITIVES = "als_positives"
ALS_USER_GRAM = "als_user_gram"
# als-gram "sparse" (exact, without DP only): the ads a merchant's rows touch, and their Gramians' packed upper triangles
ALS_ADS = "als_ads"
ALS_GRAM_UPPER = "als_gram_upper"

Arrays = dict[str, np.ndarray]


# An ArrayRecord travels packed: the arrays of one dtype concatenated into one flat Array, its key
# naming each array and its shape (PACKED_PREFIX + dtype + ":" + "name=AxB;name=C", names sorted).
# Flower moves a message as one object per record and per array (and per 5 MB chunk of it), each
# a request at every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back): a model
# message of two arrays is 6 objects instead of 8, a private ALS release 9 instead of 13. A
# FedAvg or FedMedian of packed records is the same elementwise as of the arrays one by one, and
# the canonical key (sorted names, shapes, dtype) is the same in every reply of the same arrays,
# as Flower's consistency check of the replies' keys asks.
PACKED_PREFIX = "packed."
_PACKABLE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _packed_key(dtype: np.dtype, layout: list[tuple[str, tuple[int, ...]]]) -> str:
    entries = ";".join(f"{name}={'x'.join(str(n) for n in shape)}" for name, shape in sorted(layout))
    return f"{PACKED_PREFIX}{dtype.str}:{entries}"


def _packing(arrays: Arrays) -> tuple[list[tuple[str, np.dtype, list[str]]], list[str]]:
    """How `packed` lays `arrays` out: (key, dtype, names) of each packed array, and the names
    that travel as they are (not plain identifiers, or object arrays)."""
    groups: dict[np.dtype, list[str]] = {}
    plain: list[str] = []
    for key, value in arrays.items():
        if key.startswith(PACKED_PREFIX):
            raise ValueError(f"an array's name must not start with {PACKED_PREFIX!r}: {key!r}")
        if _PACKABLE_NAME.fullmatch(key) and value.dtype != object:
            groups.setdefault(value.dtype, []).append(key)
        else:
            plain.append(key)
    layout = []
    for dtype, names in sorted(groups.items(), key=lambda item: item[0].str):
        names.sort()
        layout.append((_packed_key(dtype, [(name, tuple(int(n) for n in arrays[name].shape)) for name in names]), dtype, names))
    return layout, plain


def packed_keys(arrays: Arrays) -> list[str]:
    """The keys `arrays` travel under, in order (the server checks a reply's against them)."""
    layout, plain = _packing(arrays)
    return [key for key, _, _ in layout] + plain


def packed(arrays: Arrays) -> dict[str, np.ndarray]:
    """`arrays` as they travel: one flat array per dtype under its packed key (names that are not
    plain identifiers, and object arrays, stay as they are)."""
    layout, plain = _packing(arrays)
    out = {key: np.concatenate([np.asarray(arrays[name]).ravel() for name in names]).astype(dtype, copy=False)
           for key, dtype, names in layout}
    return {**out, **{name: arrays[name] for name in plain}}


def unpacked(key: str, flat: np.ndarray) -> Arrays:
    """The arrays of one packed entry (views of `flat`), or ValueError if the key does not describe
    `flat` exactly in the canonical form `packed` writes (a reply is dropped for it)."""
    dtype_str, sep, entries = key[len(PACKED_PREFIX):].partition(":")
    if not sep or flat.ndim != 1 or flat.dtype.str != dtype_str:
        raise ValueError(f"packed array {key[:80]!r}: a flat {flat.dtype.str} array of shape {flat.shape} does not match its key")
    layout: list[tuple[str, tuple[int, ...]]] = []
    for entry in entries.split(";") if entries else []:
        name, _, dims = entry.partition("=")
        try:
            shape = tuple(int(n) for n in dims.split("x")) if dims else ()
        except ValueError:
            raise ValueError(f"packed array {key[:80]!r}: malformed shape {dims[:40]!r}") from None
        if not _PACKABLE_NAME.fullmatch(name) or any(n < 0 for n in shape):
            raise ValueError(f"packed array {key[:80]!r}: malformed entry {entry[:40]!r}")
        layout.append((name, shape))
    if _packed_key(flat.dtype, layout) != key or len({name for name, _ in layout}) != len(layout):
        raise ValueError(f"packed array {key[:80]!r}: not in canonical form (sorted, unique names)")
    sizes = [math.prod(shape) for _, shape in layout]
    if sum(sizes) != flat.size:
        raise ValueError(f"packed array {key[:80]!r}: its shapes hold {sum(sizes)} values, the array {flat.size}")
    out: Arrays = {}
    offset = 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return out


def array_names(record: ArrayRecord) -> set[str]:
    """The names of the arrays a record holds, packed or not, read from its keys alone."""
    names: set[str] = set()
    for key in record:
        if key.startswith(PACKED_PREFIX):
            entries = key.partition(":")[2]
            names.update(entry.partition("=")[0] for entry in entries.split(";") if entry)
        else:
            names.add(key)
    return names


def to_array_record(arrays: Arrays) -> ArrayRecord:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in packed(arrays).items()})


def from_array_record(record: ArrayRecord) -> Arrays:
    """The arrays of a record, packed or not; ValueError for a malformed one (or a name twice)."""
    out: Arrays = {}
    for key, value in record.items():
        try:
            flat = value.numpy()
        except (TypeError, EOFError, OSError) as exc:  # a serialization numpy cannot read (a hostile or broken reply)
            raise ValueError(f"array {key!r} cannot be read: {type(exc).__name__}: {exc}") from None
        arrays = unpacked(key, flat) if key.startswith(PACKED_PREFIX) else {key: flat}
        if not out.keys().isdisjoint(arrays):
            raise ValueError(f"array {sorted(out.keys() & arrays.keys())[0]!r} appears twice in one record")
        out.update(arrays)
    return out


def plain_metrics(record: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (record or {}).items() if not isinstance(v, list)}


def read_instruction(msg: Message) -> tuple[Arrays, int]:
    """The global parameters and the server round of a message from the server."""
    server_round = msg.content.config_records[CONFIG][SERVER_ROUND]
    if not isinstance(server_round, int):
        raise ValueError(f"'{SERVER_ROUND}' must be an integer, got {server_round!r}")
    return from_array_record(msg.content.array_records[ARRAYS]), server_round


def requested_release(msg: Message) -> str:
    """What an ALS training message asks for (ALS_RELEASE): "statistics" unless it says otherwise."""
    value = msg.content.config_records[CONFIG].get(ALS_RELEASE, STATISTICS)
    if not isinstance(value, str):
        raise ValueError(f"'{ALS_RELEASE}' must be a string, got {value!r}")
    return value


def client_name(msg: Message) -> str:
    info = msg.content.config_records.get(CLIENT)
    return str(info[CLIENT_NAME]) if info and CLIENT_NAME in info else f"node-{msg.metadata.src_node_id}"


@dataclass(frozen=True)
class PrivacyReport:
    """What a private merchant says of its budget with every reply."""

    epsilon: float
    noise_multiplier: float

    def metrics(self) -> dict[str, float]:
        return {DP_EPSILON: self.epsilon, DP_NOISE_MULTIPLIER: self.noise_multiplier}

    @classmethod
    def from_metrics(cls, metrics: dict[str, float]) -> PrivacyReport | None:
        if DP_EPSILON not in metrics and DP_NOISE_MULTIPLIER not in metrics:
            return None
        return cls(metrics.get(DP_EPSILON, 0.0), metrics.get(DP_NOISE_MULTIPLIER, 0.0))


def answered_round(msg: Message) -> int | None:
    """The server round a reply says it answers (None: it says none)."""
    info = msg.content.config_records.get(CLIENT)
    value = info.get(SERVER_ROUND) if info else None
    return value if isinstance(value, int) else None


def _reply(reply_to: Message, client: str, metrics: dict[str, float], arrays: Arrays | None = None,
           evaluation: dict[str, float] | None = None) -> Message:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    values: dict[str, Any] = dict(metrics)
    identity: dict[str, Any] = {CLIENT_NAME: client}
    instruction = reply_to.content.config_records.get(CONFIG)
    if instruction and SERVER_ROUND in instruction:
        identity[SERVER_ROUND] = instruction[SERVER_ROUND]
    content = RecordDict({METRICS: MetricRecord(values), CLIENT: ConfigRecord(identity)})
    if arrays is not None:
        content[ARRAYS] = to_array_record(arrays)
    if evaluation is not None:
        content[EVALUATION] = MetricRecord(dict(evaluation))
    return Message(content=content, reply_to=reply_to)


_EVALUATION_PREFIX = EVALUATION + "/"  # a carried evaluation's metrics among a recorded release's


def recorded_reply(reply_to: Message, client: str, metrics: dict[str, float], arrays: Arrays | None) -> Message:
    """A release made earlier (TrainReply.recorded_metrics, EvaluateReply.metric_record), sent
    again as the reply to `reply_to` (client/release_record.py)."""
    own = {k: v for k, v in metrics.items() if not k.startswith(_EVALUATION_PREFIX)}
    carried = {k.removeprefix(_EVALUATION_PREFIX): v for k, v in metrics.items() if k.startswith(_EVALUATION_PREFIX)}
    return _reply(reply_to, client, own, arrays, carried or None)


def evaluates_first(msg: Message) -> bool:
    """Whether a training message asks for the evaluation of the model it carries (EVALUATE_FIRST)."""
    config = msg.content.config_records.get(CONFIG)
    return bool(config and config.get(EVALUATE_FIRST, False))


def split_evaluation(reply: Message) -> tuple[Message, Message | None]:
    """A training reply as the strategy's training reply (its EVALUATION record left out) and,
    when it carries one, the evaluate reply of the model the instruction carried: two views of the
    one message (same sender, same answered round), each shaped as Flower's strategies expect."""
    if reply.has_error() or EVALUATION not in reply.content.metric_records:
        return reply, None
    from flwr.app import RecordDict

    content = reply.content
    trained, evaluated = copy.copy(reply), copy.copy(reply)
    trained.content = RecordDict({key: record for key, record in content.items() if key != EVALUATION})
    # without CLIENT (a malformed reply) both views say no round, and the screen drops them
    identity = {CLIENT: content.config_records[CLIENT]} if CLIENT in content.config_records else {}
    evaluated.content = RecordDict({METRICS: content[EVALUATION], **identity})
    return trained, evaluated


@dataclass(frozen=True)
class TrainReply:
    """A merchant's training reply: its update (parameters, or ALS statistics), its weight,
    what its local step measured, and its privacy report."""

    client: str
    arrays: Arrays
    num_examples: float | None  # the weight a FedAvg averages with; None: not sent (ALS sums, it does not weigh)
    metrics: dict[str, float] = field(default_factory=dict)  # TRAIN_LOSS, TRAIN_ROWS, DP_STEPS
    privacy: PrivacyReport | None = None
    evaluation: EvaluateReply | None = None  # of the model the instruction carried (EVALUATE_FIRST)

    def metric_record(self) -> dict[str, float]:
        weight = {} if self.num_examples is None else {NUM_EXAMPLES: self.num_examples}
        return {**weight, **self.metrics, **(self.privacy.metrics() if self.privacy else {})}

    def recorded_metrics(self) -> dict[str, float]:
        """Its metrics and its evaluation's, as a release record keeps them (recorded_reply)."""
        carried = self.evaluation.metric_record() if self.evaluation else {}
        return {**self.metric_record(), **{_EVALUATION_PREFIX + k: v for k, v in carried.items()}}

    def to_message(self, reply_to: Message) -> Message:
        return _reply(reply_to, self.client, self.metric_record(), self.arrays,
                      self.evaluation.metric_record() if self.evaluation else None)

    @classmethod
    def from_message(cls, msg: Message) -> TrainReply:
        metrics = plain_metrics(msg.content.metric_records[METRICS])
        privacy = PrivacyReport.from_metrics(metrics)
        local = {k: v for k, v in metrics.items() if k not in (NUM_EXAMPLES, DP_EPSILON, DP_NOISE_MULTIPLIER)}
        return cls(client_name(msg), from_array_record(msg.content.array_records[ARRAYS]), metrics.get(NUM_EXAMPLES), local, privacy)


@dataclass(frozen=True)
class EvaluateReply:
    """A merchant's evaluation reply: its ranking metrics as its privacy allows them to leave
    (none, noised or exact), its weight (test users, noised under DP), its own popularity floor
    (the ranking by its shard's popularity; only without DP) and its privacy report."""

    client: str
    num_examples: float
    metrics: dict[str, float] = field(default_factory=dict)  # shared.metrics.METRIC_NAMES
    merchant_popularity: dict[str, float] = field(default_factory=dict)  # the same names, of ranking by this shard's popularity
    privacy: PrivacyReport | None = None

    def metric_record(self) -> dict[str, float]:
        popularity = {MERCHANT_POP_PREFIX + k: v for k, v in self.merchant_popularity.items()}
        return {**self.metrics, **popularity, **(self.privacy.metrics() if self.privacy else {}), NUM_EXAMPLES: self.num_examples}

    def to_message(self, reply_to: Message) -> Message:
        return _reply(reply_to, self.client, self.metric_record())

    @classmethod
    def from_message(cls, msg: Message) -> EvaluateReply:
        return cls.from_metrics(client_name(msg), plain_metrics(msg.content.metric_records[METRICS]))

    @classmethod
    def from_metrics(cls, client: str, metrics: dict[str, float]) -> EvaluateReply:
        """The reply whose metric_record() is `metrics`."""
        popularity = {k.removeprefix(MERCHANT_POP_PREFIX): v for k, v in metrics.items() if k.startswith(MERCHANT_POP_PREFIX)}
        own = {k: v for k, v in metrics.items()
               if not k.startswith(MERCHANT_POP_PREFIX) and k not in (NUM_EXAMPLES, DP_EPSILON, DP_NOISE_MULTIPLIER)}
        return cls(client, metrics.get(NUM_EXAMPLES, 0.0), own, popularity, PrivacyReport.from_metrics(metrics))


_REFUSED_BY, _FAILED_BY = " refused: ", " could not answer this message"


def error_sender(msg: Message) -> str | None:
    """The merchant name an error reply of ours gives (refusal, failure); None for other errors
    (those Flower's runtime writes when a ClientApp crashes)."""
    reason = msg.error.reason or ""
    marker = {PRIVACY_REFUSED: _REFUSED_BY, CLIENT_FAILED: _FAILED_BY}.get(msg.error.code)
    return reason.split(marker, 1)[0] if marker and marker in reason else None


def refusal(reply_to: Message, client: str, reason: str) -> Message:
    """The reply of a merchant that will not release anything for this message, and why."""
    from flwr.app import Error, Message

    return Message(Error(code=PRIVACY_REFUSED, reason=f"{client}{_REFUSED_BY}{reason}"), reply_to=reply_to)


def failure(reply_to: Message, client: str) -> Message:
    """The reply of a merchant that could not answer: no exception text leaves it (a message such
    as a malformed log line's, or one that depends on how many users it holds, would be a release)."""
    from flwr.app import Error, Message

    return Message(Error(code=CLIENT_FAILED, reason=f"{client}{_FAILED_BY} (its own log says why)"), reply_to=reply_to)
