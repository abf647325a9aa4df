"""The SuperLink's HTTP layers, each only under the API it serves (shared/flower_internals.py
`scope_superlink_middleware`, deploy/flower_superlink.py): Flower's layers in Flower's order,
the API-specific ones skipped outside their API, and Flower's own app answering every kind of
request exactly as it does unscoped. The handlers of Flower's message exchange run in the event
loop (`run_handlers_inline`, `InlineHandlers`), in the SuperLink and in each SuperNode, and
nothing else does. tests/test_deployment.py runs the whole TLS deployment on the scoped
SuperLink (an unregistered SuperNode refused, a run trained)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import warnings

import pytest
from fastapi import Depends, FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

with warnings.catch_warnings():  # Starlette asks for httpx2, which nothing else here needs
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

from deploy.flower_superlink import outermost_layers
from deploy.held_pulls import HeldPulls
from deploy.superlink import ServerTls, superlink_command
from shared.flower_internals import (
    FLEET_EXCHANGE_ROUTES,
    RUNTIME_EXCHANGE_ROUTES,
    SUPERLINK_LAYER_SCOPES,
    SUPERNODE_RUNTIME_ROUTES,
    THREADPOOL_USERS,
    InlineHandlers,
    PathScopedLayer,
    Pinned,
    resolve,
    run_handlers_inline,
    run_supernode_handlers_inline,
    scope_superlink_middleware,
    scoped_superlink_layers,
)


@pytest.fixture
def undo_inline(monkeypatch):
    """Flower's and FastAPI's worker-thread hand-over, and the SuperNode's app, restored after the test."""
    for name in THREADPOOL_USERS:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "run_in_threadpool", module.run_in_threadpool)
    supernode_main = importlib.import_module("flwr.supernode.main")
    monkeypatch.setattr(supernode_main, "create_app", supernode_main.create_app)
    monkeypatch.setattr(BaseHTTPMiddleware, "__call__", BaseHTTPMiddleware.__call__)


def _flowers_layers() -> list[Middleware]:
    return resolve(Pinned("flwr.superlink.main", "_get_middleware"))()


def test_flowers_layers_keep_their_order_and_the_api_specific_ones_are_scoped():
    layers = _flowers_layers()
    scoped = scoped_superlink_layers(layers)
    inner = [layer.kwargs["layer"] if layer.cls is PathScopedLayer else layer.cls for layer in scoped]
    assert inner == [layer.cls for layer in layers]
    prefixes = {(layer.kwargs["layer"].__module__, layer.kwargs["layer"].__name__): layer.kwargs["prefix"]
                for layer in scoped if layer.cls is PathScopedLayer}
    assert prefixes == SUPERLINK_LAYER_SCOPES  # all six found in Flower's list, none other
    unscoped = [layer.cls.__name__ for layer in scoped if layer.cls is not PathScopedLayer]
    assert "ProtobufTranslationMiddleware" in unscoped and "BaseHTTPMiddleware" in unscoped  # the translators serve every API
    assert scoped_superlink_layers(scoped) == scoped  # scoping twice wraps nothing twice


def test_a_scoped_layer_sees_only_the_requests_under_its_prefix():
    seen: list[str] = []

    async def record(request: Request, call_next):
        seen.append(request.url.path)
        response = await call_next(request)
        response.headers["x-layer"] = "yes"
        return response

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.url.path)

    app = Starlette(
        routes=[Route("/v1/fleet/pull-messages", ok, methods=["POST"]), Route("/v1/runtime/pull-task-input", ok, methods=["POST"]),
                Route("/v1/fleetish", ok, methods=["POST"])],
        middleware=[Middleware(PathScopedLayer, layer=BaseHTTPMiddleware, prefix="/v1/fleet/", layer_kwargs={"dispatch": record})],
    )
    with TestClient(app) as client:  # the lifespan goes through the layer, as it would unscoped
        answers = {path: client.post(path) for path in ("/v1/fleet/pull-messages", "/v1/runtime/pull-task-input", "/v1/fleetish")}
    assert seen == ["/v1/fleet/pull-messages"]
    assert {path: (r.status_code, r.text, r.headers.get("x-layer")) for path, r in answers.items()} == {
        "/v1/fleet/pull-messages": (200, "/v1/fleet/pull-messages", "yes"),
        "/v1/runtime/pull-task-input": (200, "/v1/runtime/pull-task-input", None),
        "/v1/fleetish": (200, "/v1/fleetish", None),
    }


