"""The operator's runs on a deployed SuperLink, through the `flwr` CLI: submit one, follow it to
its end, stop it, and resume an interrupted one from its last checkpoint.

    python -m deploy.runs resume --output-dir /var/lib/fedads/out [--wait] [-c num-rounds=20]

Resume, after a SuperLink restart (or a ServerApp that died): the run folder's
`checkpoints/config.json` holds the run config and `run_status.json` the Flower run id that
wrote it. If the SuperLink still lists that run as unfinished (a SuperLink killed with its
ServerApp leaves it "running" in its database for good), it is stopped first, so that no two
ServerApps write one folder; then the same run config is submitted with `resume=true`. The
ServerApp continues after the newest good checkpoint (server/checkpoint.py) and the merchants
answer a round they had already released with their recorded release (client/release_record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from deploy.superlink import BIN, CONNECTION, cli_reply, tool_env
from shared.config import parse_override
from shared.flower_internals import run_not_found_error

FINISHED = "finished:"
COMPLETED = "finished:completed"
# what the flwr CLI says when its request got no answer (a connection error or a timeout): the
# request may have been carried out all the same
UNAVAILABLE = "Connection to the SuperLink is unavailable"


class RunError(RuntimeError):
    pass


def flwr(args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def submit(app: Path, run_config: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """`flwr run APP` with `run_config` as overrides (a TOML file for the CLI, removed after);
    returns the CLI's JSON reply (`success`, `run-id`) or an unsuccessful one with its output."""
    with tempfile.TemporaryDirectory(prefix="fedads-run-config-") as folder:
        overrides = Path(folder) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)))
        done = flwr(["run", str(app), CONNECTION, "-c", str(overrides), "--format", "json"], env, cwd=app)
    return cli_reply(done)


def run_status(run_id: int, env: Mapping[str, str], patience: float = 60.0, retry_every: float = 1.0) -> dict[str, Any]:
    """The SuperLink's row for the run (`flwr ls --run-id`): status, timings, traffic; {} only
    if the SuperLink answers that it does not know the run. A SuperLink that does not answer
    (restarting, or too busy to reply within the CLI's timeout) is asked again for `patience`
    seconds, then RunError: "no answer" must never read as "no such run", or a resume would
    start a second ServerApp beside a live one."""
    deadline = time.monotonic() + patience
    while True:
        reply = cli_reply(flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env))
        if reply.get("success"):
            runs = reply.get("runs", [])
            return dict(runs[0]) if runs else {}
        message = str(reply.get("error-message"))
        if run_not_found_error() in message:
            return {}
        if time.monotonic() >= deadline:
            raise RunError(f"the SuperLink did not say how run {run_id} stands within {patience:.0f}s: {message.strip()}")
        time.sleep(retry_every)  # the SuperLink is restarting or busy: ask again


def wait_for_run(run_id: int, env: Mapping[str, str], timeout: float) -> tuple[dict[str, Any], str]:
    """Follow the run's log until it ends (`flwr log --stream` returns when the run is
    finished), then read its status; returns (status row of `flwr ls`, log)."""
    deadline = time.monotonic() + timeout
    output = ""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunError(f"run {run_id} did not finish within {timeout:.0f}s; last log:\n{output[-3000:]}")
        try:
            streamed = flwr(["log", str(run_id), CONNECTION, "--stream"], env, timeout=remaining)
            output = streamed.stdout + streamed.stderr
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout or "")
            continue
        status = run_status(run_id, env)
        if not status:  # it will never finish here: waiting would last the whole timeout
            raise RunError(f"the SuperLink no longer knows run {run_id} (a SuperLink with its state in memory restarted?); "
                           f"last log:\n{output[-3000:]}")
        if str(status.get("status", "")).startswith(FINISHED):
            return status, output
        time.sleep(1.0)  # the stream ended early (e.g. a dropped connection): look again


def stop_run(run_id: int, env: Mapping[str, str], timeout: float = 60.0) -> dict[str, Any]:
    """`flwr stop`, then wait until the SuperLink lists the run as finished; returns its row."""
    done = flwr(["stop", str(run_id), CONNECTION, "--format", "json"], env)
    deadline = time.monotonic() + timeout
    while not str((status := run_status(run_id, env)).get("status", "")).startswith(FINISHED):
        if time.monotonic() > deadline:
            raise RunError(f"run {run_id} is still {status.get('status', 'unknown')} {timeout:.0f}s after `flwr stop` "
                           f"({done.stdout[-500:]} {done.stderr[-500:]})")
        time.sleep(0.5)  # the SuperLink marks it stopped on its own schedule
    return status


