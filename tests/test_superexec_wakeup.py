"""The SuperExec woken by its SuperNode (deploy/superexec.py): the SuperNode's loop announces
every stored message, the SuperExec's pause between asks for work ends at the announcement, and
the shim the SuperNode starts by name runs Flower's SuperExec through this module."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import superexec
from shared import flower_internals
from shared.flower_internals import SUPEREXEC_COMMAND, resolve

DEADLINE = 60.0


def test_an_announced_message_ends_the_superexecs_pause(tmp_path: Path) -> None:
    wakeups = superexec.Wakeups(tmp_path / "superexec.sock")
    try:
        assert stat.S_IMODE((tmp_path / "superexec.sock").stat().st_mode) == 0o600  # the SuperNode's own
        notify = superexec.notifier(tmp_path / "superexec.sock")
        for _ in range(2):  # two messages announced while it was busy: two asks for work, at once
            notify()
        started = time.monotonic()
        wakeups.wait(DEADLINE)
        wakeups.wait(DEADLINE)
        assert time.monotonic() - started < DEADLINE / 2
        with pytest.raises(BlockingIOError):  # nothing left to wake it a third time
            wakeups.socket.recv(64)
    finally:
        wakeups.close()
    assert not (tmp_path / "superexec.sock").exists()


def test_an_announcement_with_no_superexec_listening_is_dropped(tmp_path: Path) -> None:
    superexec.notifier(tmp_path / "nobody.sock")()  # no error, no blocking: the SuperExec asks on its timer anyway


def test_the_supernode_loop_announces_each_stored_message(monkeypatch) -> None:
    module = __import__(flower_internals._SUPERNODE, fromlist=["_pull_and_store_message"])
    pulls = iter([None, 7, None, 8])
    monkeypatch.setattr(module, "_pull_and_store_message", lambda **kwargs: next(pulls))
    announced: list[int] = []
    flower_internals.notify_stored_messages(lambda: announced.append(1))
    results = [module._pull_and_store_message(state=None) for _ in range(4)]
    assert results == [None, 7, None, 8]  # Flower's loop sees what it saw before
    assert len(announced) == 2  # one per message stored, none per empty pull


def test_the_superexec_loop_pauses_with_the_given_wait(monkeypatch) -> None:
    module = __import__(flower_internals._SUPEREXEC_LOOP, fromlist=["time"])
    monkeypatch.setattr(module, "time", module.time)
    waited: list[float] = []
    flower_internals.superexec_waits_with(waited.append)
    module.time.sleep(1.0)
    assert waited == [1.0]
    assert module.time.monotonic is time.monotonic  # every other name is time's


def test_the_supernode_starts_the_superexec_by_the_name_the_shim_takes(tmp_path: Path) -> None:
    source = resolve(flower_internals.Pinned(flower_internals._SUPERNODE, "start_client_internal"))
    assert f'"{SUPEREXEC_COMMAND}"' in __import__("inspect").getsource(source)
    shim = superexec.write_shim(tmp_path / "bin")
    assert shim.name == SUPEREXEC_COMMAND and os.access(shim, os.X_OK)
    shown = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
                           env={**os.environ, superexec.WAKEUP_ENV: str(tmp_path / "superexec.sock")})
    assert shown.returncode == 0, shown.stderr
    assert "--runtime-api-address" in shown.stdout  # Flower's SuperExec, through this project's module
    assert not (tmp_path / "superexec.sock").exists()  # its socket went with it
    assert sys.executable in shim.read_text().splitlines()[0]


def test_a_superexec_that_cannot_be_woken_still_runs(tmp_path: Path) -> None:
    """No socket (a path past a Unix socket's 108 bytes), or this module not importable by the
    shim's Python: Flower's SuperExec, polling on its timer, rather than no SuperExec at all (a
    SuperNode whose messages nothing would run)."""
    shim = superexec.write_shim(tmp_path / "bin")
    too_long = tmp_path / ("x" * 120) / "superexec.sock"
    shown = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
                           env={**os.environ, superexec.WAKEUP_ENV: str(too_long)})
    assert shown.returncode == 0 and "--runtime-api-address" in shown.stdout, shown.stderr
    assert "wake-ups off" in shown.stderr
    broken = tmp_path / "broken"
    (broken / "deploy").mkdir(parents=True)
    (broken / "deploy" / "__init__.py").write_text("raise ImportError('not this project')\n")
    shown = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONPATH": str(broken)})
    assert shown.returncode == 0 and "--runtime-api-address" in shown.stdout, shown.stderr
