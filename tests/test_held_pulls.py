"""Empty pulls held by the SuperLink until something to pull may be there (deploy/held_pulls.py):
against a stand-in for Flower's four message routes, speaking Flower's protobufs. End to end, the
TLS deployment of tests/test_deployment.py runs on it (deploy/flower_superlink.py), and
tests/test_superlink_layers.py checks Flower's own app behind it."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import Message, Metadata
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullAppMessagesResponse, PushAppMessagesRequest
from google.protobuf.message import DecodeError

from deploy.held_pulls import HeldPulls
from shared.flower_internals import PULL_ROUTES

HOLD = 5.0  # longer than any test waits: a pull answered sooner was woken, not timed out
REFUSED_NODE = 401  # the stand-in refuses this node's pulls, as Flower refuses a bad signature


class FakeLink:
    """Flower's pull and push routes as an ASGI app: instructions queued by destination node,
    replies in one list; `during_pull` runs inside a pull's handling, after it found nothing."""

    def __init__(self) -> None:
        self.instructions: dict[int, list[Message]] = defaultdict(list)
        self.replies: list[Message] = []
        self.runs: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self.during_pull: Callable[[], Awaitable[None]] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        path = scope["path"]
        self.runs[path] += 1
        self.bodies.append(body)
        status, answer = 200, b""
        if path == PULL_ROUTES.fleet_pull:
            try:
                node = PullMessagesRequest.FromString(body).node.node_id
            except DecodeError:
                node, status = 0, 415  # as Flower's translation answers a body that is no protobuf
            if status != 200 or node == REFUSED_NODE:
                status = status if status != 200 else 401
            else:
                answer = PullMessagesResponse(messages_list=self.instructions.pop(node, [])).SerializeToString()
                if self.during_pull is not None:
                    pushed, self.during_pull = self.during_pull, None
                    await pushed()
        elif path == PULL_ROUTES.runtime_push:
            for message in PushAppMessagesRequest.FromString(body).messages_list:
                self.instructions[message.metadata.dst_node_id].append(message)
        elif path == PULL_ROUTES.fleet_push:
            self.replies.extend(PushMessagesRequest.FromString(body).messages_list)
        elif path == PULL_ROUTES.runtime_pull:
            answer = PullAppMessagesResponse(messages_list=self.replies).SerializeToString()
            self.replies = []
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": answer})


