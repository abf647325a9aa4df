"""The standing pool's actors, as Ray sees them: what each does as it starts, whether they all
still answer, and killing them.

One pool of Flower's ClientApp actors serves every run of a warm runtime; the actors keep
only their imports and the app's per-process caches of immutable data (client/node_data.py).
An actor that died (killed, out of memory) would fail every message of every later run, so
the runtime checks them before each run and replaces a pool with a dead one; a run given up
on kills them, so that its messages in flight fail at once. The pool itself is Flower's
(shared/flower_internals.py reaches into it); this module uses Ray's public API.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def warm_up_actor(modules: Sequence[str], simulations: Sequence[tuple[Any, int]]) -> None:
    """Runs in each ClientApp actor as it starts (Flower's `on_actor_init_fn`), while the
    harness is busy elsewhere: what the app's handlers import on a node's first message, and
    the simulated nodes' data, are ready before a run's first round instead of in it."""
    # best effort: whatever fails here fails again, with its message, in the node's reply;
    # an actor that raised here would be dead for every later run
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            log.warning("actor warm-up: cannot import %s: %s", module, exc)
    from client.node_data import prepare_simulated_nodes

    for data, num_nodes in simulations:
        try:
            prepare_simulated_nodes(data, num_nodes)
        except Exception as exc:
            log.warning("actor warm-up: cannot prepare the data of %s nodes: %s", num_nodes, exc)


def all_answer(pings: Sequence[Any], expected: int, timeout: float = 300.0) -> bool:
    """Whether `expected` actors answered `pings` (one object ref per actor, resolved when the
    actor answers) within `timeout`: an actor still starting answers once it has started."""
    import ray
    from ray.exceptions import RayError

    answered, late = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
    alive = 0
    for ping in answered:
        try:
            ray.get(ping)
            alive += 1
        except RayError:
            pass
    return alive == expected and not late


def kill_actors(actors: Iterable[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)