def _answers(app) -> dict[str, tuple[int, str | None, bytes]]:
    """Flower's app's answer to a request of each API, the way each is refused or served."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest
    from flwr.proto.node_pb2 import Node

    body = PullMessagesRequest(node=Node(node_id=7)).SerializeToString()
    protobuf = {"content-type": "application/protobuf"}
    requests = {
        "fleet, unsigned": ("/v1/fleet/pull-messages", protobuf),  # NodeAuthMiddleware: 401
        "fleet, not protobuf": ("/v1/fleet/pull-messages", {"content-type": "application/json"}),  # the translation: 415
        "runtime, no token": ("/v1/runtime/pull-task-input", protobuf),  # the runtime's token check: 401
        "control, sensitive": ("/v1/control/get-login-details", protobuf),  # ControlSensitiveResponseMiddleware: no-store
        "control": ("/v1/control/list-runs", protobuf),
        "no route": ("/v1/nope", protobuf),
    }
    with TestClient(app) as client:
        answers = {}
        for name, (path, headers) in requests.items():
            response = client.post(path, content=body, headers=headers)
            # list-runs answers with the time of day: its status and headers are what the layers set
            answers[name] = (response.status_code, response.headers.get("cache-control"), b"" if name == "control" else response.content)
    return answers


def test_flowers_app_answers_every_api_as_it_does_unscoped(monkeypatch, undo_inline):
    main = pytest.importorskip("flwr.superlink.main")
    monkeypatch.setattr(main, "_get_middleware", main._get_middleware)  # undone after the test
    unscoped = _answers(main.create_app())
    run_handlers_inline()  # as deploy/flower_superlink.py does
    scope_superlink_middleware(outermost=outermost_layers())
    app = main.create_app()
    assert any(layer.cls is PathScopedLayer for layer in app.user_middleware)
    assert app.user_middleware[0].cls is HeldPulls  # outermost: each run of a held pull meets all of Flower's checks
    assert app.user_middleware[1].cls is InlineHandlers
    scoped = _answers(app)
    assert scoped == unscoped
    assert scoped["fleet, unsigned"][0] == 401 and scoped["runtime, no token"][0] == 401
    assert scoped["control, sensitive"][1] == "no-store"


def test_the_deployed_superlink_runs_scoped(tmp_path):
    command = superlink_command(ServerTls(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key"), None)
    assert command[1:3] == ["-m", "deploy.flower_superlink"]


def test_paths_starlette_reads_otherwise_still_meet_the_layer():
    """Starlette's request.url.path, which Flower's layers test, drops tabs and line breaks from
    the ASGI path and may read a leading "//" as a host: such a path, outside the prefix as sent,
    goes through the layer, as it did unscoped."""
    import asyncio

    reached: list[str] = []

    async def app(scope, receive, send) -> None:
        reached.append(f"app {scope['path']}")

    async def layer(scope, receive, send) -> None:
        reached.append(f"layer {scope.get('path', scope['type'])}")

    scoped = PathScopedLayer(app, layer=lambda inner: layer, prefix="/v1/fleet/")
    for scope in ({"type": "http", "path": "/v1/\tfleet/pull-messages"}, {"type": "http", "path": "/v1/fle\net/x"},
                  {"type": "http", "path": "//v1/fleet/pull-messages"}, {"type": "http", "path": "/v1/runtime/x"},
                  {"type": "lifespan"}):
        asyncio.run(scoped(scope, None, None))
    assert reached == ["layer /v1/\tfleet/pull-messages", "layer /v1/fle\net/x", "layer //v1/fleet/pull-messages",
                       "app /v1/runtime/x", "layer lifespan"]


def _where() -> str:
    try:
        asyncio.get_running_loop()
        return "event loop"
    except RuntimeError:
        return "worker thread"


def _thread_app() -> FastAPI:
    """Synchronous handlers and dependencies that say where they ran, one of them raising."""

    def dependency() -> str:
        return _where()

    app = FastAPI()
    for path in ("/inline", "/elsewhere"):
        @app.post(path)
        def handler(dependency: str = Depends(dependency)) -> dict[str, str]:
            return {"dependency": dependency, "handler": _where()}

    for path in ("/inline-refusal", "/elsewhere-refusal"):
        @app.post(path)
        def refusal() -> None:
            raise HTTPException(status_code=418, detail=_where())

    app.add_middleware(InlineHandlers, paths=("/inline", "/inline-refusal"))
    return app


def _ask(app: FastAPI) -> dict[str, tuple[int, object]]:
    with TestClient(app) as client:
        return {path: (r.status_code, r.json()) for path in ("/inline", "/elsewhere", "/inline-refusal", "/elsewhere-refusal")
                if (r := client.post(path))}


def test_synchronous_handlers_run_in_the_event_loop_only_on_the_layers_paths(undo_inline):
    worker = {"dependency": "worker thread", "handler": "worker thread"}
    # the layer alone changes nothing: Flower's worker threads until run_handlers_inline
    assert _ask(_thread_app()) == {"/inline": (200, worker), "/elsewhere": (200, worker),
                                   "/inline-refusal": (418, {"detail": "worker thread"}),
                                   "/elsewhere-refusal": (418, {"detail": "worker thread"})}
    run_handlers_inline()
    assert _ask(_thread_app()) == {"/inline": (200, {"dependency": "event loop", "handler": "event loop"}), "/elsewhere": (200, worker),
                                   "/inline-refusal": (418, {"detail": "event loop"}),  # an error answers as it did
                                   "/elsewhere-refusal": (418, {"detail": "worker thread"})}


def _paths(app) -> set[str]:
    return set(app.openapi()["paths"])


def test_the_inline_routes_are_flowers_message_exchange():
    superlink = importlib.import_module("flwr.superlink.main").create_app()
    supernode = importlib.import_module("flwr.supernode.main").create_app()
    assert set(FLEET_EXCHANGE_ROUTES) <= _paths(superlink)
    assert set(RUNTIME_EXCHANGE_ROUTES) <= _paths(superlink) and set(SUPERNODE_RUNTIME_ROUTES) <= _paths(supernode)
    # nothing of the agent and connector routes (one calls out to the network), nor the Control API;
    # the SuperLink's acquire-task (its automations may fetch a FAB) stays in a worker thread
    inline = set(FLEET_EXCHANGE_ROUTES + SUPERNODE_RUNTIME_ROUTES)
    assert "/v1/runtime/get-connector" in _paths(superlink) and "/v1/runtime/get-connector" not in inline
    assert not [path for path in inline if path.startswith("/v1/control/")]
    assert "/v1/runtime/acquire-task" in _paths(superlink) and "/v1/runtime/acquire-task" not in RUNTIME_EXCHANGE_ROUTES


def _recording_hand_overs(monkeypatch) -> list[tuple[str, bool]]:
    """After run_handlers_inline: each synchronous step a route hands over, with whether it ran in the event loop."""
    from shared import flower_internals

    steps: list[tuple[str, bool]] = []
    for name in THREADPOOL_USERS:
        module = importlib.import_module(name)
        installed = module.run_in_threadpool

        async def recording(func, *args, _installed=installed, **kwargs):
            steps.append((getattr(func, "__name__", repr(func)), flower_internals._IN_EVENT_LOOP.get()))
            return await _installed(func, *args, **kwargs)

        monkeypatch.setattr(module, "run_in_threadpool", recording)
    return steps


def _deployed_superlink_app(monkeypatch) -> tuple[FastAPI, list[tuple[str, bool]]]:
    """Flower's SuperLink app as deploy/flower_superlink.py builds it, and its recorded hand-overs."""
    main = importlib.import_module("flwr.superlink.main")
    monkeypatch.setattr(main, "_get_middleware", main._get_middleware)
    run_handlers_inline()
    scope_superlink_middleware(outermost=outermost_layers())
    return main.create_app(), _recording_hand_overs(monkeypatch)


