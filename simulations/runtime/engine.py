"""One run of the project's app through Flower's simulation engine, on threads of this process.

The engine runs on a daemon thread, as do the engine's own threads (they inherit it). The
caller waits for the ServerApp to return: the run's outputs are complete then, and the
engine's own shut-down (its worker threads wait out a 1 s queue timeout) need not be waited
for. A run given up on (a timeout, an interruption) is abandoned: its ServerApp stops at its
next exchange with the nodes, so it writes no further round, and the caller's `abandon`
stops what the run's messages are in flight on. Flower's log lines of the run are kept for
its log file and streamed on.

What this takes from Flower's insides (the engine, the standing backend, the grid's checked
exchange) the caller hands in from shared/flower_internals.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from shared.app_log import FLOWER_LOGGER


class RunAbandoned(RuntimeError):
    """Raised in an abandoned run's ServerApp, at its next exchange with the nodes."""


class RunTimedOut(RuntimeError):
    pass


class ServerAppWatch:
    """The project's ServerApp, called as Flower calls it, once the run's virtual SuperNodes
    are all registered, over a grid (`guard_grid(grid, check)`) that stops it once the run is
    abandoned, and telling when it has returned.

    Flower's engine starts the ServerApp's thread before it registers the nodes; a ServerApp
    that asks for nodes at once (a resumed run skips round 0) could sample only those
    registered so far."""

    def __init__(self, app: Any, num_nodes: int, guard_grid: Callable[[Any, Callable[[], None]], Any]) -> None:
        self.app, self.num_nodes, self.guard_grid = app, num_nodes, guard_grid
        self.returned = threading.Event()  # the ServerApp returned, or the engine ended without it
        self.abandoned = threading.Event()
        self.error: BaseException | None = None

    def check(self) -> None:
        if self.abandoned.is_set():
            raise RunAbandoned("the harness abandoned this run")

    def __call__(self, grid: Any, context: Any) -> None:
        try:
            deadline = time.monotonic() + 60
            while len(grid.get_node_ids()) < self.num_nodes and time.monotonic() < deadline:
                time.sleep(0.01)  # the engine registers the nodes right after starting this thread
            self.app(grid=self.guard_grid(grid, self.check), context=context)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.returned.set()


class RunLog(logging.Handler):
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

    def text(self) -> str:
        return "".join(self.lines)


@contextmanager
def flower_log_to(handler: RunLog) -> Iterator[None]:
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


def run_on_thread(
    watch: ServerAppWatch,
    drive: Callable[[], None],
    standing_backend: Callable[[threading.Event], AbstractContextManager[None]],
    log: RunLog,
    log_path: Path,
    timeout: float | None,
    abandon: Callable[[threading.Thread], None],
) -> BaseException | None:
    """Run `drive` (Flower's engine, with `watch` as its ServerApp) inside `standing_backend`
    (which sets the event it is given once the engine built its backend) and wait; returns the
    run's error, None when it succeeded. Raises RunTimedOut after `timeout`; a run timed out or
    interrupted is abandoned first (`abandon` gets the engine's thread). The log goes to
    `log_path` in any case."""
    backend_built = threading.Event()
    engine_error: list[BaseException] = []

    def engine() -> None:
        try:
            drive()
        except BaseException as exc:
            engine_error.append(exc)
        finally:
            watch.returned.set()

    def give_up(thread: threading.Thread) -> None:
        watch.abandoned.set()
        abandon(thread)

    with flower_log_to(log), standing_backend(backend_built):
        # Python still joins the engine's executor threads at exit, which is why an abandoned
        # run is stopped too
        thread = threading.Thread(target=engine, name="flower-simulation", daemon=True)
        thread.start()
        try:
            if not watch.returned.wait(timeout):
                give_up(thread)
                raise RunTimedOut(f"the simulation ran past {timeout:.0f}s")
            if watch.error is not None or engine_error:
                watch.abandoned.set()  # the engine may have failed under a running ServerApp: stop it
                thread.join()  # Flower finishes its error handling and logging
            else:
                # the ServerApp may return before the engine built its backend (a resumed run
                # with nothing left to do): the swapped class must still be in place then
                while not backend_built.wait(0.05) and thread.is_alive():
                    pass
        except BaseException:
            if not watch.returned.is_set():
                give_up(thread)  # interrupted mid-run
            raise
        finally:
            log_path.write_text(log.text())
    return watch.error or (engine_error[0] if engine_error else None)
