"""deploy.processes.Sweeper: what a harness that dies leaves to it is stopped, politely first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.processes import Sweeper

DEADLINE = 30.0


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_marked_processes_get_sigterm_first_and_sigkill_after_the_grace(tmp_path: Path) -> None:
    """A marked process that cleans up on SIGTERM (a SuperNode's warm process removes its socket
    folder) does so; one that ignores SIGTERM is killed after the grace; then the folders go."""
    mark = ("FEDADS_TEST_SWEEP", str(tmp_path))
    own, scratch = tmp_path / "own", tmp_path / "scratch"
    scratch.mkdir()
    sweeper = Sweeper(*mark, folders=(str(scratch),), grace=1.0)
    environment = {**os.environ, mark[0]: mark[1]}
    polite = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\n"
        f"def leave(*_):\n    os.rmdir({str(own)!r})\n    sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, leave)\n"
        f"os.mkdir({str(own)!r})\n"
        "time.sleep(600)\n")], env=environment)
    stubborn = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")], env=environment, stdout=subprocess.PIPE, text=True)
    try:
        _wait_until(own.exists, "the polite process started")
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        begun = time.monotonic()
        sweeper.close()
        assert polite.wait(timeout=DEADLINE) == 3  # its own SIGTERM handler ended it
        assert not own.exists()
        assert stubborn.wait(timeout=DEADLINE) == -signal.SIGKILL
        assert time.monotonic() - begun >= 1.0  # not before the grace
        assert not scratch.exists()
    finally:
        for process in (polite, stubborn):
            process.kill()
            process.wait()
