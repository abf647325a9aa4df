"""Flower's simulation runtime, hosted in the harness's process and kept warm across runs.

`flwr run` hands every run to a fresh `flwr-simulation` process: it imports Flower, starts a
Ray instance (or joins one), starts a pool of ClientApp actors (each a new Python process
importing Flower and the app), and tears all of that down when the run ends. On the quick
experiment that was more than half of a 10-round run's wall time (docs/BENCHMARKS.md), and
Flower 1.42 cannot keep any of it up between runs.

So the harness runs Flower's simulation engine itself, as `flwr-simulation` does, with the
ServerApp and ClientApp that pyproject.toml names and the run config fused from pyproject.toml
and the run's overrides; inside it, Flower's InMemoryGrid, LinkState, engine threads, Ray
backend and ClientAppActor pool. One Ray cluster and one pool of Flower's actors serve all the
runs of a process. Each run still gets its own run id, LinkState, node contexts and ServerApp
thread; the actors keep only their imports and the app's per-process caches of immutable data
(client/node_data.py). Two interventions in Flower, both for the duration of a run: the
engine's Ray backend class is replaced by one that takes the standing pool and leaves it up,
and the ServerApp is called through a wrapper that says when it has returned.

This module composes the parts, one concern each: ray_cluster (the private Ray cluster),
actor_pool (the actors' warm-up, liveness and killing), engine (one run on threads of this
process), shared/flower_internals.py (every private Flower and Ray name of the project, pinned
to FLOWER_VERSION by tests/test_flower_internals.py) and public_path (Flower's public `flwr run` against a private
SuperLink). Of the runtime's modules only this one uses flower_internals (tests and benchmarks use
its two message helpers), and the others import no sibling (that would import this package: an
import circle); they get what they need of Flower's insides from here, as arguments.

On a flwr other than FLOWER_VERSION (or one that lacks a pinned name) the runtime prints one
warning and runs every run through the public path, touching nothing private; so it does when
the environment variable FEDADS_SIMULATION_PATH is "public" (the default is "warm").
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import cache, partial
from pathlib import Path
from typing import Any

import tomli_w
from threadpoolctl import threadpool_limits

from client.handlers import first_message_imports
from deploy.processes import terminate_as_exit
from shared import flower_internals
from shared.config import RunConfig
from shared.config_table import app_components
from simulations import PROJECT_ROOT
from simulations.runtime.actor_pool import all_answer, kill_actors, warm_up_actor
from simulations.runtime.engine import RunLog, RunTimedOut, ServerAppWatch, run_on_thread
from simulations.runtime.public_path import run_public
from simulations.runtime.ray_cluster import ExistingRayCluster, RayCluster

RUNTIME_MARK = "FEDADS_SIMULATION_RUNTIME"  # in every process a runtime starts: its work dir
PATH_VARIABLE = "FEDADS_SIMULATION_PATH"  # "warm" (the default) or "public"
RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"  # Ray's own name for a cluster to join


class SimulationError(RuntimeError):
    pass


@cache
def _warn(reason: str) -> None:
    """Once per process: every runtime of it takes the same path."""
    print(f"fedads: {reason}: running each run through Flower's public `flwr run` against a private SuperLink (slower start-up)",
          file=sys.stderr, flush=True)


def _warm_path_chosen() -> bool:
    chosen = os.environ.get(PATH_VARIABLE) or "warm"
    if chosen not in ("warm", "public"):
        raise SimulationError(f"{PATH_VARIABLE} must be 'warm' or 'public', not {chosen!r}")
    if chosen == "public":
        return False
    if not flower_internals.version_matches():
        _warn(f"the warm simulation runtime was written for flwr {flower_internals.FLOWER_VERSION}, "
              f"found {flower_internals.installed_version()}")
        return False
    return True


class SimulationRuntime:
    """One Ray cluster and one pool of Flower's ClientApp actors, for many runs.

        with SimulationRuntime(work_dir) as runtime:
            runtime.run(run_config, num_supernodes, run_dir)
            ...

    `start` returns at once: Ray's head node boots in its own process group (about 4 s), and a
    thread joins it as this process's Ray driver and starts the actors; each actor imports
    `actor_imports` (client/handlers.first_message_imports) and builds the nodes' data of
    `simulations` (pairs of a RunConfig and its number of nodes) as it starts. Meanwhile the
    caller can work (a sweep runs its baselines); the first run waits for the rest.

    Ray's files and log are in `work_dir` (ray_cluster); every Ray process has
    RUNTIME_MARK=work_dir in its environment, so that checks can find them. All of them (Ray's
    own, and the actors) stop on `close`, also when a run failed or was interrupted. One
    runtime at a time per process: the process is a Ray driver, and runs swap Flower's backend
    class while they last. On the public path (`warm` False) there is nothing to start or
    stop: each run starts and stops its own SuperLink in its work dir.

    While a run lasts, this process's numerical libraries (OpenBLAS, OpenMP) use at most
    `driver_threads` threads (None: no limit). The ServerApp runs here, beside actors that use
    every core Ray was given: after each multi-threaded call (private ALS's solve over all ads)
    OpenBLAS's idle workers spin, taking cores from the actors' next work (a private round of
    `make run` 0.11-0.13 s with them, 0.08-0.09 s with one thread; docs/BENCHMARKS.md). Between
    runs (baselines, the exact evaluation) the process keeps every thread.
    """

    def __init__(
        self, work_dir: str | Path, num_cpus: int | None = None, cpus_per_client: float = 1.0,
        actor_imports: Sequence[str] = ("client.handlers",), simulations: Sequence[tuple[Any, int]] = (),
        ray_address: str | None = None, driver_threads: int | None = 1,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.client_resources = {"num_cpus": cpus_per_client, "num_gpus": 0.0}
        self.actor_imports = tuple(actor_imports)
        self.simulations = tuple(simulations)
        self.warm = _warm_path_chosen()
        self.connect_seconds = 0.0  # from `start` until this process was a driver with its actors asked for
        self.start_wait_seconds = 0.0  # how long the first run waited for that
        self.stop_wait_seconds = 0.0  # how long `close` waited for Ray to be gone
        # an existing cluster (`ray_address`, else RAY_ADDRESS) instead of a private one: the harness past one machine
        address = ray_address or os.environ.get(RAY_ADDRESS_VARIABLE) or None
        self.ray_address = address
        self.driver_threads = driver_threads
        self._cluster: RayCluster | ExistingRayCluster = (
            ExistingRayCluster(address) if address else RayCluster(self.work_dir, self.num_cpus, (RUNTIME_MARK, str(self.work_dir))))
        self._pool: Any = None
        self._missing: list[str] = []  # pinned Flower names the installed Flower lacks
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
        if not self.warm:
            return
        started = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._cluster.boot()

        def connect() -> None:
            try:
                self._missing = flower_internals.unresolved()  # imports Flower's and Ray's modules meanwhile
                if self._missing:
                    return
                with flower_internals.quiet_ray_driver():
                    self._cluster.connect()
                self._pool = self._new_pool()  # its actors start in the background
                self.connect_seconds = time.perf_counter() - started
            except BaseException as exc:
                self._connect_error = exc

        self._connecting = threading.Thread(target=connect, name="ray-connect", daemon=True)
        self._connecting.start()

    def _new_pool(self) -> Any:
        return flower_internals.new_actor_pool(self.client_resources, partial(warm_up_actor, self.actor_imports, self.simulations))

    def _wait_connected(self) -> None:
        if self._connecting is not None:
            waiting = time.perf_counter()
            self._connecting.join()
            self._connecting = None
            self.start_wait_seconds = time.perf_counter() - waiting
        if self._missing:
            _warn(f"flwr {flower_internals.installed_version()} lacks Flower internals the warm simulation runtime uses "
                  f"({', '.join(self._missing)})")
            self.warm = False
            self.close()
            return
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
        if self._connecting is not None:
            self._connecting.join()  # a driver half-way connected is disconnected below
        self._pool = None
        self._cluster.shut_down()

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
        if self.warm:
            self._wait_connected()  # which turns to the public path if Flower lacks a pinned name
        work_dir = Path(work_dir).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        if not self.warm:
            return self._run_public(run_config, num_supernodes, work_dir, stream_to, timeout)
        self._check_actors()
        try:
            server_app = flower_internals.load_server_app(app_components()["serverapp"], PROJECT_ROOT)
        except Exception as exc:
            raise SimulationError(f"cannot load the ServerApp: {exc}") from exc
        watch = ServerAppWatch(server_app, int(num_supernodes), guard_grid=flower_internals.CheckedGrid)
        drive = partial(flower_internals.run_engine, watch, dict(run_config), int(num_supernodes), self.client_resources, PROJECT_ROOT,
                        app_components()["clientapp"])
        log, log_path = RunLog(stream_to), work_dir / "flwr-run.log"
        with self._lock:
            try:
                with self._driver_thread_limit():
                    error = run_on_thread(watch, drive, partial(flower_internals.standing_backend, self._pool), log, log_path, timeout,
                                          self._abandon)
            except RunTimedOut as exc:
                raise SimulationError(f"{exc}; log in {log_path}") from exc
        if error is not None:
            raise SimulationError(f"the run failed ({type(error).__name__}: {error}); log in {log_path}:\n{log.text()[-4000:]}") from error
        return log.text()

    def _driver_thread_limit(self) -> AbstractContextManager[object]:
        return nullcontext() if self.driver_threads is None else threadpool_limits(limits=self.driver_threads)

    def _run_public(self, run_config: Mapping[str, Any], num_supernodes: int, work_dir: Path, stream_to: Any, timeout: float | None) -> str:
        done = run_public(run_config, int(num_supernodes), work_dir, {RUNTIME_MARK: str(self.work_dir)},
                          float(self.client_resources["num_cpus"]), stream_to, timeout)
        if done.failure is not None:
            raise SimulationError(f"{done.failure}; log in {work_dir / 'flwr-run.log'}:\n{done.log[-4000:]}")
        return done.log

    def _check_actors(self) -> None:
        """Every actor of the pool alive and free, or a new pool: an actor that died (killed,
        out of memory) would fail every message of every later run."""
        if self._actors_answer():
            return
        self._replace_pool()
        if not self._actors_answer():
            raise SimulationError(f"the ClientApp actors die as they start: see the worker logs under {self._cluster.temp_dir}")

    def _actors_answer(self) -> bool:
        pings = [flower_internals.actor_ready(actor) for actor in flower_internals.free_actors(self._pool)]
        return all_answer(pings, flower_internals.pool_size(self._pool))

    def _abandon(self, engine: threading.Thread) -> None:
        """Stop a run that cannot be waited for, and close the runtime: the actors are killed so
        that messages in flight fail at once (Ray gives no answer to a driver that left), the
        engine winds down (its ServerApp stops at its next exchange with the nodes)."""
        if self._pool is not None and self._cluster.driver_connected():
            kill_actors(flower_internals.every_actor(self._pool))
        engine.join(30)
        self.close()

    def _replace_pool(self) -> None:
        kill_actors(flower_internals.every_actor(self._pool))
        self._pool = self._new_pool()


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