def read_run_folder(output_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run config, run status) of an output-dir: checkpoints/config.json and run_status.json."""
    config_path, status_path = output_dir / "checkpoints" / "config.json", output_dir / "run_status.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise RunError(f"nothing to resume in {output_dir}: {config_path} does not exist (no round was checkpointed)") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot resume: {config_path} is unreadable ({exc})") from exc
    try:
        status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot resume: {status_path} is unreadable ({exc})") from exc
    return config, status


def resume(output_dir: Path, app: Path, env: Mapping[str, str], changes: Mapping[str, Any] | None = None,
           say: Any = print) -> int:
    """Stop the run that wrote `output_dir` if the SuperLink still lists it as unfinished, then
    submit its run config again with `resume=true` (and `changes`, e.g. a larger num-rounds);
    returns the new Flower run id."""
    output_dir = output_dir.resolve()
    config, status = read_run_folder(output_dir)
    if status.get("status") == "complete" and not changes:
        raise RunError(f"nothing to resume: the run in {output_dir} completed all {status.get('rounds_planned')} rounds "
                       "(give -c num-rounds=N to extend it)")
    previous = status.get("flower_run_id")
    if previous is not None:
        row = run_status(int(previous), env)
        state = str(row.get("status", "unknown to this SuperLink"))
        say(f"run {previous} (which wrote {output_dir}): {state}; {status.get('rounds_completed')} of "
            f"{status.get('rounds_planned')} rounds checkpointed")
        if row and not state.startswith(FINISHED):
            say(f"stopping run {previous} first: its ServerApp must not write {output_dir} next to the resumed one")
            stop_run(int(previous), env)
    run_config = {**config, **dict(changes or {}), "resume": True}
    try:
        reply = submit(app, run_config, env)
    except subprocess.TimeoutExpired:
        reply = {"success": False, "error-message": f"{UNAVAILABLE} (`flwr run` gave no answer in time)"}
    if not reply.get("success"):
        message = str(reply.get("error-message", reply))
        if UNAVAILABLE in message:  # the request may have reached the SuperLink all the same
            raise RunError(f"`flwr run` got no answer from the SuperLink ({' '.join(message.split())[-300:]}): the resumed run may have "
                           f"started nonetheless (`flwr ls {CONNECTION}` lists it); resuming again is safe, as a second "
                           f"ServerApp on {output_dir} stops at the folder's lock")
        raise RunError(f"`flwr run` refused the resume: {message}")
    run_id = int(reply["run-id"])
    say(f"resumed as run {run_id} (follow it: flwr log {run_id} {CONNECTION} --stream)")
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    again = sub.add_parser("resume", help="resume the run that wrote OUTPUT_DIR from its last checkpoint")
    again.add_argument("--output-dir", type=Path, required=True, help="the run's output-dir (on this, the SuperLink's, machine)")
    again.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")),
                       help="the operator's FLWR_HOME (deploy.superlink configure-cli)")
    again.add_argument("--app", type=Path, default=Path("."), help="the fedads checkout `flwr run` builds the app from")
    again.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                       help="a change to the stored run config (num-rounds; any other key needs resume-accept-changes)")
    again.add_argument("--wait", action="store_true", help="follow the resumed run; exit 0 only if it completes its plan")
    again.add_argument("--timeout", type=float, default=24 * 3600.0, help="with --wait: seconds to follow it")
    args = parser.parse_args(argv)
    try:
        changes = dict(parse_override(text) for text in args.run_config)
    except ValueError as exc:
        parser.error(str(exc))
    env = tool_env(args.flwr_home)
    try:
        run_id = resume(args.output_dir, args.app.resolve(), env, changes)
        if not args.wait:
            return 0
        status, _ = wait_for_run(run_id, env, args.timeout)
    except RunError as exc:
        print(f"error: {exc}", flush=True)
        return 1
    _, folder_status = read_run_folder(args.output_dir.resolve())
    print(f"run {run_id}: {status.get('status')}; {folder_status.get('rounds_completed')} of {folder_status.get('rounds_planned')} "
          f"rounds ({folder_status.get('status')}{': ' + str(folder_status['reason']) if folder_status.get('reason') else ''})")
    return 0 if status.get("status") == COMPLETED and folder_status.get("status") == "complete" else 1


if __name__ == "__main__":
    raise SystemExit(main())
