"""Local processes the harness and the deployment tools start (a Ray head node; a SuperLink and
SuperNodes): free ports, readiness, stopping a whole process tree (their children change
process group), a sweeper that stops them even when their starter is killed outright, and the
environment that caps the numerical threads of what they start."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ProcessStartError(RuntimeError):
    pass


# read by OpenBLAS (numpy, scipy), OpenMP (and torch) and MKL as they load
THREAD_LIMIT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_limit(threads: int | None) -> dict[str, str]:
    """The environment that limits a process's numerical libraries to `threads` threads (None: no limit)."""
    return {} if threads is None else dict.fromkeys(THREAD_LIMIT_VARIABLES, str(threads))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def positive_int(text: str) -> int:
    """argparse type: a positive number of threads."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of threads")
    return value


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _program(process: subprocess.Popen) -> str:
    args = process.args
    return Path(str(args[0] if isinstance(args, list | tuple) else args)).name


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProcessStartError(f"{_program(process)} exited with code {process.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # readiness poll of a process we started, not a timing assumption
    raise ProcessStartError(f"{_program(process)} did not listen on {host}:{port} within {timeout:.0f}s; see {log_path}")


def processes_mentioning(*needles: str, environ: bool = True) -> list[str]:
    """Live processes whose command line (or, with `environ`, environment) holds any needle:
    what a test's or a benchmark's Flower, Ray or SuperNode processes would leave behind
    ("PID: command line" each)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():  # the asker mentions its needles itself
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (entry / "environ").read_bytes().decode(errors="replace") if environ else ""
            except OSError:
                continue
            if any(needle in cmdline or needle in env for needle in needles):
                found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def _process_tree(root: int) -> set[int]:
    """The root and all its live descendants, whatever session or group they moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def stop_tree(process: subprocess.Popen, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """Stop a process and every descendant (Flower's SuperLink and SuperNodes, Ray's processes
    and workers), politely first by default, and wait until they are gone."""
    known = _process_tree(process.pid)
    for sig, wait in zip(signals, (20.0, 10.0)):
        known |= _process_tree(process.pid)
        for pid in known:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.poll() is None:
                known |= _process_tree(process.pid)
            if not any(_alive(pid) for pid in known):
                process.poll()
                return
            time.sleep(0.05)  # waiting for processes we signalled to exit
    process.poll()


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


# Waits until its starter closes the pipe to its stdin, or dies however it dies (the pipe closes
# with it), then stops every process whose environment holds argv[1] (NAME=value): the marked
# processes, whatever parent they were re-parented to; SIGTERM, and after argv[2] seconds
# SIGKILL. In its own session, so that Ctrl-C at a terminal leaves it to do its work.
_SWEEPER = """
import os, shutil, signal, sys, time
sys.stdin.buffer.read()
needle, deadline = b"\\0" + os.fsencode(sys.argv[1]) + b"\\0", time.monotonic() + 10
def holds_needle(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return needle in b"\\0" + environ.read()
    except OSError:
        return False
def find_strays():
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid() and holds_needle(e)]
# SIGTERM first, so that each may remove what it keeps outside the folders (a SuperNode's warm
# process its socket folder); SIGKILL for what is left after the grace
for pid in find_strays():
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
grace = time.monotonic() + float(sys.argv[2])
while time.monotonic() < grace and find_strays():
    time.sleep(0.05)
while time.monotonic() < deadline:
    strays = find_strays()
    if not strays:
        break
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.05)
for folder in sys.argv[3:]:
    shutil.rmtree(folder, ignore_errors=True)
"""


class Sweeper:
    """Stops every process marked `name=value` in its environment on `close`, or as soon as this
    process dies, SIGKILL included: what the `finally` blocks cannot do then (SIGTERM, then
    SIGKILL for those still there after `grace` seconds); then removes the `folders` those
    processes used. Start it before the processes it guards; give each of them the mark."""

    def __init__(self, name: str, value: str, folders: tuple[str, ...] = (), grace: float = 1.0) -> None:
        self.mark = {name: value}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _SWEEPER, f"{name}={value}", str(grace), *folders], stdin=subprocess.PIPE, start_new_session=True,
        )

    def close(self) -> None:
        """Sweep now (closes its stdin), and wait until it is done."""
        self._process.communicate()
