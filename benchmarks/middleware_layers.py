"""CPU per request of Starlette's BaseHTTPMiddleware layers, as Starlette runs them and as
`run_handlers_inline` runs them on InlineHandlers' paths (shared/flower_internals.py
`_dispatch_in_this_task`: the app below awaited in the request's own task, its response buffered).

    python benchmarks/middleware_layers.py [--requests 3000] [--repeats 5]

A Starlette app with 0, 1, 2 or 4 pass-through layers (Flower puts two on every request of its
SuperNode's Runtime API and of the SuperLink's, four on the Fleet API's) over one route that reads
a 200-byte body, called directly through ASGI in one event loop (no server, no client: the layers'
own cost). Process CPU time per request, the median of REPEATS runs of REQUESTS requests each,
both ways side by side in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from shared.flower_internals import InlineHandlers, run_handlers_inline

LAYERS = (0, 1, 2, 4)
BODY = b"x" * 200


async def _endpoint(request: Request) -> Response:
    return Response(content=(await request.body())[:16], media_type="application/protobuf")


async def _passing(request: Request, call_next: Any) -> Response:
    return await call_next(request)


def _app(layers: int, inline: bool) -> Starlette:
    middleware = [Middleware(InlineHandlers, paths=("/inline",))]
    middleware += [Middleware(BaseHTTPMiddleware, dispatch=_passing) for _ in range(layers)]
    return Starlette(routes=[Route(path, _endpoint, methods=["POST"]) for path in ("/inline", "/starlette")], middleware=middleware)


async def _request(app: Starlette, path: str) -> None:
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:  # as a server does: nothing more until the client goes
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/protobuf")], "scheme": "http", "server": ("127.0.0.1", 80),
             "client": ("127.0.0.1", 1), "root_path": "", "http_version": "1.1", "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{path}: {sent}")


async def _cpu_per_request(app: Starlette, path: str, requests: int) -> float:
    for _ in range(100):  # warm-up
        await _request(app, path)
    started = time.process_time()
    for _ in range(requests):
        await _request(app, path)
    return (time.process_time() - started) / requests * 1e6


async def _measure(requests: int, repeats: int) -> list[dict[str, Any]]:
    records = []
    for layers in LAYERS:
        app = _app(layers, inline=True)
        runs: dict[str, list[float]] = {"starlette": [], "inline": []}
        for _ in range(repeats):  # interleaved: both ways in each repeat
            runs["starlette"].append(await _cpu_per_request(app, "/starlette", requests))
            runs["inline"].append(await _cpu_per_request(app, "/inline", requests))
        records.append({"layers": layers, **{f"{way}_us": round(statistics.median(values), 1) for way, values in runs.items()}})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run_handlers_inline()
    records = asyncio.run(_measure(args.requests, args.repeats))
    print(f"{datetime.now(UTC).isoformat(timespec='seconds')}  {platform.machine()}, {os.cpu_count()} cores  "
          f"CPU per request, median of {args.repeats} x {args.requests} requests")
    print("layers | Starlette (us) | in the request's task (us)")
    for record in records:
        print(f"{record['layers']:6d} | {record['starlette_us']:14.1f} | {record['inline_us']:26.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
