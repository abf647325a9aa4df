"""The SuperLink process: Flower's `flower-superlink`, with each of its API-specific HTTP layers
applied only under that API's paths.

    python -m deploy.flower_superlink [flower-superlink arguments]

deploy.superlink starts the SuperLink this way (`superlink_command`). Flower 1.42 passes every
request, a SuperNode's pull of a message as much as `flwr run`, through all eight HTTP layers of
its one app; six of them act only on the Control API or only on the Fleet API and pass the rest
straight on. Here they are skipped outside their API (shared.flower_internals
`scope_superlink_middleware`): a deployed round's requests cost the SuperLink less CPU, and
every request meets the same checks as in `flower-superlink`.
"""

from __future__ import annotations

import sys

from shared.flower_internals import run_flower_command, scope_superlink_middleware


def main(argv: list[str] | None = None) -> int:
    scope_superlink_middleware()
    run_flower_command("flower-superlink", sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