def test_flowers_own_routes_run_their_steps_where_the_allowlist_says(monkeypatch, undo_inline):
    """Flower's SuperLink app as deploy/flower_superlink.py builds it: an exchange route's steps in
    the event loop, through every layer of Flower's and HeldPulls; the Control API's and the
    SuperLink's acquire-task in worker threads."""
    app, steps = _deployed_superlink_app(monkeypatch)
    protobuf = {"content-type": "application/protobuf"}
    where: dict[str, set[bool]] = {}
    with TestClient(app) as client:
        for path in ("/v1/runtime/pull-messages", "/v1/runtime/acquire-task", "/v1/control/list-runs"):
            steps.clear()
            client.post(path, headers=protobuf)
            where[path] = {inline for _, inline in steps}
    assert where == {"/v1/runtime/pull-messages": {True}, "/v1/runtime/acquire-task": {False}, "/v1/control/list-runs": {False}}


def test_the_supernodes_exchange_routes_run_their_steps_in_the_event_loop(monkeypatch, undo_inline):
    run_supernode_handlers_inline()
    app = importlib.import_module("flwr.supernode.main").create_app()
    steps = _recording_hand_overs(monkeypatch)
    where: dict[str, set[bool]] = {}
    with TestClient(app) as client:
        for path in ("/v1/runtime/acquire-task", "/v1/runtime/pull-task-input", "/v1/runtime/get-connector"):
            steps.clear()
            client.post(path, headers={"content-type": "application/protobuf"})
            where[path] = {inline for _, inline in steps}
    assert where == {"/v1/runtime/acquire-task": {True}, "/v1/runtime/pull-task-input": {True}, "/v1/runtime/get-connector": {False}}


