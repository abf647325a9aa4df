"""Every private or undocumented Flower (and Ray) name the project uses, fenced in one module.

Written for, and pinned by tests/test_flower_internals.py against, flwr FLOWER_VERSION.
Application code (client/, server/, shared/) uses only Flower's public `flwr.app`,
`flwr.clientapp` and `flwr.serverapp`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from flwr.app import Message

FLOWER_VERSION = "1.42.0"


@contextmanager
def server_identity() -> Iterator[None]:
    """For tests that build server-side messages outside Flower's runtime: the task identity
    Flower's runtime gives the ServerApp side (a Message is stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def wire_bytes(message: Message) -> bytes:
    """Every byte Flower would send for `message`: its serialized objects, as the wire carries them."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())
