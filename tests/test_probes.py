"""The per-message floor (server/probes.py, `probe-messages`): empty query messages to every
node, answered by the ClientApp without touching data or privacy state."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict

from client.client_app import app as client_app
from server.probes import PROBES_FILE, probe, write_probes


class _EchoGrid:
    """Answers every message at once, except those to `silent` nodes."""

    def __init__(self, nodes: list[int], silent: frozenset[int] = frozenset()) -> None:
        self.nodes, self.silent, self.sent = nodes, silent, []

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        messages = list(messages)
        self.sent.append(messages)
        return [SimpleNamespace(has_error=lambda: False) for m in messages if m.metadata.dst_node_id not in self.silent]


def test_probe_times_each_exchange_with_every_node(as_server, tmp_path) -> None:
    grid = _EchoGrid([3, 1, 2], silent=frozenset({2}))
    probes = probe(grid, exchanges=4, timeout=5.0)  # type: ignore[arg-type]
    assert len(grid.sent) == 4 and all(len(sent) == 3 for sent in grid.sent)
    assert all(m.metadata.message_type == MessageType.QUERY and not m.content.array_records for sent in grid.sent for m in sent)
    assert probes["nodes"] == 3 and len(probes["exchange_seconds"]) == 4
    assert probes["unanswered"] == 4  # node 2 never answers: counted, not hidden
    assert probes["median_seconds"] >= 0
    path = write_probes(tmp_path, probes)
    assert path.name == PROBES_FILE and json.loads(path.read_text())["nodes"] == 3


def test_the_clientapp_answers_a_probe_with_an_empty_reply(as_server, tmp_path) -> None:
    state_dir = tmp_path / "state"
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={"state-dir": str(state_dir)})
    reply = client_app(Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY), context)
    assert not reply.has_error()
    assert not reply.content.array_records and not reply.content.metric_records and not reply.content.config_records
    assert not state_dir.exists()  # no data loaded, no state or ledger written