def test_the_supernodes_app_runs_its_clientapps_exchange_in_the_event_loop(undo_inline):
    main = importlib.import_module("flwr.supernode.main")
    protobuf = {"content-type": "application/protobuf"}
    with TestClient(main.create_app()) as client:
        before = [client.post("/v1/runtime/pull-task-input", headers=protobuf).status_code, client.get("/health").status_code]
    run_supernode_handlers_inline()
    run_supernode_handlers_inline()  # twice: still one layer
    app = main.create_app()
    layers = [layer for layer in app.user_middleware if layer.cls is InlineHandlers]
    assert app.user_middleware[0].cls is InlineHandlers and len(layers) == 1
    assert set(layers[0].kwargs["paths"]) == set(SUPERNODE_RUNTIME_ROUTES)
    # without a state (its dependency refuses: 503, now in the event loop) as before, the health check served
    with TestClient(app) as client:
        after = [client.post("/v1/runtime/pull-task-input", headers=protobuf).status_code, client.get("/health").status_code]
    assert after == before == [503, 200]


def _layered_app(seen: list[tuple[str, object, bytes]]) -> Starlette:
    """Two BaseHTTPMiddleware layers as Flower's are (an error translator outermost, then one that
    reads the body first, as the protobuf translation does) over a route; InlineHandlers on "/inline*"."""

    async def endpoint(request: Request) -> PlainTextResponse:
        body = await request.body()
        seen.append(("endpoint", asyncio.current_task(), body))
        if request.url.path.endswith("-fails"):
            raise ValueError("below")
        return PlainTextResponse(f"answer to {body.decode()}", headers={"x-below": "1"})

    class Translating(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            seen.append(("outer", asyncio.current_task(), b""))
            try:
                response = await call_next(request)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=500)
            response.headers["x-outer"] = "1"
            return response

    async def reading(request, call_next):
        seen.append(("inner", asyncio.current_task(), await request.body()))
        return await call_next(request)

    paths = ("/inline", "/inline-fails", "/elsewhere", "/elsewhere-fails")
    return Starlette(routes=[Route(path, endpoint, methods=["POST"]) for path in paths],
                     middleware=[Middleware(InlineHandlers, paths=paths[:2]), Middleware(Translating),
                                 Middleware(BaseHTTPMiddleware, dispatch=reading)])


def _answers_and_tasks(seen: list[tuple[str, object, bytes]]) -> dict[str, tuple[object, ...]]:
    """path -> (status, body, the two layers' headers, whether the route ran in the outer layer's
    task, the bodies the inner layer and the route read)."""
    answers: dict[str, tuple[object, ...]] = {}
    with TestClient(_layered_app(seen)) as client:
        for path in ("/inline", "/inline-fails", "/elsewhere", "/elsewhere-fails"):
            seen.clear()
            r = client.post(path, content=b"a question")
            tasks = {name: task for name, task, _ in seen}
            answers[path] = (r.status_code, r.text, r.headers.get("x-below"), r.headers.get("x-outer"),
                             tasks["endpoint"] is tasks["outer"], [body for name, _, body in seen if name != "outer"])
    return answers


