"""Flower's simulation runtime, hosted in the harness's process and kept warm across runs.

`flwr run` hands every run to a fresh `flwr-simulation` process: it imports Flower, starts a
Ray instance (or joins one), starts a pool of ClientApp actors (each a new Python process
importing Flower and the app), and tears all of that down when the run ends. On the quick
experiment that was more than half of a 10-round run's wall time (docs/BENCHMARKS.md), and
Flower 1.42 cannot keep any of it up between runs.

So the harness runs Flower's simulation engine itself, as `flwr-simulation` does:
`flwr.simulation.run_simulation._run_simulation` with the ServerApp and ClientApp that
pyproject.toml names and the run config fused from pyproject.toml and the run's overrides;
inside it, Flower's InMemoryGrid, LinkState, engine threads, Ray backend and ClientAppActor
pool. One Ray cluster and one pool of Flower's actors serve all the runs of a process. Each
run still gets its own run id, LinkState, node contexts and ServerApp thread; the actors keep
only their imports and the app's per-process caches of immutable data (client/node_data.py).

Two interventions in Flower, both for the duration of a run: the engine's Ray backend class
is replaced by a subclass whose `build` takes the standing pool and whose `terminate` leaves
it up (Flower's own kills the actors and shuts Ray down after every run), and the ServerApp is
called through a wrapper that says when it has returned. flwr is pinned (pyproject.toml) and
tests/test_simulation.py runs this path end to end.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import tomli_w

from client.handlers import first_message_imports
from deploy.processes import free_port, stop_tree, terminate_as_exit, wait_for_port
from shared.config import RunConfig
from shared.config_table import app_components
from simulations import PROJECT_ROOT

BIN = Path(sys.executable).parent
RUNTIME_MARK = "FEDADS_SIMULATION_RUNTIME"  # in every Ray process's environment: its runtime's work dir

FLOWER_LOGGER = "flwr"


class SimulationError(RuntimeError):
    pass


def warm_up_actor(modules: Sequence[str], simulations: Sequence[tuple[Any, int]]) -> None:
    """Runs in each ClientApp actor as it starts (Flower's `on_actor_init_fn`), while the
    harness is busy elsewhere: what the app's handlers import on a node's first message, and
    the simulated nodes' data, are ready before a run's first round instead of in it."""
    # best effort: whatever fails here fails again, with its message, in the node's reply;
    # an actor that raised here would be dead for every later run
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).warning("actor warm-up: cannot import %s: %s", module, exc)
    from client.node_data import prepare_simulated_nodes

    for data, num_nodes in simulations:
        try:
            prepare_simulated_nodes(data, num_nodes)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).warning("actor warm-up: cannot prepare the data of %s nodes: %s", num_nodes, exc)


class RunAbandoned(RuntimeError):
    """Raised in an abandoned run's ServerApp, at its next exchange with the nodes."""


class _AbandonableGrid:
    """Flower's grid of one run, which stops the run's ServerApp at its next exchange with the
    nodes once the harness has abandoned the run (a timeout, an interruption): an abandoned
    run writes no further round. Everything else is Flower's grid."""

    def __init__(self, grid: Any, abandoned: threading.Event) -> None:
        self._grid, self._abandoned = grid, abandoned

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _check(self) -> None:
        if self._abandoned.is_set():
            raise RunAbandoned("the harness abandoned this run")

    def push_messages(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._grid.push_messages(*args, **kwargs)

    def pull_messages(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._grid.pull_messages(*args, **kwargs)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Flower's InMemoryGrid.send_and_receive (push, then pull every `pull_interval` until
        every reply is in or `timeout`), checking for abandonment at every pull: replies may
        never come once the run's actors are gone."""
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


class _ServerAppWatch:
    """The project's ServerApp, called as Flower calls it, once the run's virtual SuperNodes
    are all registered, over a grid the harness can stop it through, and telling when it has
    returned: the run's outputs are complete then, and the engine's own shut-down (its worker
    threads wait out a 1 s queue timeout) need not be waited for.

    Flower's engine starts the ServerApp's thread before it registers the nodes; a ServerApp
    that asks for nodes at once (a resumed run skips round 0) could sample only those
    registered so far."""

    def __init__(self, app: Any, returned: threading.Event, num_nodes: int) -> None:
        self.app, self.returned, self.num_nodes = app, returned, num_nodes
        self.abandoned = threading.Event()
        self.error: BaseException | None = None

    def __call__(self, grid: Any, context: Any) -> None:
        try:
            deadline = time.monotonic() + 60
            while len(grid.get_node_ids()) < self.num_nodes and time.monotonic() < deadline:
                time.sleep(0.01)  # the engine registers the nodes right after starting this thread
            self.app(grid=_AbandonableGrid(grid, self.abandoned), context=context)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.returned.set()


def _load_server_app() -> Any:
    from flwr.serverapp.server_app import LoadServerAppError
    from flwr.supercore.object_ref import load_app

    try:
        return load_app(app_components()["serverapp"], LoadServerAppError, PROJECT_ROOT)
    except Exception as exc:  # noqa: BLE001 - any import error of the app
        raise SimulationError(f"cannot load the ServerApp: {exc}") from exc


class _RunLog(logging.Handler):
    """Flower's log lines of one run: kept for the run's log file, and streamed on."""

    def __init__(self, stream_to: Any) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.stream_to = stream_to

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname:<8}: {record.getMessage()}\n"
        self.lines.append(line)
        if self.stream_to is not None:
            self.stream_to.write(line)
            self.stream_to.flush()


@contextmanager
def _flower_log_to(handler: _RunLog) -> Iterator[None]:
    """Flower's logger writes to this run's handler instead of the console."""
    logger = logging.getLogger(FLOWER_LOGGER)
    console, propagate = list(logger.handlers), logger.propagate
    for existing in console:
        logger.removeHandler(existing)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        for existing in console:
            logger.addHandler(existing)


@contextmanager
def _quiet_ray_driver() -> Iterator[None]:
    """Joining Ray from a thread other than the main one logs that it set no SIGTERM handler
    (the harness has its own: launcher.terminate_as_exit)."""
    worker_logger = logging.getLogger("ray._private.worker")
    level = worker_logger.level
    worker_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        worker_logger.setLevel(level)


class SimulationRuntime:
    """One Ray cluster and one pool of Flower's ClientApp actors, for many runs.

        with SimulationRuntime(work_dir) as runtime:
            runtime.run(run_config, num_supernodes, run_dir)
            ...

    `start` returns at once: Ray's head node boots in its own process group (about 4 s), and a
    thread joins it as this process's Ray driver and starts the actors; each actor imports
    `actor_imports` (client/handlers.first_message_imports) and builds the nodes' data of
    `simulations` (pairs of a RunConfig and its number of nodes) as it starts. Meanwhile the
    caller can work (a sweep runs its baselines); the first run waits for the rest. Ray is not
    started from this process itself: `ray.init()` forks Ray's processes with a `preexec_fn`,
    which deadlocked when another thread was busy in numpy's BLAS.

    Ray's session files live in a short temporary folder (Unix socket paths are limited),
    named in `work_dir/ray-temp-dir`; its log is `work_dir/ray.log`; every Ray process has
    RUNTIME_MARK=work_dir in its environment, so that checks can find them. All of them (Ray's
    own, and the actors) stop on `close`, also when a run failed or was interrupted. One
    runtime at a time per process: the process is a Ray driver, and runs swap Flower's backend
    class while they last.
    """

    def __init__(
        self, work_dir: str | Path, num_cpus: int | None = None, cpus_per_client: float = 1.0,
        actor_imports: Sequence[str] = ("client.handlers",), simulations: Sequence[tuple[Any, int]] = (),
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.client_resources = {"num_cpus": cpus_per_client, "num_gpus": 0.0}
        self.actor_imports = tuple(actor_imports)
        self.simulations = tuple(simulations)
        self.connect_seconds = 0.0  # from `start` until this process was a driver with its actors asked for
        self.start_wait_seconds = 0.0  # how long the first run waited for that
        self.stop_wait_seconds = 0.0  # how long `close` waited for Ray to be gone
        self._head: subprocess.Popen | None = None
        self._temp_dir: str | None = None
        self._pool: Any = None
        self._connecting: threading.Thread | None = None
        self._connect_error: BaseException | None = None
        self._closing: threading.Thread | None = None
        self._lock = threading.Lock()  # one run at a time: the pool and the backend swap are shared

    def __enter__(self) -> SimulationRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        started = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._temp_dir = tempfile.mkdtemp(prefix="fedads-ray-")
        (self.work_dir / "ray-temp-dir").write_text(self._temp_dir)
        port = free_port()
        # Ray's processes get this environment: its workers import this checkout's packages
        # whether or not it is installed, and without a runtime env (which would make Ray start
        # every worker through a second interpreter)
        pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0", RUNTIME_MARK: str(self.work_dir)}
        with (self.work_dir / "ray.log").open("w") as log_file:
            self._head = subprocess.Popen(
                [
                    str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.num_cpus}",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self._temp_dir}",
                ],
                env=env, cwd=self.work_dir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopping it stops every Ray process
            )

        def connect() -> None:
            try:
                import ray

                wait_for_port(port, self._head, self.work_dir / "ray.log")
                with _quiet_ray_driver():
                    ray.init(address=f"127.0.0.1:{port}", logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)
                self._pool = self._new_pool()  # its actors start in the background
                self.connect_seconds = time.perf_counter() - started
            except BaseException as exc:  # noqa: BLE001 - raised by the first run
                self._connect_error = exc

        self._connecting = threading.Thread(target=connect, name="ray-connect", daemon=True)
        self._connecting.start()

    def _new_pool(self) -> Any:
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

        pool = BasicActorPool(ClientAppActor, self.client_resources, {"on_actor_init_fn": partial(warm_up_actor, self.actor_imports, self.simulations)})
        pool.add_actors_to_pool(pool.actors_capacity)
        return pool

    def _wait_connected(self) -> None:
        if self._connecting is not None:
            waiting = time.perf_counter()
            self._connecting.join()
            self._connecting = None
            self.start_wait_seconds = time.perf_counter() - waiting
        if self._connect_error is not None:
            raise SimulationError(f"Ray did not start: {self._connect_error}") from self._connect_error
        if self._pool is None:
            raise SimulationError("the simulation runtime is not running")

    def begin_close(self) -> None:
        """Start stopping Ray and the actors in the background, so that the caller can write its
        reports meanwhile; `close` waits until they are gone."""
        if self._closing is None:
            self._closing = threading.Thread(target=self._shut_down, name="ray-stop", daemon=True)
            self._closing.start()

    def close(self) -> None:
        self.begin_close()
        if self._closing is not None:
            waiting = time.perf_counter()
            self._closing.join()
            self.stop_wait_seconds += time.perf_counter() - waiting

    def _shut_down(self) -> None:
        import ray

        if self._connecting is not None:
            self._connecting.join()  # a driver half-way connected is disconnected below
        self._pool = None
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if self._head is not None:
                # the cluster is this runtime's alone and keeps nothing: killed outright (as `ray
                # stop --force` does), not through Ray's graceful shut-down of several seconds
                stop_tree(self._head, signals=(signal.SIGKILL,))
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)

    def run(
        self,
        run_config: Mapping[str, Any],
        num_supernodes: int,
        work_dir: str | Path,
        stream_to: Any = None,
        timeout: float | None = None,
    ) -> str:
        """One run of the project's app; returns Flower's log of it (also in
        `work_dir/flwr-run.log`). Raises SimulationError when the run fails or times out;
        a run timed out or interrupted is abandoned (`_abandon`) and the runtime closed."""
        self._wait_connected()
        self._check_actors()
        work_dir = Path(work_dir).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        log = _RunLog(stream_to)
        finished = threading.Event()  # the ServerApp returned, or the engine ended without it
        backend_built = threading.Event()
        watch = _ServerAppWatch(_load_server_app(), finished, int(num_supernodes))
        outcome: dict[str, BaseException] = {}

        def engine() -> None:
            try:
                self._run_engine(watch, dict(run_config), int(num_supernodes))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc
            finally:
                finished.set()

        with self._lock, _flower_log_to(log), _standing_backend(self._pool, backend_built):
            # a daemon thread, as are the engine's own (they inherit it); Python still joins the
            # engine's executor threads at exit, which is why an abandoned run is stopped too
            thread = threading.Thread(target=engine, name="flower-simulation", daemon=True)
            thread.start()
            try:
                if not finished.wait(timeout):
                    self._abandon(watch, thread)
                    raise SimulationError(f"the simulation ran past {timeout:.0f}s; log in {work_dir / 'flwr-run.log'}")
                if watch.error is not None or "error" in outcome:
                    watch.abandoned.set()  # the engine may have failed under a running ServerApp: stop it
                    thread.join()  # Flower finishes its error handling and logging
                else:
                    # the ServerApp may return before the engine built its backend (a resumed run
                    # with nothing left to do): the swapped class must still be in place then
                    while not backend_built.wait(0.05) and thread.is_alive():
                        pass
            except BaseException:
                if not finished.is_set():
                    self._abandon(watch, thread)  # interrupted mid-run
                raise
            finally:
                (work_dir / "flwr-run.log").write_text("".join(log.lines))
        output = "".join(log.lines)
        error = watch.error or outcome.get("error")
        if error is not None:
            raise SimulationError(f"the run failed ({type(error).__name__}: {error}); log in {work_dir / 'flwr-run.log'}:\n{output[-4000:]}") from error
        return output

    def _check_actors(self) -> None:
        """Every actor of the pool alive and free, or a new pool: an actor that died (killed,
        out of memory) would fail every message of every later run."""
        import ray
        from ray.exceptions import RayError

        def all_alive() -> bool:
            pings = [actor.__ray_ready__.remote() for actor in self._pool.pool]
            answered, late = ray.wait(pings, num_returns=len(pings), timeout=300)
            alive = 0
            for ping in answered:
                try:
                    ray.get(ping)
                    alive += 1
                except RayError:
                    pass
            return alive == self._pool.num_actors and not late

        if all_alive():
            return
        self._replace_pool()
        if not all_alive():
            raise SimulationError(f"the ClientApp actors die as they start: see the worker logs under {self._temp_dir}")

    def _abandon(self, watch: _ServerAppWatch, engine: threading.Thread) -> None:
        """Stop a run that cannot be waited for, and close the runtime: the ServerApp stops at
        its next exchange with the nodes, the actors are killed so that messages in flight
        fail at once (Ray gives no answer to a driver that left), the engine winds down."""
        import ray

        watch.abandoned.set()
        if self._pool is not None and ray.is_initialized():
            self._kill_actors()
        engine.join(30)
        self.close()

    def _replace_pool(self) -> None:
        self._kill_actors()
        self._pool = self._new_pool()

    def _kill_actors(self) -> None:
        """Every actor of the pool, free or busy (Flower's pool keeps the busy ones by future)."""
        import ray

        for actor in self._pool.pool + list(self._pool._future_to_actor.values()):
            ray.kill(actor)

    def _run_engine(self, server_app: _ServerAppWatch, run_config: dict[str, Any], num_supernodes: int) -> None:
        """What `flwr-simulation` does with a run the SuperLink hands it, minus the SuperLink."""
        from flwr.app import Context, RecordDict
        from flwr.common.config import get_fused_config_from_dir
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.constant import NOOP_FEDERATION_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supercore.telemetry import EventType

        run = Run.create_empty(run_id=secrets.randbits(63))
        run.override_config = run_config
        run.primary_task_id = secrets.randbits(63)
        run.federation_id = NOOP_FEDERATION_ID
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run.primary_task_id, run.run_id, SUPERLINK_NODE_ID
        context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=get_fused_config_from_dir(PROJECT_ROOT, run_config))
        _run_simulation(
            num_supernodes=num_supernodes, exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
            server_app=server_app, client_app_attr=app_components()["clientapp"],
            backend_config={"client_resources": dict(self.client_resources)},
            app_dir=str(PROJECT_ROOT), run=run, server_app_context=context, is_app=True,
        )