class Client:
    """Requests to an ASGI app the way uvicorn hands them over: the body in two parts, then, once
    the body is through, `receive` waits until the client disconnects (`leave()`) or is answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def post(self, path: str, body: bytes, leave: asyncio.Event | None = None) -> tuple[int | None, bytes, list[dict[str, Any]]]:
        parts = [{"type": "http.request", "body": body[:3], "more_body": True},
                 {"type": "http.request", "body": body[3:], "more_body": False}]
        answered = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop(0)
            gone = leave or asyncio.Event()
            waits = [asyncio.ensure_future(gone.wait()), asyncio.ensure_future(answered.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered.set()

        await self.app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), sent


def _pull(node: int) -> bytes:
    return PullMessagesRequest(node=Node(node_id=node)).SerializeToString()


def _push(*nodes: int) -> bytes:
    return PushAppMessagesRequest(messages_list=[Message(metadata=Metadata(dst_node_id=n, message_id=f"to-{n}")) for n in nodes]).SerializeToString()


def _reply() -> bytes:
    return PushMessagesRequest(messages_list=[Message(metadata=Metadata(message_id="reply"))]).SerializeToString()


def _messages(answer: bytes) -> list[str]:
    return [m.metadata.message_id for m in PullMessagesResponse.FromString(answer).messages_list]


def _layer(link: FakeLink, hold: float = HOLD) -> HeldPulls:
    return HeldPulls(link, PULL_ROUTES, fleet_hold=hold, runtime_hold=hold)


async def _pending_after(task: asyncio.Task, seconds: float = 0.05) -> bool:
    await asyncio.sleep(seconds)
    return not task.done()


def test_an_empty_pull_is_answered_when_a_message_for_its_node_is_pushed():
    link = FakeLink()
    layer = _layer(link)
    client = Client(layer)

    async def scenario() -> None:
        pull = asyncio.create_task(client.post(PULL_ROUTES.fleet_pull, _pull(7)))
        assert await _pending_after(pull)  # nothing for node 7: held
        assert link.runs[PULL_ROUTES.fleet_pull] == 1
        await client.post(PULL_ROUTES.runtime_push, _push(8))  # for another node: still held, not run again
        assert await _pending_after(pull)
        assert link.runs[PULL_ROUTES.fleet_pull] == 1
        status, _, _ = await client.post(PULL_ROUTES.runtime_push, _push(7))
        assert status == 200
        status, answer, _ = await asyncio.wait_for(pull, 1.0)  # woken, far sooner than HOLD
        assert status == 200 and _messages(answer) == ["to-7"]
        assert link.runs[PULL_ROUTES.fleet_pull] == 2  # Flower's app asked again, with the same request
        assert link.bodies.count(_pull(7)) == 2
        assert layer.held == 1 and layer._nodes == {}  # nothing kept for a node no one holds a pull of
        # node 8's message waited at the link: its pull is answered at once
        status, answer, _ = await asyncio.wait_for(client.post(PULL_ROUTES.fleet_pull, _pull(8)), 1.0)
        assert _messages(answer) == ["to-8"]

    asyncio.run(scenario())


def test_a_pull_held_for_its_whole_hold_gets_flowers_empty_answer():
    link = FakeLink()
    client = Client(_layer(link, hold=0.2))

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, answer, sent = await client.post(PULL_ROUTES.fleet_pull, _pull(7))
        assert status == 200 and _messages(answer) == [] and len(sent) == 2
        return loop.time() - started

    assert 0.2 <= asyncio.run(scenario()) < 2.0
    assert link.runs[PULL_ROUTES.fleet_pull] == 1


def test_a_push_while_flower_answers_the_pull_wakes_it_at_once():
    """The pull's ticket is taken before Flower's app runs it: a message pushed after Flower found
    nothing, but before the hold begins, is not missed."""
    link = FakeLink()
    client = Client(_layer(link))

    async def scenario() -> None:
        link.during_pull = lambda: client.post(PULL_ROUTES.runtime_push, _push(7))  # type: ignore[assignment]
        status, answer, _ = await asyncio.wait_for(client.post(PULL_ROUTES.fleet_pull, _pull(7)), 1.0)
        assert _messages(answer) == ["to-7"]

    asyncio.run(scenario())
    assert link.runs[PULL_ROUTES.fleet_pull] == 2


def test_the_serverapps_pull_is_answered_when_a_reply_comes_in():
    link = FakeLink()
    client = Client(_layer(link))

    async def scenario() -> None:
        pull = asyncio.create_task(client.post(PULL_ROUTES.runtime_pull, PullAppMessagesRequest(message_ids=["x"]).SerializeToString()))
        assert await _pending_after(pull)
        await client.post(PULL_ROUTES.runtime_push, _push(7))  # an instruction is no reply: still held
        assert await _pending_after(pull)
        await client.post(PULL_ROUTES.fleet_push, _reply())
        status, answer, _ = await asyncio.wait_for(pull, 1.0)
        assert [m.metadata.message_id for m in PullAppMessagesResponse.FromString(answer).messages_list] == ["reply"]

    asyncio.run(scenario())


@pytest.mark.parametrize(("path", "body", "status"), [
    (PULL_ROUTES.fleet_pull, _pull(REFUSED_NODE), 401),  # refused by Flower's app: its answer at once
    (PULL_ROUTES.fleet_pull, b"\xff\xff not protobuf", 415),  # not a pull request: passed on as it came
    ("/v1/fleet/get-run", _pull(7), 200),  # another route
])
def test_what_is_not_an_empty_pull_passes_straight_through(path: str, body: bytes, status: int):
    link = FakeLink()
    client = Client(_layer(link))
    answered, _, _ = asyncio.run(asyncio.wait_for(client.post(path, body), 1.0))
    assert answered == status
    assert link.bodies == [body]  # run once, with the body as sent (in its two parts)


def test_a_puller_that_leaves_while_held_gets_nothing_and_costs_nothing_more():
    link = FakeLink()
    layer = _layer(link)
    client = Client(layer)

    async def scenario() -> list[dict[str, Any]]:
        leave = asyncio.Event()
        pull = asyncio.create_task(client.post(PULL_ROUTES.fleet_pull, _pull(7), leave=leave))
        assert await _pending_after(pull)
        leave.set()
        _, _, sent = await asyncio.wait_for(pull, 1.0)
        await client.post(PULL_ROUTES.runtime_push, _push(7))
        return sent

    assert asyncio.run(scenario()) == []
    assert link.runs[PULL_ROUTES.fleet_pull] == 1 and layer._nodes == {}
    assert link.instructions[7]  # the message waits at the link for the node's next pull


def test_flowers_routes_are_the_ones_the_layer_watches():
    main = pytest.importorskip("flwr.superlink.main")
    paths = main.create_app().openapi()["paths"]  # every route of Flower's SuperLink app, with its methods
    for path in (PULL_ROUTES.fleet_pull, PULL_ROUTES.fleet_push, PULL_ROUTES.runtime_pull, PULL_ROUTES.runtime_push):
        assert "post" in paths[path]


def listening_for_disconnects(app: Any) -> Any:
    """`app` behind a layer that, like Starlette's BaseHTTPMiddleware when an app reads past its
    body, waits on `receive` for the client's disconnect while the app runs, and cancels that
    wait when the app is done."""

    async def layer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = [await receive()]
        while body[-1].get("more_body", False):
            body.append(await receive())
        listener = asyncio.ensure_future(receive())
        await asyncio.sleep(0)  # the listener waits from here on

        async def replayed() -> dict[str, Any]:
            return body.pop(0) if body else await listener

        try:
            await app(scope, replayed, send)
        finally:
            listener.cancel()

    return layer


def test_a_held_pull_behind_a_layer_that_listens_for_disconnects_is_answered_when_woken():
    """Each run's layers give up their wait for the client's disconnect as they answer: the
    layer's one wait for it outlives each run, so the run a push wakes still reaches the puller."""
    link = FakeLink()
    layer = HeldPulls(listening_for_disconnects(link), PULL_ROUTES, fleet_hold=HOLD, runtime_hold=HOLD)
    client = Client(layer)

    async def scenario() -> None:
        pull = asyncio.create_task(client.post(PULL_ROUTES.fleet_pull, _pull(7)))
        assert await _pending_after(pull)
        await client.post(PULL_ROUTES.runtime_push, _push(7))
        status, answer, _ = await asyncio.wait_for(pull, 2.0)
        assert status == 200 and _messages(answer) == ["to-7"]

    asyncio.run(scenario())


