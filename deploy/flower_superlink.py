"""The SuperLink process: Flower's `flower-superlink`, with each of its API-specific HTTP layers
applied only under that API's paths, the Fleet and Runtime handlers run in its event loop, and
empty pulls held until there is something to pull.

    python -m deploy.flower_superlink [flower-superlink arguments]

deploy.superlink starts the SuperLink this way (`superlink_command`). Flower 1.42 passes every
request, a SuperNode's pull of a message as much as `flwr run`, through all eight HTTP layers of
its one app; six of them act only on the Control API or only on the Fleet API and pass the rest
straight on. Here they are skipped outside their API (shared.flower_internals
`scope_superlink_middleware`): a deployed round's requests cost the SuperLink less CPU, and
every request meets the same checks as in `flower-superlink`. Before all of them,
deploy.held_pulls keeps Flower's empty answer to a pull back until a message for the puller has
been pushed (or for a few seconds), so SuperNodes and the ServerApp learn of a message when it
arrives, not at their next look. Below it, the synchronous handlers and dependencies of the Fleet
and Runtime routes of Flower's message exchange (a pull, a push, an object, a heartbeat: work on
the state alone) run in the event loop's thread instead of each in one of anyio's worker threads
(shared.flower_internals `run_handlers_inline`, FLEET_EXCHANGE_ROUTES, RUNTIME_EXCHANGE_ROUTES),
and on those routes each of Flower's BaseHTTPMiddleware layers awaits the layers below in the
request's own task, its response buffered, rather than in a task of its own with the response
streamed back; every other route keeps Flower's worker threads and Starlette's layers. With the
SQLite state such a handler waiting for the database's lock holds up the SuperLink's other
requests meanwhile.
"""

from __future__ import annotations

import sys

from starlette.middleware import Middleware

from deploy.held_pulls import HeldPulls
from shared.flower_internals import (
    FLEET_EXCHANGE_ROUTES,
    PULL_ROUTES,
    RUNTIME_EXCHANGE_ROUTES,
    InlineHandlers,
    run_flower_command,
    run_handlers_inline,
    scope_superlink_middleware,
    skip_unsent_telemetry,
)


def outermost_layers() -> list[Middleware]:
    """The layers before all of Flower's, outermost first."""
    return [Middleware(HeldPulls, routes=PULL_ROUTES), Middleware(InlineHandlers, paths=FLEET_EXCHANGE_ROUTES + RUNTIME_EXCHANGE_ROUTES)]


def main(argv: list[str] | None = None) -> int:
    run_handlers_inline()
    scope_superlink_middleware(outermost=outermost_layers())
    skip_unsent_telemetry()
    run_flower_command("flower-superlink", sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
