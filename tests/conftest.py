"""Shared fixtures: a small synthetic run configuration, a simulated node and a ClientApp
call made as Flower's runtime would make it, and the real-data location."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from client.node_data import Node, load_node
from deploy.processes import processes_mentioning
from shared.config import RunConfig
from shared.envelope import sealed
from shared.flower_internals import server_identity
from shared.node_config import NodeConfig
from shared.wire import ALS_RELEASE, ARRAYS, CONFIG, EVALUATE_FIRST, SERVER_ROUND, to_array_record

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def small_run_config(tmp_path: Path, **overrides: Any) -> RunConfig:
    """A synthetic market small enough for a Flower round in about a second; without DP unless
    `privacy` says otherwise (the mechanics tests; the private default is tests/test_privacy_policy.py's)."""
    values: dict[str, Any] = {
        "privacy": "none",
        "output-dir": str(tmp_path / "out"),
        "state-dir": str(tmp_path / "out" / "state"),
        "num-rounds": 2,
        "min-nodes": 2,
        "synthetic-merchants": 3,
        "synthetic-users": 600,
        "synthetic-ads": 200,
        "synthetic-categories": 8,
        "local-epochs": 2,
        "seed": 7,
    }
    values.update(overrides)
    return RunConfig.from_flower(values)


def simulated_node(cfg: RunConfig, partition: int = 0, count: int = 3) -> Node:
    """Simulated node `partition` of `count`, as its ClientApp loads it."""
    return load_node(cfg, NodeConfig(partition_id=partition, num_partitions=count))


def client_call(
    kind: str, cfg: RunConfig, arrays: dict[str, np.ndarray], server_round: int = 1, partition: int = 0,
    node_config: dict[str, Any] | None = None, release: str | None = None, evaluate_first: bool = False, seal: bool = False,
) -> Message:
    """The ClientApp's reply to a `kind` ("train" | "evaluate") message, called in-process as
    Flower's runtime calls it: simulated node `partition` of 3, or a deployed `node_config`;
    `release`: what an ALS training message asks for (none: the client's default, statistics);
    `seal`: the message sealed as the server's round loop sends it (shared/envelope.py).
    Needs the `as_server` fixture (messages are stamped with the server side's identity)."""
    node_id = 10 + partition
    context = Context(
        run_id=1, node_id=node_id, node_config=node_config or {"partition-id": partition, "num-partitions": 3},
        state=RecordDict(), run_config=cfg.to_flower(),
    )
    config = ConfigRecord({SERVER_ROUND: server_round})
    if release is not None:
        config[ALS_RELEASE] = release
    if evaluate_first:
        config[EVALUATE_FIRST] = True
    msg = Message(
        content=RecordDict({ARRAYS: to_array_record(arrays), CONFIG: config}),
        dst_node_id=node_id, message_type=kind,
    )
    return client_app(sealed(msg) if seal else msg, context)


@pytest.fixture
def as_server() -> Iterator[None]:
    """The identity Flower's runtime gives the ServerApp side that creates instructions."""
    with server_identity():
        yield


def listening_addresses(*needles: str) -> dict[str, list[str]]:
    """The TCP addresses on which the processes `processes_mentioning(needles)` (and this test
    process) listen, by process: read from /proc, as `ss -ltnp` does."""
    pids = {line.split(":", 1)[0] for line in processes_mentioning(*needles)} | {str(os.getpid())}
    listening: dict[str, str] = {}  # socket inode -> "address:port"
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":  # TCP_LISTEN
                raw_address, raw_port = fields[1].split(":")
                packed = bytes.fromhex(raw_address)
                # /proc writes the address as 32-bit words in host (little-endian) order
                packed = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
                listening[fields[9]] = f"{socket.inet_ntop(family, packed)}:{int(raw_port, 16)}"
    found: dict[str, list[str]] = {}
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # gone, or not ours to read
        addresses = [listening[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in listening]
        if addresses:
            found[pid] = addresses
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return ipaddress.ip_address(host).is_loopback or host.startswith("::ffff:127.")


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "movielens" / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA
