"""Every private or undocumented Flower (and Ray) name the project uses, fenced in one module.

Flower has no public API for what the warm simulation runtime (simulations/runtime/) does: run
Flower's simulation engine in this process, as `flwr-simulation` does, over a standing pool of
Flower's ClientApp actors. Each name of Flower's or Ray's insides that takes is used here, behind
a small function, and nowhere else. PINNED lists them with the parameters and attributes the
project relies on; tests/test_flower_internals.py checks each against the installed Flower.
Written for flwr FLOWER_VERSION: on any other, `supported()` is False and the runtime takes
Flower's public path instead (simulations/runtime/public_path.py). Nothing private is imported
at module level, so this module loads on any Flower version.

Application code (client/, server/, shared/) uses only Flower's public `flwr.app`,
`flwr.clientapp` and `flwr.serverapp`.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flwr.app import Message

FLOWER_VERSION = "1.42.0"


@dataclass(frozen=True)
class Pinned:
    """One private name: `name` (dotted for a class member) in `module`; the keyword parameters
    the project passes it; the attributes it reads or sets on it or on its instances; text its
    source must hold for a behaviour the project relies on."""

    module: str
    name: str
    parameters: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    source: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


_RAY_ACTOR = "flwr.simulation.ray_transport.ray_actor"
_RAY_BACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"
_GRID = "flwr.superlink.grid.inmemory_grid"

PINNED: tuple[Pinned, ...] = (
    # the engine, run as `flwr-simulation` runs it (`run_engine`)
    Pinned("flwr.simulation.run_simulation", "_run_simulation", parameters=(
        "num_supernodes", "exit_event", "server_app", "client_app_attr", "backend_config", "app_dir", "run", "server_app_context", "is_app")),
    Pinned("flwr.supercore.run", "Run", attributes=("run_id", "override_config", "primary_task_id", "federation_id")),
    Pinned("flwr.supercore.run", "Run.create_empty", parameters=("run_id",)),
    Pinned("flwr.supercore.task_identity", "TaskIdentity", attributes=("task_id", "run_id", "node_id", "_task_id", "_run_id", "_node_id")),
    Pinned("flwr.common.constant", "SUPERLINK_NODE_ID"),
    Pinned("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    Pinned("flwr.common.config", "get_fused_config_from_dir", parameters=("project_dir", "override_config")),
    Pinned("flwr.supercore.telemetry", "EventType", attributes=("FLWR_SIMULATION_RUN_LEAVE",)),
    # the ServerApp, loaded as Flower loads it and called with keywords (`load_server_app`)
    Pinned("flwr.supercore.object_ref", "load_app", parameters=("module_attribute_str", "error_type", "project_dir")),
    Pinned("flwr.serverapp.server_app", "LoadServerAppError"),
    Pinned("flwr.server.run_serverapp", "run", source=("server_app(grid=grid, context=context)",)),
    # the standing pool of actors (`new_actor_pool`, `free_actors`, `every_actor`, `pool_size`)
    Pinned(_RAY_ACTOR, "BasicActorPool", parameters=("actor_type", "client_resources", "actor_kwargs"),
           attributes=("pool", "num_actors", "actors_capacity", "add_actors_to_pool", "_future_to_actor")),
    Pinned(_RAY_ACTOR, "ClientAppActor", parameters=("on_actor_init_fn",)),
    # the backend swap (`standing_backend`): Flower looks the class up in its module for each run
    Pinned(_RAY_BACKEND, "RayBackend", attributes=("build", "terminate", "pool", "app_fn")),
    Pinned(_RAY_BACKEND, "RayBackend.build", parameters=("app_fn",)),
    # a message whose actor died: Flower puts the dead actor back in the pool (`replace_dead_actors`)
    Pinned(_RAY_BACKEND, "RayBackend.process_message", parameters=("message", "context"),
           source=("self.pool.add_actor_back_to_pool(future)",)),
    Pinned(_RAY_BACKEND, "RayBackend.init_ray", source=("if not ray.is_initialized():",)),
    Pinned("flwr.server.superlink.fleet.vce.vce_api", "start_vce", source=("from .backend.raybackend import RayBackend",)),
    # the grid's exchange, re-implemented with checks (`CheckedGrid`)
    Pinned(_GRID, "InMemoryGrid", attributes=("pull_interval", "push_messages", "pull_messages", "get_node_ids")),
    Pinned(_GRID, "InMemoryGrid.send_and_receive", parameters=("messages", "timeout"),
           source=("self.push_messages(", "self.pull_messages(", "reply_to_message_id", "time.sleep(self.pull_interval)")),
    # the test helpers' message identity and serialization (`server_identity`, `wire_bytes`)
    Pinned("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
    # Ray: every actor's readiness method (`actor_ready`), the driver's logger (`quiet_ray_driver`)
    Pinned("ray.actor", "_modify_class", source=("def __ray_ready__",)),
    Pinned("ray._private.worker", "logger"),
    Pinned("ray._private.worker", "init", source=("SIGTERM handler is not set",)),
)


def resolve(pinned: Pinned) -> Any:
    """The pinned object itself; raises ImportError or AttributeError when it is gone."""
    value: Any = importlib.import_module(pinned.module)
    for part in pinned.name.split("."):
        value = getattr(value, part)
    return value


def installed_version() -> str | None:
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return None


def version_matches() -> bool:
    """Whether the installed flwr is the one this module was written for (cheap: imports nothing)."""
    return installed_version() == FLOWER_VERSION


def unresolved() -> list[str]:
    """The pinned names that do not import (each costs the import of its module, Ray's included)."""
    missing = []
    for pinned in PINNED:
        try:
            resolve(pinned)
        except (ImportError, AttributeError):
            missing.append(pinned.path)
    return missing


def supported() -> bool:
    """Whether the warm runtime may use Flower's internals: the installed flwr is FLOWER_VERSION
    and every pinned name still imports."""
    return version_matches() and not unresolved()


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


@contextmanager
def quiet_ray_driver() -> Iterator[None]:
    """Joining Ray from a thread other than the main one logs that it set no SIGTERM handler
    (the harness has its own: deploy.processes.terminate_as_exit)."""
    worker_logger = logging.getLogger("ray._private.worker")
    level = worker_logger.level
    worker_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        worker_logger.setLevel(level)


def load_server_app(reference: str, project_dir: Path) -> Any:
    """The ServerApp `reference` ("module:attribute") names, loaded as Flower loads it."""
    from flwr.serverapp.server_app import LoadServerAppError
    from flwr.supercore.object_ref import load_app

    return load_app(reference, LoadServerAppError, project_dir)


def new_actor_pool(client_resources: Mapping[str, float], on_actor_init: Callable[[], None]) -> Any:
    """Flower's pool of ClientApp actors, as many as the Ray cluster holds; each runs
    `on_actor_init` as it starts, in the background."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    pool = BasicActorPool(ClientAppActor, dict(client_resources), {"on_actor_init_fn": on_actor_init})
    pool.add_actors_to_pool(pool.actors_capacity)
    return pool


def free_actors(pool: Any) -> list[Any]:
    return list(pool.pool)


def every_actor(pool: Any) -> list[Any]:
    """Free or busy: Flower's pool keeps the busy ones by the future of their job."""
    return list(pool.pool) + list(pool._future_to_actor.values())


def pool_size(pool: Any) -> int:
    return int(pool.num_actors)


def actor_ready(actor: Any) -> Any:
    """A Ray object ref that resolves once `actor` answers (Ray's readiness method of every actor)."""
    return actor.__ray_ready__.remote()


def replace_dead_actors(pool: Any, timeout: float = 5.0) -> int:
    """Swap every idle actor of `pool` that does not answer for a new one; how many were swapped.
    Flower returns the actor of a failed message to its pool even when the actor died, so one
    killed worker would fail every message routed to it for the rest of the run."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    dead = []
    for actor in list(pool.pool):
        try:
            ray.get(actor_ready(actor), timeout=timeout)
        except RayActorError:
            dead.append(actor)
        except GetTimeoutError:
            continue  # still starting (a replacement builds its data): alive
    for actor in dead:
        try:
            pool.pool.remove(actor)
        except ValueError:
            continue  # another thread took it meanwhile: its message fails and that thread swaps it
        pool.num_actors -= 1
        pool.add_actors_to_pool(1)
    return len(dead)


@contextmanager
def standing_backend(pool: Any, built: threading.Event) -> Iterator[None]:
    """Flower's engine builds its Ray backend by class name at the start of a run: while this
    lasts, that class takes the standing `pool` (setting `built`) and leaves it, and Ray, up at
    the end (Flower's own kills the actors and shuts Ray down after every run)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from ray.exceptions import RayActorError

    flower_backend = raybackend.RayBackend

    class StandingPoolBackend(flower_backend):  # type: ignore[misc, valid-type]
        def build(self, app_fn: Any) -> None:
            self.pool = pool
            self.app_fn = app_fn
            built.set()

        def terminate(self) -> None:
            pass

        def process_message(self, message: Any, context: Any) -> Any:
            try:
                return super().process_message(message, context)
            except RayActorError:
                replace_dead_actors(self.pool)  # else every later message sent to it fails too
                raise

    raybackend.RayBackend = StandingPoolBackend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = flower_backend  # type: ignore[misc]


class CheckedGrid:
    """Flower's grid of one run, calling `check` (which raises to stop the ServerApp) before
    every exchange with the nodes and at every pull while it waits for replies. Everything
    else is Flower's grid."""

    def __init__(self, grid: Any, check: Callable[[], None]) -> None:
        self._grid, self._check = grid, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._grid.push_messages(*args, **kwargs)

    def pull_messages(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._grid.pull_messages(*args, **kwargs)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Flower's InMemoryGrid.send_and_receive (push, then pull every `pull_interval` until
        every reply is in or `timeout`), checking at every pull: replies may never come once
        the run's actors are gone."""
        self._check()
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            self._check()
            arrived = list(self._grid.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if waiting:
                time.sleep(self._grid.pull_interval)
        self._check()  # replies that came back because the run's actors were killed are not used
        return replies


def run_engine(
    server_app: Any, run_config: Mapping[str, Any], num_supernodes: int, client_resources: Mapping[str, float],
    app_dir: Path, client_app: str,
) -> None:
    """What `flwr-simulation` does with a run the SuperLink hands it, minus the SuperLink: a new
    run id, the run config fused from `app_dir`'s pyproject.toml and `run_config`, the ServerApp
    `server_app` and the ClientApp `client_app` ("module:attribute") in Flower's engine."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=secrets.randbits(63))
    run.override_config = dict(run_config)
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(app_dir, dict(run_config)))
    _run_simulation(
        num_supernodes=num_supernodes, exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
        server_app=server_app, client_app_attr=client_app,
        backend_config={"client_resources": dict(client_resources)},
        app_dir=str(app_dir), run=run, server_app_context=context, is_app=True,
    )
