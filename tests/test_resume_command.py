"""`python -m deploy.runs resume`'s refusals, before it asks any SuperLink anything (the resume
itself, after a SuperLink restart: tests/test_deployment.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.runs import RunError, resume

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
