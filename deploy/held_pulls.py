"""The SuperLink answers an empty pull when there is something to pull, or after a while: not at once.

Flower 1.42's SuperNodes and ServerApp learn of new messages by pulling: a SuperNode asks for its
next instruction, the ServerApp for the replies it waits on, and an empty answer comes back at
once. Each side then sleeps before asking again, and the sleep is the latency: a deployed
3-merchant round on MovieLens-100K spent about a fifth of its time between a message's arrival
at the SuperLink and the next pull that picked it up (docs/BENCHMARKS.md, "Deployment"), and
every empty pull cost a signed HTTPS request through the Fleet gateway.

`HeldPulls`, the outermost HTTP layer of the SuperLink's app (deploy/flower_superlink.py), holds
such a pull instead: it runs the request through Flower's app as it came, and when Flower's
answer is an empty one it keeps the answer back and runs the same request again the moment
something the puller waits for may have arrived, or sends that empty answer after `hold`
seconds: a SuperNode's pull is run again when the ServerApp pushed a message for that node, the
ServerApp's when a SuperNode pushed a reply. (A SuperLink asked to stop answers the pulls it holds
within their hold: uvicorn lets every request in flight end.) Every run goes through all of Flower's layers and
checks (the SuperNode's signature, the ServerApp's token), and a pull's answer is Flower's, only
later. A puller that goes away while held gets no answer and costs nothing more.

What the layer knows of Flower (the routes, the protobuf messages it reads) comes from
shared.flower_internals `PULL_ROUTES`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]

# a SuperNode's pull: Flower's SuperNode waits 3 s after an empty one (deploy/supernode.py's
# waits grow back to that), and its HTTP client 30 s for an answer; held as long as that longest
# wait, an idle merchant always has a pull open, and asks every FLEET_HOLD seconds
FLEET_HOLD = 3.0
# the ServerApp's pull of replies: short, as a held pull can end a little past the deadline of
# the ServerApp's exchange, and some replies appear without a push (the SuperLink's own error
# replies for a message that expired or a node that left)
RUNTIME_HOLD = 0.5
MAX_HELD_BODY = 64 * 1024  # a pull request names a node or some message ids: larger ones are not held
MAX_READ_PUSH = 1024 * 1024  # a push of messages (their objects come apart) read up to this size to learn its destinations


class PullProtocol(Protocol):
    """What the layer reads in Flower's requests and answers (shared.flower_internals.PULL_ROUTES)."""

    fleet_pull: str
    fleet_push: str
    runtime_pull: str
    runtime_push: str

    def pulling_node(self, body: bytes) -> int: ...

    def nothing_pulled(self, path: str, body: bytes) -> bool: ...

    def destinations(self, body: bytes) -> set[int]: ...


class _Signal:
    """Wakes those holding a ticket taken before `fire()`; a ticket taken after waits for the next."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.holders = 0

    def ticket(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass
class _Answer:
    """Flower's answer to one run of a request, kept back until the layer sends it."""

    messages: list[AsgiMessage] = field(default_factory=list)

    async def send(self, message: AsgiMessage) -> None:
        self.messages.append(message)

    def ok_body(self) -> bytes | None:
        """The whole body of a plain 200 answer (no trailers, no encoding), or None."""
        start = next((m for m in self.messages if m["type"] == "http.response.start"), None)
        if (start is None or start["status"] != 200 or start.get("trailers")
                or any(name.lower() == b"content-encoding" for name, _ in start.get("headers", []))):
            return None
        chunks = [m for m in self.messages if m["type"] == "http.response.body"]
        if not chunks or chunks[-1].get("more_body", False):
            return None
        return b"".join(m.get("body", b"") for m in chunks)


class _Replay:
    """The request's body, given to each run of the request as if it came from the client; once it
    is through, a run waiting for more learns of the client's disconnect (one wait on the real
    `receive`, shared by every run)."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self.body, self._receive = body, receive
        self._disconnect: asyncio.Future[AsgiMessage] | None = None

    def disconnected(self) -> asyncio.Future[AsgiMessage]:
        if self._disconnect is None:
            self._disconnect = asyncio.ensure_future(self._until_disconnect())
        return self._disconnect

    async def _until_disconnect(self) -> AsgiMessage:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return message

    def receive_for_a_run(self) -> Receive:
        given = False

        async def receive() -> AsgiMessage:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            return await asyncio.shield(self.disconnected())

        return receive

    def close(self) -> None:
        if self._disconnect is not None and not self._disconnect.done():
            self._disconnect.cancel()


async def _read_body(receive: Receive, limit: int) -> tuple[list[AsgiMessage], bytes | None]:
    """The request's messages as received, and its body if it ended within `limit` bytes (else None)."""
    messages: list[AsgiMessage] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > limit:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replaying(messages: list[AsgiMessage], receive: Receive) -> Receive:
    """`receive` with `messages` (already read from it) given first."""
    pending = list(messages)

    async def replayed() -> AsgiMessage:
        return pending.pop(0) if pending else await receive()

    return replayed


