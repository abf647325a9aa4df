"""Flower's public simulation path: one run through `flwr run` against a private SuperLink.

The fallback of the warm runtime, for a Flower it was not written for (or when chosen with
FEDADS_SIMULATION_PATH=public): it uses only Flower's documented command line. Each run gets a
SuperLink in simulation mode on a free loopback port, a private FLWR_HOME whose config.toml
connects to it, and `flwr run` with the run config and the number of SuperNodes; its final
status is read with `flwr ls`. Slower to start than the warm runtime (a SuperLink, and in
Flower's `flwr-simulation` process a Ray instance and its actors, for every run). The ServerApp
and ClientApp write their outputs into the run config's `output-dir` as on the warm runtime.

Runtime dependency installation stays disabled: Flower's default would `uv sync` the app's
dependencies at run time (a multi-GB torch); the app runs on this venv's packages. The
SuperLink listens on 127.0.0.1 only. Known difference from the warm path: Flower's engine starts
the ServerApp before it registers the virtual SuperNodes, so a ServerApp that samples nodes at
once (a resumed run skips round 0's evaluation) may see fewer than all of them; the warm path
starts the ServerApp only once all are registered (engine.py). Every process of the run is stopped when it ends, also on
failure, timeout or interruption; a sweeper process (deploy.processes.Sweeper) kills what is left of them,
found by their FLWR_HOME, then, or as soon as this process dies, even killed outright.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from deploy.processes import ProcessStartError, Sweeper, free_port, stop_tree, wait_for_port
from deploy.superlink import BIN, CONNECTION, cli_reply, tool_env, write_cli_config
from simulations import PROJECT_ROOT

log = logging.getLogger(__name__)
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # Flower's console log colours its levels
_STARTED = re.compile(r"Successfully started run (\d+)")
STATUS_WAIT_SECONDS = 60.0  # after its log stream ended, how long a run may take to show as finished


@dataclass(frozen=True)
class PublicRun:
    log: str  # what `flwr run --stream` printed, without colours
    failure: str | None  # why the run did not complete; None when it did


def superlink_command(port: int) -> list[str]:
    return [
        str(BIN / "flower-superlink"), "--simulation", "--insecure",
        "--disable-runtime-dependency-installation",  # never `uv sync` at run time
        "--host", "127.0.0.1", "--port", str(port),
    ]


def run_command(overrides: Path, num_supernodes: int, cpus_per_client: float) -> list[str]:
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={max(1, math.ceil(cpus_per_client))}"
    return [str(BIN / "flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--run-config", str(overrides), "--federation-config", federation, "--stream"]


def run_public(
    run_config: Mapping[str, Any], num_supernodes: int, work_dir: Path, env: Mapping[str, str],
    cpus_per_client: float = 1.0, stream_to: Any = None, timeout: float | None = None,
) -> PublicRun:
    """One run of the project's app; its SuperLink's files (superlink.log, flwr-home/) and log
    (flwr-run.log) in `work_dir`; `env` is added to the environment of every process it starts."""
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = work_dir / "run-config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    flwr_home = work_dir / "flwr-home"
    port = free_port()
    write_cli_config(flwr_home, f"127.0.0.1:{port}", None)
    environ = {**tool_env(flwr_home), **env}
    lines: list[str] = []
    with ExitStack() as stack:
        stack.callback(lambda: (work_dir / "flwr-run.log").write_text("".join(lines)))
        stack.callback(Sweeper("FLWR_HOME", str(flwr_home)).close)  # waits until it is done
        with (work_dir / "superlink.log").open("w") as log_file:
            superlink = subprocess.Popen(
                superlink_command(port), cwd=work_dir, env=environ,
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        stack.callback(_stop, superlink)
        try:
            wait_for_port(port, superlink, work_dir / "superlink.log")
        except ProcessStartError as exc:
            return PublicRun("", f"the SuperLink did not start: {exc}")
        deadline = None if timeout is None else time.monotonic() + timeout
        cli = subprocess.Popen(
            run_command(overrides, num_supernodes, cpus_per_client), cwd=PROJECT_ROOT, env=environ,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
            start_new_session=True,
        )
        stack.callback(_stop, cli)
        reader = threading.Thread(target=_follow, args=(cli.stdout, lines, stream_to), name="flwr-run-log", daemon=True)
        reader.start()
        try:
            cli.wait(timeout=_left(deadline))
        except subprocess.TimeoutExpired:
            return PublicRun("".join(lines), f"the simulation ran past {timeout:.0f}s")
        reader.join()
        output = "".join(lines)
        started = _STARTED.search(output)
        if started is None:
            return PublicRun(output, f"`flwr run` did not start the run (exit {cli.returncode})")
        # the log stream has ended: the status follows within moments, or the SuperLink is gone
        status, last_error = _final_status(int(started.group(1)), environ,
                                           time.monotonic() + STATUS_WAIT_SECONDS if deadline is None else deadline, superlink)
        if superlink.poll() is not None and status is None:
            return PublicRun(output, f"the SuperLink exited (code {superlink.returncode}) before the run showed as finished; "
                                     f"see {work_dir / 'superlink.log'}")
        if status is None:
            late = f"the simulation ran past {timeout:.0f}s" if timeout is not None else "the run never showed as finished"
            return PublicRun(output, late + (f" (`flwr ls`: {last_error})" if last_error else ""))
        if status.get("status") != "finished:completed":
            return PublicRun(output, f"the run failed (Flower's status {status.get('status')}: {status.get('status-details')})")
        return PublicRun(output, None)


def _stop(process: subprocess.Popen) -> None:
    """The process and its descendants, killed outright: the SuperLink keeps nothing (its state
    is in memory, its FLWR_HOME private), and an abandoned run must write no further round. Not
    one already reaped: its pid may be another's now."""
    if process.poll() is None:
        stop_tree(process, signals=(signal.SIGKILL,))


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _follow(stream: IO[str], lines: list[str], stream_to: Any) -> None:
    """Keeps reading to the end, whatever `stream_to` does: a full pipe would stall `flwr run`."""
    for raw in stream:
        line = _COLOURS.sub("", raw)
        lines.append(line)
        if stream_to is not None:
            try:
                stream_to.write(line)
                stream_to.flush()
            except Exception:
                log.exception("cannot stream the run's log on; it is still kept")
                stream_to = None


def _final_status(run_id: int, environ: Mapping[str, str], deadline: float,
                  superlink: subprocess.Popen) -> tuple[dict[str, Any] | None, str | None]:
    """(the run's row of `flwr ls` once Flower has marked it finished, or None past `deadline`
    or once the SuperLink has exited; the CLI's last error, if its last answer was one).
    `flwr run --stream` returns when the run's log ends, which is about when it finishes."""
    command = [str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]
    while True:
        try:
            reply = cli_reply(subprocess.run(command, cwd=PROJECT_ROOT, env=dict(environ), capture_output=True, text=True,
                                             timeout=120, stdin=subprocess.DEVNULL))
            error = None if reply.get("success") else str(reply.get("error-message")).strip()
        except subprocess.TimeoutExpired:
            reply, error = {}, "no answer within 120 s"
        runs = reply.get("runs", [])
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return dict(runs[0]), None
        if time.monotonic() > deadline or superlink.poll() is not None:
            return None, error
        time.sleep(0.5)  # readiness poll of the SuperLink we started
