"""`python -m deploy.runs resume`'s refusals, before it asks any SuperLink anything (the resume
itself, after a SuperLink restart: tests/test_deployment.py), and how it reads a run's state
from a SuperLink that does not answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import runs
from deploy.runs import RunError, resume
from shared.flower_internals import run_not_found_error

ROOT = Path(__file__).resolve().parents[1]


def _resume_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.runs", "resume", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_folder_without_a_checkpoint_has_nothing_to_resume(tmp_path):
    done = _resume_cli("--output-dir", str(tmp_path / "out"), "--flwr-home", str(tmp_path / "home"))
    assert done.returncode == 1
    assert "nothing to resume" in done.stdout and str(tmp_path / "out" / "checkpoints" / "config.json") in done.stdout


def test_a_completed_run_is_only_extended_on_request(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "config.json").write_text(json.dumps({"num-rounds": 2}))
    (out / "run_status.json").write_text(json.dumps({"status": "complete", "flower_run_id": 7, "rounds_planned": 2, "rounds_completed": 2}))
    with pytest.raises(RunError, match="completed all 2 rounds .give -c num-rounds=N"):
        resume(out, ROOT, env={})


def test_a_damaged_status_file_is_named(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "config.json").write_text("{}")
    (out / "run_status.json").write_text("{not json")
    with pytest.raises(RunError, match="run_status.json is unreadable"):
        resume(out, ROOT, env={})


def test_a_malformed_change_is_a_usage_error(tmp_path):
    done = _resume_cli("--output-dir", str(tmp_path), "-c", "num-rounds")
    assert done.returncode == 2 and "expected key=value" in done.stderr


def _fake_cli(monkeypatch, **replies: dict | list[dict]) -> list[list[str]]:
    """deploy.runs' `flwr` answering each subcommand (ls, run, log, stop) with its reply, or with
    its list of replies in turn (the last one again once they run out), as the CLI prints them
    with --format json; returns the argument lists it was given."""
    calls: list[list[str]] = []
    asked: dict[str, int] = {}

    def fake_flwr(args, env, cwd=None, timeout=120.0):
        calls.append(list(args))
        answers = replies[args[0]] if isinstance(replies[args[0]], list) else [replies[args[0]]]
        asked[args[0]] = asked.get(args[0], 0) + 1
        reply = answers[min(asked[args[0]], len(answers)) - 1]
        return subprocess.CompletedProcess(["flwr", *args], 0, stdout="Using SuperLink: fedads\n" + json.dumps(reply, indent=2), stderr="")

    monkeypatch.setattr(runs, "flwr", fake_flwr)
    return calls


UNAVAILABLE = {"success": False, "error-message": "Connection to the SuperLink is unavailable. Please check your network connection."}
RUNNING = {"success": True, "runs": [{"run-id": "7", "status": "running"}]}
NOT_FOUND = {"success": False, "error-message": f"{run_not_found_error()} Run ID not found."}


def test_a_superlink_that_does_not_answer_yet_is_asked_again(monkeypatch):
    calls = _fake_cli(monkeypatch, ls=[UNAVAILABLE, UNAVAILABLE, RUNNING])
    assert runs.run_status(7, env={}, retry_every=0.0) == {"run-id": "7", "status": "running"}
    assert len(calls) == 3 and all(call[:4] == ["ls", "fedads", "--run-id", "7"] for call in calls)


def test_an_unknown_run_is_told_apart_from_no_answer(monkeypatch):
    calls = _fake_cli(monkeypatch, ls=NOT_FOUND)
    assert runs.run_status(7, env={}, retry_every=0.0) == {}
    assert len(calls) == 1
    _fake_cli(monkeypatch, ls=UNAVAILABLE)
    with pytest.raises(RunError, match="did not say how run 7 stands within 0s: Connection to the SuperLink is unavailable"):
        runs.run_status(7, env={}, patience=0.0)


def test_a_resume_submits_nothing_while_the_superlink_does_not_answer(tmp_path, monkeypatch):
    """Without an answer the interrupted run may still be live: submitting would put a second
    ServerApp on its folder, so the resume stops with the reason instead."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "config.json").write_text(json.dumps({"num-rounds": 3}))
    (out / "run_status.json").write_text(json.dumps({"status": "running", "flower_run_id": 7, "rounds_planned": 3, "rounds_completed": 1}))
    calls = _fake_cli(monkeypatch, ls=UNAVAILABLE)
    monkeypatch.setattr(runs, "time", _InstantClock())
    with pytest.raises(RunError, match="did not say how run 7 stands"):
        resume(out, ROOT, env={})
    assert calls and all(call[0] == "ls" for call in calls)  # no `flwr stop`, no `flwr run`


