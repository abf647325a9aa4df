"""A small message's records sealed in one ConfigRecord: three objects on the wire instead of one
per record, array and chunk.

Flower 1.42 moves a message as a tree of objects (the message, its RecordDict, every record,
every Array and every 5 MB chunk of one), each a request at every hop: ServerApp -> SuperLink ->
SuperNode -> ClientApp and back. A deployed exchange costs about 7 ms per object per merchant on
this 2-core machine (docs/BENCHMARKS.md, "Deployment"), so a private ALS round's 14-16 objects
per merchant (instruction 6, carried reply 8, or 10 with two dtypes) took more than its computation. Sealed, the same message is
the Message, its RecordDict and one ConfigRecord (the ENVELOPE) whose entries hold the records'
values as they are (an Array: its dtype, shape, serialization and bytes), indexed by position,
so no record or key name is ever parsed.

`sealed` leaves alone what it cannot seal faithfully or should not: errors, empty messages, an
already sealed one, and one whose arrays exceed SEAL_MAX_BYTES (those keep Flower's chunking,
which bounds every request; a million-ad model is one). `opened` restores the exact RecordDict:
record names, kinds, key order (the packed keys' order is checked by the server's screen), and
values with their types; on anything malformed it raises ValueError and builds nothing. A
merchant answers a sealed message sealed (client/client_app.py) and an unsealed one unsealed:
the secure-aggregation protocol's messages, built by Flower's SecAgg+ workflow, stay as Flower
shapes them, and so do its replies. The server seals what its round loop sends and opens what
comes back (server/round_loop.py); everything in between reads plain records.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict

ENVELOPE = "fedads.envelope"  # the one record of a sealed message
_MANIFEST = "records"  # [kind + name, ...]: each record's kind (a, c, m) and name, in order
_KINDS = ("a", "c", "m")  # ArrayRecord, ConfigRecord, MetricRecord
# below Flower's own largest object (a 5 MiB ArrayChunk and its framing): a sealed message is no
# larger a request than Flower itself sends
SEAL_MAX_BYTES = 5_000_000


def _keys_entry(index: int) -> str:
    return f"{index}"


def _value_entry(index: int, position: int, field: str = "") -> str:
    return f"{index}/{position}{'/' + field if field else ''}"


def is_sealed(msg: Message) -> bool:
    return msg.has_content() and ENVELOPE in msg.content.config_records


def sealed(msg: Message) -> Message:
    """`msg` with its records in one ConfigRecord, or `msg` itself when it is not to be sealed."""
    if not msg.has_content() or len(msg.content) == 0 or is_sealed(msg):
        return msg
    content = msg.content
    array_bytes = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    if array_bytes > SEAL_MAX_BYTES:
        return msg
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    entries: dict[str, Any] = {}
    manifest: list[str] = []
    for index, (name, record) in enumerate(content.items()):
        entries[_keys_entry(index)] = list(record.keys())
        if isinstance(record, ArrayRecord):
            manifest.append("a" + name)
            for position, array in enumerate(record.values()):
                entries[_value_entry(index, position)] = array.data
                entries[_value_entry(index, position, "dtype")] = array.dtype
                entries[_value_entry(index, position, "shape")] = ",".join(str(n) for n in array.shape)
                entries[_value_entry(index, position, "stype")] = array.stype
        else:
            manifest.append(("c" if isinstance(record, ConfigRecord) else "m") + name)
            for position, value in enumerate(record.values()):
                entries[_value_entry(index, position)] = value
    entries[_MANIFEST] = manifest
    out = copy.copy(msg)
    out.content = RecordDict({ENVELOPE: ConfigRecord(entries)})
    return out


def opened(msg: Message) -> Message:
    """`msg` with its sealed records restored, or `msg` itself when it is not sealed. Raises
    ValueError on a malformed envelope."""
    if not is_sealed(msg):
        return msg
    if len(msg.content) != 1:
        raise ValueError(f"a sealed message holds only its '{ENVELOPE}' record, this one {len(msg.content)} records")
    out = copy.copy(msg)
    out.content = _opened_content(msg.content.config_records[ENVELOPE])
    return out


def _opened_content(envelope: Any) -> RecordDict:
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    def entry(key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in envelope:
            raise ValueError(f"the envelope has no entry {key!r}")
        value = envelope[key]
        if not isinstance(value, kind):
            raise ValueError(f"the envelope's entry {key!r} is a {type(value).__name__}")
        return value

    manifest = entry(_MANIFEST, list)
    used = {_MANIFEST}
    content = RecordDict()
    for index, tagged in enumerate(manifest):
        if not isinstance(tagged, str) or tagged[:1] not in _KINDS:
            raise ValueError(f"the envelope's record {index} is {tagged!r}, not a kind and a name")
        kind, name = tagged[0], tagged[1:]
        if name in content:
            raise ValueError(f"the envelope names record {name!r} twice")
        keys = entry(_keys_entry(index), list)
        used.add(_keys_entry(index))
        if len(set(keys)) != len(keys) or not all(isinstance(key, str) for key in keys):
            raise ValueError(f"record {name!r}'s keys are not distinct strings")
        values: dict[str, Any] = {}
        for position, key in enumerate(keys):
            value_key = _value_entry(index, position)
            used.add(value_key)
            if kind == "a":
                fields = {field: _value_entry(index, position, field) for field in ("dtype", "shape", "stype")}
                used.update(fields.values())
                shape_text = entry(fields["shape"], str)
                try:
                    shape = tuple(int(n) for n in shape_text.split(",")) if shape_text else ()
                except ValueError:
                    raise ValueError(f"array {key!r} of record {name!r} has the shape {shape_text!r}") from None
                values[key] = Array(dtype=entry(fields["dtype"], str), shape=shape, stype=entry(fields["stype"], str),
                                    data=entry(value_key, bytes))
            else:
                values[key] = entry(value_key, object)
        try:
            content[name] = ArrayRecord(values) if kind == "a" else ConfigRecord(values) if kind == "c" else MetricRecord(values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"record {name!r} cannot be rebuilt: {exc}") from None
    if unread := sorted(set(envelope.keys()) - used):
        raise ValueError(f"the envelope holds entries no record names: {unread[:3]}")
    return content
