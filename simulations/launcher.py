"""Run the fedads Flower app once in Flower's simulation runtime, with nothing installed at run
time: the entry point of the main job, the tests and the benchmarks. A sweep keeps one
runtime up for all its cells instead (simulations/runtime.py, simulations/sweep.py).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import tomli_w

from client.rounds import first_message_imports
from shared.config import RunConfig
from simulations import PROJECT_ROOT
from simulations.runtime import SimulationError, SimulationRuntime

__all__ = ["PROJECT_ROOT", "SimulationError", "SimulationRuntime", "run_simulation", "terminate_as_exit"]


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM (a job runner stopping us) unwinds like Ctrl-C, so the Ray processes we started
    are stopped by the `finally` blocks instead of being orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
