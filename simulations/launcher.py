"""Run the fedads Flower app in Flower's simulation runtime, with nothing installed at run time.

Flower's default local run starts a detached SuperLink and syncs the app's dependencies with
uv. Instead this starts a private SuperLink in simulation mode with runtime dependency
installation disabled, on a free loopback port with its own FLWR_HOME, submits the app over
its Control API (as `flwr run --stream` would), and stops the SuperLink's whole process group
afterwards, also when the run fails or is interrupted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext, redirect_stdout
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import tomli_w

from simulations import ray_hook

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUPERLINK_ADDRESS = "FEDADS_SUPERLINK_ADDRESS"  # the Control API address, in a local_superlink's environment


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


def _project_installed_editable() -> bool:
    """Whether Ray workers of this environment import this very checkout's packages."""
    try:
        direct_url = json.loads(importlib.metadata.distribution("fedads").read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        return False
    editable = bool(direct_url.get("dir_info", {}).get("editable"))
    return editable and direct_url.get("url", "").removeprefix("file://") == str(PROJECT_ROOT)


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
        "FLWR_TELEMETRY_ENABLED": "0",  # offline harness: no usage reports from the simulation processes
        SUPERLINK_ADDRESS: address,
    }
    if _project_installed_editable():
        env["RAY_RUNTIME_ENV_HOOK"] = ray_hook.HOOK
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
    stream_to: Any = None,
    timeout: float | None = None,
    superlink: Mapping[str, str] | None = None,
) -> str:
    """Run the project's app once; returns the streamed log. Raises SimulationError on failure.

    `superlink`: the environment of a running `local_superlink` to submit to (a sweep starts
    one for all its cells); without it, a private SuperLink lives for this run only. The run
    is submitted over the SuperLink's Control API from this process, as `flwr run --stream`
    does, without a CLI process and with the app's FAB built once per process.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "run-config.toml").write_text(tomli_w.dumps(dict(run_config)))  # what was run, for a person
    federation: dict[str, Any] = {"num_supernodes": int(num_supernodes), "client_resources_num_cpus": 1}
    if not (superlink or {}).get("RAY_ADDRESS"):  # Ray refuses num-cpus when it joins a running cluster
        federation["init_args_num_cpus"] = os.cpu_count() or 1
    with terminate_as_exit(), (nullcontext(dict(superlink)) if superlink is not None else local_superlink(work_dir)) as env:
        lines, status = _submit_and_stream(env, run_config, federation, stream_to, timeout)
    output = "".join(lines)
    (work_dir / "flwr-run.log").write_text(output)
    if status != "completed" or "ServerApp raised an exception" in output or "Traceback" in output:
        raise SimulationError(f"the run ended {status}; log in {work_dir / 'flwr-run.log'}:\n{output[-4000:]}")
    return output


@lru_cache(maxsize=1)
def _app_fab() -> Any:
    """The project's app as a FAB, built once per process: a sweep runs one version of the code."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.fab import Fab

    fab_bytes = build_fab_from_disk(PROJECT_ROOT)
    return Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})


@contextmanager
def _flwr_home(path: str) -> Iterator[None]:
    """Flower's Control API client reads its connection's credentials from $FLWR_HOME."""
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


def _submit_and_stream(
    env: Mapping[str, str], run_config: Mapping[str, Any], federation: dict[str, Any], stream_to: Any, timeout: float | None
) -> tuple[list[str], str]:
    """Start the run, stream its log until the SuperLink ends it; returns (log lines, sub-status)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
    from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest, StopRunRequest, StreamLogsRequest
    from flwr.supercore.utils import simulation_config_from_json

    connection = SuperLinkConnection(name="sim", address=env[SUPERLINK_ADDRESS], insecure=True)
    with _flwr_home(env["FLWR_HOME"]), redirect_stdout(io.StringIO()):  # its "Using SuperLink" line is CLI chatter
        client = init_http_client_from_connection(connection)
    lines: list[str] = []
    run_id = None
    try:
        reply = client.StartRun(StartRunRequest(
            fab=fab_to_proto(_app_fab()), override_config=user_config_to_proto(dict(run_config)),
            override_federation_config=simulation_config_from_json(federation),
        ))
        if not reply.HasField("run_id"):
            raise SimulationError(f"the SuperLink did not start the run: {reply}")
        run_id = reply.run_id
        started = time.monotonic()
        for chunk in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            lines.append(chunk.log_output)
            if stream_to is not None:
                stream_to.write(chunk.log_output)
                stream_to.flush()
            if timeout is not None and time.monotonic() - started > timeout:
                raise SimulationError(f"the simulation ran past {timeout:.0f}s")
        runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict.values()
        status = next(iter(run_from_proto(proto).status.sub_status for proto in runs), "unknown")
        run_id = None  # finished: nothing to stop
        return lines, status
    finally:
        if run_id is not None:  # interrupted or timed out: the SuperLink stops its simulation
            try:
                client.StopRun(StopRunRequest(run_id=run_id))
            except Exception:  # noqa: BLE001 - the SuperLink itself may be gone; it is stopped next anyway
                pass
        client.close()
