"""Flower's exchange with simulated merchants in this process, for tests and benchmarks that
drive the ServerApp's pieces without a runtime: each message is handled by its node's
ClientApp with the node's own context (kept across messages, as a SuperNode keeps it), and
messages and replies are copied, as the wire copies them. Build messages under
`shared.flower_internals.server_identity()`, as Flower's runtime stamps them."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict

from client.client_app import app as client_app
from shared.config import RunConfig
from shared.flower_internals import wire_bytes


class InProcessGrid:
    def __init__(self, cfg: RunConfig, merchants: int, first_node_id: int = 10) -> None:
        self.contexts = {
            first_node_id + i: Context(run_id=1, node_id=first_node_id + i, node_config={"partition-id": i, "num-partitions": merchants},
                                       state=RecordDict(), run_config=cfg.to_flower())
            for i in range(merchants)
        }
        self.bytes_sent: dict[int, int] = dict.fromkeys(self.contexts, 0)  # by each node, on the wire
        self.bytes_received: dict[int, int] = dict.fromkeys(self.contexts, 0)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            # serializing caches views inside a message (a later deepcopy fails): measured on copies
            # nobody uses after, and before the handler (a mod adds records to what it is given)
            self.bytes_received[node] += len(wire_bytes(copy.deepcopy(msg)))
            answered = client_app(copy.deepcopy(msg), self.contexts[node])
            replies.append(copy.deepcopy(answered))
            self.bytes_sent[node] += len(wire_bytes(answered))
        return replies