def test_a_push_the_layer_cannot_read_wakes_every_held_pull():
    link = FakeLink()
    layer = _layer(link)
    client = Client(layer)
    large = PushAppMessagesRequest(messages_list=[Message(metadata=Metadata(dst_node_id=9, message_id="x" * (2 << 20)))])

    async def scenario() -> None:
        pulls = [asyncio.create_task(client.post(PULL_ROUTES.fleet_pull, _pull(node))) for node in (7, 8)]
        assert await _pending_after(pulls[0]) and not pulls[1].done()
        await client.post(PULL_ROUTES.runtime_push, large.SerializeToString())  # past MAX_READ_PUSH: its destinations unread
        answers = await asyncio.wait_for(asyncio.gather(*pulls), 2.0)  # each asked Flower again, found nothing, held again: until the hold ends
        assert [_messages(answer) for _, answer, _ in answers] == [[], []]

    layer.fleet_hold = 0.5
    asyncio.run(scenario())
    assert link.runs[PULL_ROUTES.fleet_pull] == 4  # two runs each: the first, and the one the unread push woke


def test_the_serverapps_pull_ends_after_its_hold_and_a_failing_run_leaves_nothing_behind():
    link = FakeLink()
    layer = HeldPulls(link, PULL_ROUTES, fleet_hold=HOLD, runtime_hold=0.2)
    client = Client(layer)

    async def held_then_empty() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, answer, _ = await client.post(PULL_ROUTES.runtime_pull, PullAppMessagesRequest(message_ids=["x"]).SerializeToString())
        assert status == 200 and not PullAppMessagesResponse.FromString(answer).messages_list
        return loop.time() - started

    assert 0.2 <= asyncio.run(held_then_empty()) < 2.0

    async def failing_on_the_second_run() -> None:
        async def fail() -> None:
            raise RuntimeError("Flower's app failed")

        pull = asyncio.create_task(client.post(PULL_ROUTES.fleet_pull, _pull(7)))
        assert await _pending_after(pull)
        link.during_pull = fail  # the run the push wakes raises, as an exception in Flower's app would
        await client.post(PULL_ROUTES.runtime_push, _push(7))
        with pytest.raises(RuntimeError, match="Flower's app failed"):
            await asyncio.wait_for(pull, 2.0)

    asyncio.run(failing_on_the_second_run())
    assert layer._nodes == {}
