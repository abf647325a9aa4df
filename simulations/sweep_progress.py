"""What a sweep shows while it runs: a progress bar on a terminal; where its output is redirected
(a log file, CI, `nohup`), one plain, flushed line per event instead, since rich draws a bar
there only once, at the end, and says nothing while the sweep runs.

A plain line gives the seconds since the sweep started, the cell and its stage, and the seconds
the stage's cell (or baseline set) has run:

    [  12.4s] cell user-als-eps4-c2-s3: round 1/2 (cell 3.1s)
"""

from __future__ import annotations

import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# the server's round loop (server/round_loop.py) logs this as each round begins
_ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


class SweepProgress(ABC):
    """The events of a sweep, in the order it meets them; a context manager around the sweep."""

    def __enter__(self) -> SweepProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        return None

    @abstractmethod
    def cached(self, name: str) -> None:
        """A cell or baseline set an earlier run of the sweep finished: it is not run again."""

    @abstractmethod
    def baselines_started(self, name: str) -> None: ...

    @abstractmethod
    def baselines_done(self, name: str) -> None: ...

    @abstractmethod
    def cell_started(self, name: str, rounds: int) -> None: ...

    @abstractmethod
    def round_started(self, server_round: int, rounds: int) -> None:
        """A round of the running cell began."""

    @abstractmethod
    def cell_done(self, name: str) -> None: ...


class BarProgress(SweepProgress):
    """Two rich bars: the sweep's cells and baseline sets, and the running one's rounds."""

    def __init__(self, total_steps: int, console: Console) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        self.progress = Progress(*columns, console=console, transient=False)
        self.steps = self.progress.add_task("cells", total=total_steps)
        self.rounds = self.progress.add_task("rounds", total=0)
        self.round_steps = 0

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        self.progress.stop()

    def cached(self, name: str) -> None:
        self.progress.console.print(f"cached: {name}")
        self.progress.advance(self.steps)

    def baselines_started(self, name: str) -> None:
        self.progress.update(self.rounds, description=f"baselines for {name}", total=1, completed=0)

    def baselines_done(self, name: str) -> None:
        self.progress.advance(self.rounds)
        self.progress.advance(self.steps)

    def cell_started(self, name: str, rounds: int) -> None:
        # round 0 (the initial model's evaluation) counts as a step too, though no line announces it
        self.round_steps = rounds + 1
        self.progress.update(self.rounds, description=f"rounds of {name}", total=self.round_steps, completed=0)

    def round_started(self, server_round: int, rounds: int) -> None:
        self.progress.advance(self.rounds)

    def cell_done(self, name: str) -> None:
        self.progress.update(self.rounds, completed=self.round_steps)
        self.progress.advance(self.steps)


class PlainProgress(SweepProgress):
    """One line per event on `stream`, flushed as it happens."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.stream = stream
        self.clock = clock
        self.sweep_started = clock()
        self.stage_started = self.sweep_started
        self.running = ""  # the cell whose rounds are being reported

    def _line(self, text: str) -> None:
        stream = self.stream or sys.stdout  # looked up at each line: a test's capture may replace it
        print(f"[{self.clock() - self.sweep_started:7.1f}s] {text}", file=stream, flush=True)

    def _stage_seconds(self) -> float:
        return self.clock() - self.stage_started

    def cached(self, name: str) -> None:
        self._line(f"cached: {name}")

    def baselines_started(self, name: str) -> None:
        self.stage_started = self.clock()
        self._line(f"baselines for {name}: started")

    def baselines_done(self, name: str) -> None:
        self._line(f"baselines for {name}: done (baselines {self._stage_seconds():.1f}s)")

    def cell_started(self, name: str, rounds: int) -> None:
        self.stage_started, self.running = self.clock(), name
        self._line(f"cell {name}: started ({rounds} rounds)")

    def round_started(self, server_round: int, rounds: int) -> None:
        self._line(f"cell {self.running}: round {server_round}/{rounds} (cell {self._stage_seconds():.1f}s)")

    def cell_done(self, name: str) -> None:
        self._line(f"cell {name}: done (cell {self._stage_seconds():.1f}s)")


def sweep_progress(total_steps: int, stream: TextIO | None = None) -> SweepProgress:
    """A bar where `stream` (default stdout) is a terminal rich can draw on, plain lines elsewhere
    (rich alone would call a redirected stream a terminal where FORCE_COLOR is set, as in CI)."""
    target = stream or sys.stdout
    console = Console(file=stream)
    drawable = target.isatty() and console.is_terminal
    return BarProgress(total_steps, console) if drawable else PlainProgress(stream)


class RoundWatcher:
    """A stream for `run_simulation`: writes the run's log to `log_file` and tells `progress`
    of each round as the server's log line announces it."""

    def __init__(self, progress: SweepProgress, log_file: TextIO) -> None:
        self.progress, self.log_file = progress, log_file
        self.partial = ""  # a line not yet ended: the runtime writes whole lines, but a stream need not

    def write(self, text: str) -> None:
        self.log_file.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            match = _ROUND_LINE.search(line)
            if match:
                self.progress.round_started(int(match[1]), int(match[2]))

    def flush(self) -> None:
        self.log_file.flush()