class HeldPulls:
    """An ASGI layer: Flower's empty answer to a pull kept back until something to pull may be
    there (see the module's text); every other request passes straight through, a push noting
    whom it may concern on its way out."""

    def __init__(self, app: Any, routes: PullProtocol, fleet_hold: float = FLEET_HOLD, runtime_hold: float = RUNTIME_HOLD) -> None:
        self.app, self.routes = app, routes
        self.fleet_hold, self.runtime_hold = fleet_hold, runtime_hold
        self._nodes: dict[int, _Signal] = {}  # a SuperNode's held pulls, by node id
        self._replies = _Signal()  # the ServerApps' held pulls
        self.held = 0  # pulls kept back since start, each counted once (tests, logs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == self.routes.fleet_pull:
            await self._pull(scope, receive, send, self.fleet_hold, node=True)
        elif path == self.routes.runtime_pull:
            await self._pull(scope, receive, send, self.runtime_hold, node=False)
        elif path == self.routes.runtime_push:
            await self._push(scope, receive, send, self._wake_destinations)
        elif path == self.routes.fleet_push:
            await self._push(scope, receive, send, lambda body: self._replies.fire())
        else:
            await self.app(scope, receive, send)

    def _wake_destinations(self, body: bytes | None) -> None:
        try:
            nodes = None if body is None else self.routes.destinations(body)
        except ValueError:
            nodes = None
        for node, signal in list(self._nodes.items()):
            if nodes is None or node in nodes:  # unreadable: wake every held SuperNode pull, which only asks again
                signal.fire()

    async def _push(self, scope: Scope, receive: Receive, send: Send, wake: Callable[[bytes | None], None]) -> None:
        messages, body = await _read_body(receive, MAX_READ_PUSH)

        async def send_and_wake(message: AsgiMessage) -> None:
            # Flower has stored the messages when it starts its answer: those waiting pull again
            # while the pusher reads the answer (and pushes the messages' objects)
            if message["type"] == "http.response.start" and message["status"] == 200:
                wake(body)
            await send(message)

        await self.app(scope, _replaying(messages, receive), send_and_wake)

    async def _pull(self, scope: Scope, receive: Receive, send: Send, hold: float, node: bool) -> None:
        if hold <= 0:
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive, MAX_HELD_BODY)
        signal, node_id = self._replies, None
        if body is not None and node:
            try:
                node_id = self.routes.pulling_node(body)
            except ValueError:
                body = None  # not a pull Flower would answer: it passes through as it came
            else:
                signal = self._nodes.setdefault(node_id, _Signal())
        if body is None:
            await self.app(scope, _replaying(messages, receive), send)
            return
        replay = _Replay(body, receive)
        signal.holders += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        counted = False
        try:
            while True:
                ticket = signal.ticket()  # taken before the run: a push during the run ends the wait below at once
                answer = _Answer()
                await self.app(scope, replay.receive_for_a_run(), answer.send)
                remaining = deadline - loop.time()
                answered = answer.ok_body()
                if answered is None or remaining <= 0 or not self._nothing_pulled(scope["path"], answered):
                    break
                if not counted:
                    self.held, counted = self.held + 1, True
                woken: asyncio.Future[Any] = asyncio.ensure_future(ticket.wait())
                try:
                    done, _ = await asyncio.wait({woken, replay.disconnected()}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if replay.disconnected() in done:
                    return  # the puller went away: nobody to answer
                if woken not in done:
                    break  # held for `hold`: Flower's empty answer, as of then (nothing was pushed for the puller since)
            for message in answer.messages:
                await send(message)
        finally:
            replay.close()
            signal.holders -= 1
            if node_id is not None and signal.holders == 0 and self._nodes.get(node_id) is signal:
                del self._nodes[node_id]

    def _nothing_pulled(self, path: str, body: bytes) -> bool:
        try:
            return self.routes.nothing_pulled(path, body)
        except ValueError:
            return False
