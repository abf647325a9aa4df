"""The ServerApp's grid, waiting for replies without Flower's fixed 3 s between looks.

Flower 1.42's deployed grid (`send_and_receive` of the grid a SuperLink hands the ServerApp)
pulls for replies, and sleeps 3 s whenever some are still missing: every exchange of a deployed
round ends up to 3 s after its last reply arrived. This grid sends and pulls through the same
public `push_messages` / `pull_messages`, looking again 20 ms after a pull began, then 1.5x
longer each time up to 0.2 s: replies are picked up within a fraction of a ClientApp's run, and a
long wait costs five pulls a second on the SuperLink's loopback. A SuperLink started by
deploy.superlink holds an empty pull until a reply comes in (deploy/held_pulls.py), and the next
pull then follows at once. Everything else is the wrapped grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_WAIT = 0.02
WAIT_GROWTH = 1.5
LONGEST_WAIT = 0.2


class PromptGrid(Grid):
    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's contract: push, then pull until every reply is in or `timeout` has passed."""
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = FIRST_WAIT
        while waiting:
            pulled = time.monotonic()
            arrived = list(self._grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if not waiting:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            # `wait` apart from the start of one pull to the next: a pull the SuperLink held until
            # a reply came in (deploy/held_pulls.py) is followed by the next at once
            pause = max(wait - (now - pulled), 0.0)
            time.sleep(pause if deadline is None else min(pause, deadline - now))
            # the rest of a round's replies tend to follow the first: look soon again after one
            wait = FIRST_WAIT if arrived else min(wait * WAIT_GROWTH, LONGEST_WAIT)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
