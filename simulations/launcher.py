"""Run the fedads Flower app in Flower's simulation runtime, with nothing installed at run time.

Flower's default local run starts a detached SuperLink and syncs the app's dependencies with
uv. Instead this starts a private SuperLink in simulation mode with runtime dependency
installation disabled, on a free loopback port with its own FLWR_HOME, submits the app with
`flwr run --stream`, and stops the SuperLink's whole process group afterwards, also when the
run fails or is interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import tomli_w

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class SimulationError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"the SuperLink exited with code {process.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # readiness poll of a process we started, not a timing assumption
    raise SimulationError(f"the SuperLink did not listen on port {port} within {timeout:.0f}s; see {log_path}")


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


def stop_tree(process: subprocess.Popen) -> None:
    """Stop a process and every descendant (Flower's SuperExec, simulation and Ray workers),
    politely first, and wait until they are gone."""
    known = _process_tree(process.pid)
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
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
    """SIGTERM (a job runner stopping us) unwinds like Ctrl-C, so the process trees we started
    are stopped by the `finally` blocks instead of being orphaned."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def local_ray_cluster(work_dir: Path) -> Iterator[str]:
    """A Ray head node for several simulations (a sweep); yields its address.

    Each simulation's `ray.init()` then connects to it (RAY_ADDRESS) in about a second instead
    of booting and shutting down a Ray instance of its own (several seconds each way); its
    actors still start and stop with it. The head runs in the foreground (`--block`) in its
    own process group, so stopping it stops every Ray process.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Ray's Unix socket paths must stay short: its session files go under /tmp, not work_dir
    temp_dir = tempfile.mkdtemp(prefix="fedads-ray-")
    (work_dir / "ray-temp-dir").write_text(temp_dir)  # where its processes' sessions live (for checks)
    log_path = work_dir / "ray.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count() or 1}",
                "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            ],
            cwd=work_dir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        wait_for_port(port, process, log_path)
        yield f"127.0.0.1:{port}"
    finally:
        stop_tree(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def local_superlink(work_dir: Path, ray_address: str | None = None) -> Iterator[dict[str, str]]:
    """A private simulation SuperLink; yields the environment for `flwr` commands to use it.
    With `ray_address`, its simulations connect to that Ray cluster instead of starting one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": "sim", "sim": {"address": address, "insecure": True}}})
    )
    env = {
        **os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # the SuperExec polls for submitted runs every second by default: a second lost per run
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    }
    if ray_address is not None:
        env["RAY_ADDRESS"] = ray_address
    log_path = work_dir / "superlink.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(BIN / "flower-superlink"), "--insecure", "--simulation",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(port),
            ],
            cwd=work_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopping it stops its children too
        )
    try:
        wait_for_port(port, process, log_path)
        yield env
    finally:
        stop_tree(process)


def run_simulation(
    run_config: Mapping[str, Any],
    num_supernodes: int,
    work_dir: str | Path,
    app_dir: str | Path = PROJECT_ROOT,
    stream_to: Any = None,
    timeout: float | None = None,
    superlink: Mapping[str, str] | None = None,
) -> str:
    """Run the app once; returns the streamed log. Raises SimulationError on failure.

    `superlink`: the environment of a running `local_superlink` to submit to (a sweep starts
    one for all its cells); without it, a private SuperLink lives for this run only.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = work_dir / "run-config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    federation = f"num-supernodes={int(num_supernodes)} client-resources-num-cpus=1"
    if not (superlink or {}).get("RAY_ADDRESS"):  # Ray refuses num-cpus when it joins a running cluster
        federation += f" init-args-num-cpus={os.cpu_count() or 1}"
    with terminate_as_exit(), (nullcontext(dict(superlink)) if superlink is not None else local_superlink(work_dir)) as env:
        command = [str(BIN / "flwr"), "run", str(app_dir), "sim", "--stream", "-c", str(overrides), "--federation-config", federation]
        process = subprocess.Popen(
            command, cwd=work_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True,
        )
        lines: list[str] = []
        try:
            assert process.stdout is not None
            started = time.monotonic()
            for line in process.stdout:
                lines.append(line)
                if stream_to is not None:
                    stream_to.write(line)
                    stream_to.flush()
                if timeout is not None and time.monotonic() - started > timeout:
                    raise SimulationError(f"the simulation ran past {timeout:.0f}s")
            process.wait()
        finally:
            stop_tree(process)
    output = "".join(lines)
    (work_dir / "flwr-run.log").write_text(output)
    if process.returncode != 0 or "ServerApp raised an exception" in output or "Traceback" in output:
        raise SimulationError(f"flwr run failed (exit {process.returncode}); log in {work_dir / 'flwr-run.log'}:\n{output[-4000:]}")
    return output