def test_layers_call_the_app_below_in_the_requests_task_only_on_the_inline_paths(undo_inline):
    """`run_handlers_inline`: on InlineHandlers' paths a BaseHTTPMiddleware layer awaits the app
    below in the request's own task (no task and streams per layer), and every answer is the
    same as Starlette's: status, body, each layer's headers, an exception below translated by
    the layer above, the body a layer read replayed to the route."""
    seen: list[tuple[str, object, bytes]] = []
    read = [b"a question", b"a question"]
    starlettes = _answers_and_tasks(seen)
    assert starlettes == {"/inline": (200, "answer to a question", "1", "1", False, read),
                          "/inline-fails": (500, '{"error":"below"}', None, None, False, read),
                          "/elsewhere": (200, "answer to a question", "1", "1", False, read),
                          "/elsewhere-fails": (500, '{"error":"below"}', None, None, False, read)}
    run_handlers_inline()
    ours = _answers_and_tasks(seen)
    for path in ("/inline", "/inline-fails"):
        assert ours[path] == (*starlettes[path][:4], True, read)
    for path in ("/elsewhere", "/elsewhere-fails"):
        assert ours[path] == starlettes[path]


@pytest.mark.parametrize("below", ["silent", "fails-after-answering"])
def test_a_layer_meets_a_silent_or_late_failing_app_as_starlette_has_it(undo_inline, below):
    """No response from the app below: Starlette's RuntimeError. An exception after the app's
    response began: the response is sent, then the exception raised."""

    async def app(scope, receive, send):
        await receive()
        if below == "fails-after-answering":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            raise LookupError("after the answer")

    async def passing(request, call_next):
        return await call_next(request)

    def outcome() -> tuple[str, str]:
        stack = InlineHandlers(BaseHTTPMiddleware(app, dispatch=passing), paths=("/inline",))
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/inline", "raw_path": b"/inline", "headers": [], "query_string": b"",
                 "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": "", "http_version": "1.1"}
        try:
            asyncio.run(stack(scope, receive, send))
        except Exception as exc:
            # the body as the client gets it (Starlette sends it in chunks, the buffered layer whole)
            return type(exc).__name__, f"{exc} {b''.join(m.get('body', b'') for m in sent if m['type'] == 'http.response.body')!r}"
        return "answered", str(sent)

    starlettes = outcome()
    run_handlers_inline()
    assert outcome() == starlettes
    assert starlettes[0] == ("RuntimeError" if below == "silent" else "LookupError")
    assert starlettes[1] == ("No response returned. b''" if below == "silent" else "after the answer b'ok'")


def _exchange_handlers() -> dict[str, object]:
    """path -> Flower's own handler, of the Fleet routes and of the Runtime routes (the SuperLink's
    and each SuperNode's share one router)."""
    routers = [importlib.import_module("flwr.superlink.routers.fleet.router").router,
               importlib.import_module("flwr.supercore.routers.runtime.router").router]
    return {route.path: route.endpoint.__wrapped__ for router in routers for route in router.routes}


def test_the_inline_routes_are_synchronous_handlers_of_one_message():
    """What the layers' in-task run assumes of each route (`_dispatch_in_this_task`): a
    synchronous handler that returns one protobuf message (no stream, no background work, no
    wait for the client), so its whole response is there when the layer above looks."""
    import typing

    from google.protobuf.message import Message

    handlers = _exchange_handlers()
    for path in FLEET_EXCHANGE_ROUTES + SUPERNODE_RUNTIME_ROUTES:
        handler = handlers[path]
        assert not inspect.iscoroutinefunction(handler), path
        assert issubclass(typing.get_type_hints(handler)["return"], Message), path
    # the check can fail: Flower's Control API streams its logs
    control = importlib.import_module("flwr.superlink.routers.control.router").router
    streams = {route.path for route in control.routes
               if typing.get_origin(typing.get_type_hints(route.endpoint.__wrapped__)["return"]) is not None}
    assert "/v1/control/stream-logs" in streams


def test_a_fleet_requests_signature_check_runs_in_the_event_loop(monkeypatch, undo_inline):
    """The Fleet API's node authentication (NodeAuthMiddleware's `authenticate_node`) on an
    exchange route runs in the event loop, through every layer in its request's task; it still
    refuses an unsigned request."""
    app, steps = _deployed_superlink_app(monkeypatch)
    with TestClient(app) as client:
        refused = client.post("/v1/fleet/pull-messages", headers={"content-type": "application/protobuf"})
    assert refused.status_code == 401
    assert ("authenticate_node", True) in steps