@contextmanager
def _standing_backend(pool: Any, built: threading.Event) -> Iterator[None]:
    """Flower's engine builds its Ray backend by class name at the start of a run: for this
    run, that class takes the standing pool and leaves it (and Ray) up at the end."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    flower_backend = raybackend.RayBackend

    class StandingPoolBackend(flower_backend):  # type: ignore[misc, valid-type]
        def build(self, app_fn: Any) -> None:
            self.pool = pool
            self.app_fn = app_fn
            built.set()

        def terminate(self) -> None:
            pass

    raybackend.RayBackend = StandingPoolBackend
    try:
        yield
    finally:
        raybackend.RayBackend = flower_backend


def run_simulation(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    work_dir: str | Path,
    stream_to: Any = None,
    timeout: float | None = None,
    runtime: SimulationRuntime | None = None,
) -> str:
    """Run the project's app once; returns Flower's log of the run. Raises SimulationError on
    failure. Without `runtime`, a runtime (Ray and its actors) lives for this run only."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "run-config.toml").write_text(tomli_w.dumps(dict(run_config)))  # what was run, for a person
    if runtime is not None:
        return runtime.run(run_config, num_supernodes, work_dir, stream_to, timeout)
    cfg = RunConfig.from_flower(run_config)
    with terminate_as_exit(), SimulationRuntime(work_dir, actor_imports=first_message_imports(cfg), simulations=[(cfg, num_supernodes)]) as own:
        return own.run(run_config, num_supernodes, work_dir, stream_to, timeout)
