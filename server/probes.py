"""The federation's per-message floor: messages of no content, each exchange timed.

With `probe-messages = N` the ServerApp sends, before round 0, N empty query messages to every
node in turn (one exchange: one message per node, all replies awaited) and writes the seconds of
each exchange to OUTPUT_DIR/probes.json. A node's ClientApp answers a probe with an empty reply
and touches neither its data nor its privacy ledger (client/client_app.py), so an exchange's time
is what the runtime itself costs a message: transport, scheduling and the ClientApp's start. A
training round cannot be faster than its exchanges' floor.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

PROBES_FILE = "probes.json"


def probe(grid: Grid, exchanges: int, timeout: float) -> dict[str, Any]:
    """Time `exchanges` exchanges of empty query messages with every node."""
    nodes = sorted(grid.get_node_ids())
    seconds, started_at, missing = [], [], 0
    for exchange in range(exchanges):
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, group_id=f"probe-{exchange}")
                    for node in nodes]
        started_at.append(time.time())
        started = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        seconds.append(time.perf_counter() - started)
        missing += len(nodes) - sum(1 for reply in replies if not reply.has_error())
    return {"nodes": len(nodes), "exchange_seconds": seconds, "median_seconds": statistics.median(seconds) if seconds else None,
            "unanswered": missing, "started_at": started_at}


def write_probes(output: Path, probes: dict[str, Any]) -> Path:
    path = output / PROBES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(probes, indent=2) + "\n")
    return path