class _InstantClock:
    """time for deploy.runs whose sleeps advance its clock instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_following_a_run_the_superlink_forgot_ends_at_once(monkeypatch):
    """An in-memory SuperLink that restarted no longer knows the run: its log ends at once and it
    is not found; following it says so instead of waiting out the whole timeout."""
    calls = _fake_cli(monkeypatch, log={}, ls=NOT_FOUND)
    with pytest.raises(RunError, match="no longer knows run 7"):
        runs.wait_for_run(7, env={}, timeout=3600.0)
    assert [call[0] for call in calls] == ["log", "ls"]


@pytest.mark.parametrize("answer", ["no answer", "refused"])
def test_a_resume_tells_a_refusal_from_no_answer(tmp_path, monkeypatch, answer):
    """`flwr run` that got no answer may have started the run all the same: the resume says so
    (and that the folder's lock makes resuming again safe) rather than calling it refused."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "config.json").write_text(json.dumps({"num-rounds": 3}))
    (out / "run_status.json").write_text(json.dumps({"status": "failed", "flower_run_id": 7, "rounds_planned": 3, "rounds_completed": 1}))
    reply = UNAVAILABLE if answer == "no answer" else {"success": False, "error-message": "[code: 1] the FAB is not allowed"}
    calls = _fake_cli(monkeypatch, ls={"success": True, "runs": [{"run-id": "7", "status": "finished:failed"}]}, run=reply)
    expected = r"got no answer from the SuperLink .* may have started nonetheless .* stops at the folder's lock" if answer == "no answer" \
        else "refused the resume: .code: 1. the FAB is not allowed"
    with pytest.raises(RunError, match=expected):
        resume(out, ROOT, env={})
    assert [call[0] for call in calls] == ["ls", "run"]  # asked once; nothing stopped


def test_waiting_for_supernodes_names_a_superlink_that_does_not_answer(tmp_path, monkeypatch):
    """`flwr supernode ls` without an answer is not "no SuperNode online": waiting for them says
    what the SuperLink last answered instead of only that too few came online."""
    from deploy.local import DeploymentError, LocalDeployment
    from deploy.superlink import ServerTls

    deployment = LocalDeployment(tmp_path, "127.0.0.1:1", "127.0.0.1:2", ServerTls(tmp_path, tmp_path, tmp_path), {}, {})
    answers = iter([UNAVAILABLE, {"success": True, "nodes": [{"status": "online"}, {"status": "offline"}]}])

    def fake_flwr(*args, env=None, timeout=120.0):
        return subprocess.CompletedProcess(["flwr", *args], 0, stdout=json.dumps(next(answers, UNAVAILABLE)), stderr="")

    monkeypatch.setattr(deployment, "flwr", fake_flwr)
    with pytest.raises(RunError, match="flwr supernode ls: Connection to the SuperLink is unavailable"):
        deployment.online_nodes()
    assert deployment.online_nodes() == 1
    with pytest.raises(DeploymentError, match=r"0 of 2 SuperNodes online after 0s \(the SuperLink's last answer: .*unavailable"):
        deployment.wait_online(2, timeout=0.0)
