"""The deployed SuperNode without idle waits (issue 19): the warm ClientApp start
(deploy/warm_clientapp.py), the SuperNode's shortened waits (shared.flower_internals) and the
ServerApp's prompt grid (server/prompt_grid.py). End to end they run in tests/test_deployment.py,
whose SuperNodes are started this way."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deploy.merchant import supernode_command
from deploy.processes import THREAD_LIMIT_VARIABLES, _alive, _process_tree, thread_limit, usable_cores
from deploy.supernode import split_arguments
from deploy.warm_clientapp import FALLBACK, ISOLATION_ENV, SOCKET_ENV, TURN_AWAY_SECONDS, write_shim
from server import prompt_grid
from server.prompt_grid import PromptGrid
from shared import flower_internals
from shared.flower_internals import CLIENTAPP_COMMAND, resolve

DEADLINE = 60.0


def _wait_until(condition: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        time.sleep(0.05)


@pytest.fixture()
def warm(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], subprocess.Popen]]:
    """A warm process that forks every run (Flower's isolation, ISOLATION_ENV=process); runs in
    the warm process itself (shared, the default) are tested on their own below."""
    socket_path = tmp_path / "warm.sock"
    shim = write_shim(tmp_path / "bin")
    env = {**os.environ, SOCKET_ENV: str(socket_path)}
    server = subprocess.Popen([sys.executable, "-m", "deploy.warm_clientapp", "--socket", str(socket_path), "--parent-pid", str(os.getpid())],
                              stdin=subprocess.DEVNULL, env={**os.environ, ISOLATION_ENV: "process"})
    _wait_until(socket_path.exists, "the warm process listens")
    yield shim, env, server
    server.terminate()
    server.wait(timeout=30)


def test_superexec_starts_the_clientapp_by_the_name_the_shim_takes() -> None:
    commands = resolve(flower_internals.Pinned("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND"))
    assert CLIENTAPP_COMMAND in commands.values()


def test_the_shim_runs_flowers_clientapp_in_a_forked_child(warm) -> None:
    shim, env, server = warm
    shown = subprocess.run([str(shim), "--help"], env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: {CLIENTAPP_COMMAND}")  # Flower's own argument parser, on the shim's stdout
    refused = subprocess.run([str(shim), "--no-such-flag"], env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert refused.returncode == 2  # argparse's exit status, passed back through the warm process
    assert "one of the arguments --token --token-file is required" in refused.stderr
    assert server.poll() is None  # one child per run: the warm process itself carries on


@pytest.mark.parametrize("forget", [True, False])
def test_a_forked_clientapp_imports_the_projects_packages_from_the_fab(tmp_path: Path, forget: bool) -> None:
    """The warm process runs on the installed fedads (deploy, shared); a child that forgot those
    modules imports `shared` from the FAB Flower puts first on sys.path, as a fresh process
    would; without forgetting, the FAB's client code would run on the installed `shared`."""
    fab = tmp_path / "fab"
    (fab / "shared").mkdir(parents=True)
    (fab / "shared" / "__init__.py").write_text("")
    (fab / "shared" / "app_log.py").write_text("FROM_THE_FAB = True\n")
    code = (f"import json, sys, deploy.warm_clientapp as warm\n"
            f"assert 'shared.app_log' in sys.modules\n"
            f"dropped = warm.forget_project_modules() if {forget} else []\n"
            f"sys.path.insert(0, {str(fab)!r})\n"
            f"import shared.app_log\n"
            f"print(json.dumps([getattr(shared.app_log, 'FROM_THE_FAB', False), dropped]))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    from_fab, dropped = json.loads(shown.stdout)
    assert from_fab is forget
    if forget:  # the project's own modules only, not Flower's or numpy's
        assert {"deploy.warm_clientapp", "shared.flower_internals"} <= set(dropped)
        assert all(name.partition(".")[0] in ("deploy", "shared") for name in dropped)


def test_the_packages_forgotten_are_the_ones_the_project_installs() -> None:
    import tomllib

    from deploy.warm_clientapp import PROJECT_PACKAGES

    found = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert sorted(f"{name}*" for name in PROJECT_PACKAGES) == sorted(found["include"])


def test_without_the_warm_process_the_shim_is_flowers_clientapp(tmp_path: Path) -> None:
    shim = write_shim(tmp_path / "bin")
    env = {**os.environ, SOCKET_ENV: str(tmp_path / "nobody-listens.sock")}
    shown = subprocess.run([str(shim), "--help"], env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {CLIENTAPP_COMMAND}")


def test_a_stopped_shim_stops_its_child(warm) -> None:
    shim, env, server = warm
    # a ClientApp whose SuperNode never answers keeps retrying: a run that does not end by itself
    hanging = subprocess.Popen([str(shim), "--runtime-api-address", "127.0.0.1:9", "--token", "abc", "--insecure"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(lambda: len(_process_tree(server.pid)) > 1, "the warm process forked a child")
    child = max(_process_tree(server.pid) - {server.pid})
    hanging.kill()  # as SuperExec stops a ClientApp: the shim goes, the run must go with it
    hanging.wait()
    _wait_until(lambda: not _alive(child), "the orphaned run stopped")
    _wait_until(lambda: len(_process_tree(server.pid)) == 1, "the warm process reaped its child")
    shown = subprocess.run([str(shim), "--help"], env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert shown.returncode == 0 and server.poll() is None  # and it carries on serving


def test_flowers_executor_offers_a_clientapp_run_to_the_hand_over_first(monkeypatch) -> None:
    offered: list[tuple[list[str], bool]] = []
    takes = [True]
    started: list[list[str]] = []
    monkeypatch.setattr(flower_internals.subprocess, "Popen", lambda args, **kwargs: started.append(list(args)))
    handing = flower_internals._HandingOver(lambda arguments, quiet: offered.append((arguments, quiet)) or takes[0])
    assert handing.Popen([CLIENTAPP_COMMAND, "--token", "t"]) is None  # taken: no process
    assert handing.Popen([CLIENTAPP_COMMAND, "--token", "u"], stdout=handing.DEVNULL, stderr=handing.DEVNULL) is None
    assert offered == [(["--token", "t"], False), (["--token", "u"], True)] and started == []
    takes[0] = False  # the warm process is not there: Flower's process after all
    handing.Popen([CLIENTAPP_COMMAND, "--token", "v"])
    handing.Popen(["flwr-serverapp", "--token", "w"])  # not a ClientApp: never offered
    handing.Popen([CLIENTAPP_COMMAND, "--token", "x"], stdout=handing.PIPE)  # output Flower would read: never offered
    assert started == [[CLIENTAPP_COMMAND, "--token", "v"], ["flwr-serverapp", "--token", "w"], [CLIENTAPP_COMMAND, "--token", "x"]]
    assert len(offered) == 3
    assert handing.DEVNULL == subprocess.DEVNULL and handing.PIPE == subprocess.PIPE  # every other name is subprocess's


def test_a_run_the_warm_process_cannot_take_is_left_to_the_shim(tmp_path: Path, monkeypatch) -> None:
    from deploy.warm_clientapp import hand_over

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    assert hand_over(["--token", "t"]) is False  # no warm process named
    assert hand_over(["--token", "t"], socket_path=str(tmp_path / "nobody-listens.sock")) is False
    assert hand_over(["--token", "t"], quiet=True, socket_path=str(tmp_path / "nobody-listens.sock")) is False


def test_superexec_hands_a_run_to_the_warm_process_without_a_shim_and_the_run_ends_with_it(warm) -> None:
    _, env, server = warm
    # a SuperExec stand-in: Flower's executor launching a ClientApp run whose SuperNode never
    # answers (it keeps retrying: a run that does not end by itself), as deploy.superexec sets it up
    superexec = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from deploy.warm_clientapp import hand_over\n"
        "from shared.flower_internals import Pinned, launch_clientapps_with, resolve\n"
        "launch_clientapps_with(hand_over)\n"
        "executor = resolve(Pinned('flwr.supercore.superexec.executor.subprocess_executor', 'SubprocessExecutor'))()\n"
        "spec = resolve(Pinned('flwr.supercore.superexec.executor.types', 'ExecutionSpec'))(\n"
        "    task_type=resolve(Pinned('flwr.supercore.constant', 'TaskType')).CLIENT_APP, runtime_api_address='127.0.0.1:9',\n"
        "    token='abc', insecure=True, root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,\n"
        "    suppress_output=True, task_id=1)\n"
        "print(executor.launch(spec).status, flush=True)\n"
        "time.sleep(600)\n")], env=env, stdout=subprocess.PIPE, text=True)
    assert superexec.stdout is not None and superexec.stdout.readline().strip() == "accepted"
    _wait_until(lambda: len(_process_tree(server.pid)) > 1, "the warm process forked the run")
    child = max(_process_tree(server.pid) - {server.pid})
    assert _process_tree(superexec.pid) == {superexec.pid}  # no shim, no ClientApp process of its own
    superexec.kill()  # the SuperExec gone, SIGKILL included: its run goes with it
    superexec.wait()
    _wait_until(lambda: not _alive(child), "the run of a gone SuperExec stopped")
    _wait_until(lambda: len(_process_tree(server.pid)) == 1, "the warm process reaped its child")
    assert server.poll() is None


def test_a_run_the_warm_process_cannot_fork_goes_to_flowers_clientapp(tmp_path: Path, capfd) -> None:
    """No process or memory left for a moment: fork fails. The warm process says so and carries
    on; the shim, and the SuperExec's hand-over, start Flower's own ClientApp for that run."""
    import threading

    from deploy.warm_clientapp import hand_over

    socket_path = tmp_path / "warm.sock"
    shim = write_shim(tmp_path / "bin")
    failing_fork = (
        "import errno, os, sys\n"
        "def no_fork(): raise BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')\n"
        "os.fork = no_fork\n"
        "from deploy.warm_clientapp import main\n"
        f"sys.exit(main(['--socket', {str(socket_path)!r}, '--parent-pid', {str(os.getpid())!r}]))\n"
    )
    server = subprocess.Popen([sys.executable, "-c", failing_fork], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(socket_path.exists, "the warm process listens")
        env = {**os.environ, SOCKET_ENV: str(socket_path)}
        shown = subprocess.run([str(shim), "--help"], env=env, capture_output=True, text=True, timeout=DEADLINE)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {CLIENTAPP_COMMAND}"), shown.stderr
        capfd.readouterr()
        assert hand_over(["--help"], socket_path=str(socket_path)) is True  # taken: the warm process answers fallback
        for thread in threading.enumerate():
            if thread.name == "fedads-clientapp":
                thread.join(timeout=DEADLINE)
        assert capfd.readouterr().out.startswith(f"usage: {CLIENTAPP_COMMAND}")  # Flower's ClientApp, on our stdout
        assert server.poll() is None  # the warm process carries on
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert errors.count("could not fork a ClientApp ([Errno 11] Resource temporarily unavailable)") == 2


def test_the_warm_process_ends_with_its_supernode_even_on_sigkill(tmp_path: Path) -> None:
    socket_path = tmp_path / "warm.sock"
    # a stand-in SuperNode: starts the warm process as deploy.supernode does, then waits
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-m', 'deploy.warm_clientapp', '--socket', {str(socket_path)!r}, '--parent-pid', str(os.getpid())])\n"
        "time.sleep(600)\n")])
    _wait_until(socket_path.exists, "the warm process listens")
    warm_pids = _process_tree(parent.pid) - {parent.pid}
    assert warm_pids
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _wait_until(lambda: not any(_alive(pid) for pid in warm_pids), "the warm process outlived its SuperNode")
    assert not socket_path.exists()


def test_a_run_in_the_warm_process_ends_with_its_supernode_even_on_sigkill(tmp_path: Path) -> None:
    """With ISOLATION_ENV=shared a run goes on in the warm process itself: one whose SuperNode never answers
    (Flower's client retries) still ends, with the process, when the SuperNode is killed."""
    folder = tmp_path / "supernode"
    folder.mkdir()
    socket_path = folder / "warm.sock"
    shim = write_shim(tmp_path / "bin")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-m', 'deploy.warm_clientapp', '--socket', {str(socket_path)!r}, '--parent-pid', str(os.getpid()),"
        " '--remove-folder'])\n"
        "time.sleep(600)\n")], env={**os.environ, ISOLATION_ENV: "shared"})
    _wait_until(socket_path.exists, "the warm process listens")
    warm_pids = _process_tree(parent.pid) - {parent.pid}
    hanging = subprocess.Popen([str(shim), "--runtime-api-address", "127.0.0.1:9", "--token", "abc", "--insecure"],
                               env={**os.environ, SOCKET_ENV: str(socket_path)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        (warm_pid,) = warm_pids
        # taken by the warm process itself, on the shim's standard error; no child of its own
        _wait_until(lambda: os.readlink(f"/proc/{warm_pid}/fd/2") == os.readlink(f"/proc/{hanging.pid}/fd/2"),
                    "the run is under way in the warm process")
        assert _process_tree(parent.pid) == {parent.pid, warm_pid} and hanging.poll() is None
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _wait_until(lambda: not any(_alive(pid) for pid in warm_pids), "the warm process outlived its SuperNode")
        assert hanging.wait(timeout=DEADLINE) != 0  # its run ended unfinished
        assert not folder.exists()
    finally:
        hanging.kill()
        hanging.wait()


def test_a_run_that_comes_while_one_hangs_in_the_warm_process_is_turned_away(tmp_path: Path) -> None:
    """ISOLATION_ENV=shared: a run that never ends in the warm process (its SuperNode never
    answers; in a deployment, Flower's task for a message of a run stopped while it was pulled)
    does not hold up the next: after TURN_AWAY_SECONDS it is answered FALLBACK, and its
    requester starts Flower's own ClientApp."""
    socket_path = tmp_path / "warm.sock"
    shim = write_shim(tmp_path / "bin")
    server = subprocess.Popen([sys.executable, "-m", "deploy.warm_clientapp", "--socket", str(socket_path), "--parent-pid", str(os.getpid())],
                              env={**os.environ, ISOLATION_ENV: "shared"}, stderr=subprocess.PIPE, text=True)
    _wait_until(socket_path.exists, "the warm process listens")
    hanging = subprocess.Popen([str(shim), "--runtime-api-address", "127.0.0.1:9", "--token", "abc", "--insecure"],
                               env={**os.environ, SOCKET_ENV: str(socket_path)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: os.readlink(f"/proc/{server.pid}/fd/2") == os.readlink(f"/proc/{hanging.pid}/fd/2"),
                    "the run is under way in the warm process")
        descriptors = len(os.listdir(f"/proc/{server.pid}/fd"))
        request = json.dumps({"argv": ["--runtime-api-address", "127.0.0.1:9", "--token", "def", "--insecure"], "cwd": str(tmp_path)}).encode()
        first, second = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2))
        with first, second:
            asked = time.monotonic()  # before the connection: the warm process's wait begins with it
            for sock in (first, second):  # two requests queued behind the hanging run
                sock.settimeout(DEADLINE)
                sock.connect(str(socket_path))
                socket.send_fds(sock, [request], [0, 1, 2])
            answers = []
            for sock in (first, second):
                answer = b""
                while chunk := sock.recv(64):
                    answer += chunk
                answers.append(answer)
            waited = time.monotonic() - asked
        assert answers == [FALLBACK, FALLBACK]  # the second without a wait of its own
        assert TURN_AWAY_SECONDS <= waited < DEADLINE
        assert hanging.poll() is None  # the hanging run goes on
        # the turned-away requests' descriptors are closed in the warm process
        _wait_until(lambda: len(os.listdir(f"/proc/{server.pid}/fd")) == descriptors, "the warm process closed what it was sent")
    finally:
        server.terminate()
        hanging.kill()
        hanging.wait()
    assert server.wait(timeout=DEADLINE) == 0
    assert "the next one goes to Flower's own ClientApp" in server.stderr.read()


def test_a_warm_process_stopped_at_once_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = tmp_path / "supernode"
    folder.mkdir()
    socket_path = folder / "warm.sock"
    # stopped while it may still be importing (a SuperNode refused at once stops its group so)
    server = subprocess.Popen([sys.executable, "-m", "deploy.warm_clientapp", "--socket", str(socket_path),
                               "--parent-pid", str(os.getpid()), "--remove-folder"])
    _wait_until(socket_path.exists, "the warm process listens")
    server.terminate()
    assert server.wait(timeout=DEADLINE) == 0
    assert not folder.exists()


def test_supernode_waits_start_short_and_grow_back_to_flowers(monkeypatch) -> None:
    slept: list[float] = []
    clock = [100.0]
    monkeypatch.setattr(flower_internals.time, "sleep", slept.append)
    monkeypatch.setattr(flower_internals.time, "monotonic", lambda: clock[0])
    waits = flower_internals._PromptSleep(first=0.05, growth=1.3, local_wait=0.005)
    for _ in range(30):
        waits.sleep(3)  # Flower's wait after an empty pull (one that took no time on this clock)
    assert slept[0] == pytest.approx(0.05)
    assert slept[1] == pytest.approx(0.065)
    assert all(later >= earlier for earlier, later in zip(slept, slept[1:]))
    assert slept[-1] == 3  # long idle: Flower's own 3 s, no more
    clock[0] += 2.0  # a pull the SuperLink held for 2 s: the next one begins 3 s after it began
    waits.sleep(3)
    assert slept[-1] == pytest.approx(1.0)
    waits.sleep(0.5)  # Flower's look for the ClientApp's reply, in the SuperNode's own state
    assert slept[-1] == pytest.approx(0.005)
    for _ in range(60):  # a long run: looked for less often, never more than `first` apart
        waits.sleep(0.5)
    assert slept[-1] == pytest.approx(0.05) and all(look <= 0.05 for look in slept[-61:])
    clock[0] += 1.0  # the next reply waited for: prompt looks again
    waits.sleep(0.5)
    assert slept[-1] == pytest.approx(0.005)
    assert waits.monotonic is flower_internals.time.monotonic  # every other name is time's
    # with a message handled (Flower's short waits come only with one in hand) a new streak begins
    clock[0] += 0.01  # a pull answered in 10 ms: the next begins `first` after it began
    waits.sleep(3)
    assert slept[-1] == pytest.approx(0.04)
    clock[0] += 0.5  # a pull held for longer than the interval: the next at once
    waits.sleep(3)
    assert slept[-1] == 0.0
    for _ in range(30):
        waits.sleep(3)
    assert slept[-1] == 3
    waits.sleep(0.5)
    waits.sleep(3)
    assert slept[-1] == pytest.approx(0.05)


def test_supernode_waits_for_a_reply_end_when_the_clientapp_stores_it(monkeypatch) -> None:
    """A wait for the ClientApp's reply ends at the store, not at the end of its interval; a wait
    after an empty pull does not."""
    import threading

    stored = threading.Event()
    waits = flower_internals._PromptSleep(first=60.0, growth=1.0, local_wait=60.0, stored=stored)
    stored.set()  # stored between Flower's look and its wait
    began = time.monotonic()
    waits.sleep(2.9)  # a wait of up to 2.9 s, ended by the store
    assert time.monotonic() - began < 1.0 and not stored.is_set()  # taken: the next wait waits for the next store
    threading.Timer(0.05, stored.set).start()  # stored while the SuperNode waits
    began = time.monotonic()
    waits.sleep(2.9)
    assert time.monotonic() - began < 1.0 and not stored.is_set()
    slept: list[float] = []
    monkeypatch.setattr(flower_internals.time, "sleep", slept.append)
    stored.set()
    waits.sleep(3)  # Flower's idle wait: the SuperLink's to end, not a store
    assert slept and stored.is_set()


def test_a_clientapps_stores_in_the_supernodes_state_wake_its_loop(monkeypatch) -> None:
    state = flower_internals.resolve(flower_internals.Pinned("flwr.supernode.nodestate.in_memory_nodestate", "InMemoryNodeState"))
    calls: list[tuple[str, tuple[Any, ...]]] = []
    monkeypatch.setattr(state, "store_message_and_object_tree", lambda self, *args: calls.append(("message", args)) or (True, []))

    def refusing_store(self: Any, *args: Any) -> None:
        calls.append(("object", args))
        raise ValueError("no such object")

    monkeypatch.setattr(state, "store_object", refusing_store)
    stored = flower_internals.wake_on_clientapp_stores()
    assert not stored.is_set()
    assert state.store_message_and_object_tree(None, "reply", "tree", "session") == (True, [])  # Flower's answer, unchanged
    assert stored.is_set() and calls == [("message", ("reply", "tree", "session"))]
    stored.clear()
    with pytest.raises(ValueError, match="no such object"):  # Flower's error, unchanged; the loop looks anyway
        state.store_object(None, 7, "id", b"x")
    assert stored.is_set() and calls[-1] == ("object", (7, "id", b"x"))
    again = flower_internals.wake_on_clientapp_stores()  # asked again: the same event, Flower's method called once
    stored.clear()
    state.store_message_and_object_tree(None, "reply", "tree", "session")
    assert again is stored and stored.is_set() and len([c for c in calls if c[0] == "message"]) == 2


class _SlowGrid:
    """Replies to each pushed message after `after` pulls; records the pulls."""

    def __init__(self, after: dict[str, int]) -> None:
        self.after, self.pulls = after, 0

    def push_messages(self, messages: Any) -> list[str]:
        return [m for m in messages]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids if self.after[i] <= self.pulls]


def test_prompt_grid_collects_every_reply_looking_sooner_than_flower(monkeypatch) -> None:
    slept: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(prompt_grid.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(prompt_grid.time, "sleep", slept.append)
    grid = _SlowGrid({"a": 1, "b": 4, "c": 9})
    replies = PromptGrid(grid).send_and_receive(["a", "b", "c"])  # type: ignore[arg-type,list-item]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert grid.pulls == 9
    assert max(slept) <= prompt_grid.LONGEST_WAIT < 3.0  # Flower's deployed grid waits 3 s between pulls
    assert slept[0] == prompt_grid.FIRST_WAIT  # after a reply, the next look comes soon
    assert slept[1:3] == [prompt_grid.FIRST_WAIT, pytest.approx(prompt_grid.FIRST_WAIT * prompt_grid.WAIT_GROWTH)]


class _HoldingGrid(_SlowGrid):
    """A SuperLink that holds an empty pull for `hold` seconds of the test's clock."""

    def __init__(self, after: dict[str, int], clock: list[float], hold: float) -> None:
        super().__init__(after)
        self.clock, self.hold = clock, hold

    def pull_messages(self, ids: Any) -> list[Any]:
        arrived = super().pull_messages(ids)
        self.clock[0] += 0.002 if arrived else self.hold
        return arrived


def test_prompt_grid_pulls_again_at_once_after_a_held_pull(monkeypatch) -> None:
    slept: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(prompt_grid.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(prompt_grid.time, "sleep", lambda seconds: (slept.append(seconds), clock.__setitem__(0, clock[0] + seconds)))
    grid = _HoldingGrid({"a": 1, "b": 4}, clock, hold=0.5)
    replies = PromptGrid(grid).send_and_receive(["a", "b"])  # type: ignore[arg-type,list-item]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    # the pull after the first reply comes FIRST_WAIT after the last began; a held pull counts as waiting
    assert slept == [pytest.approx(prompt_grid.FIRST_WAIT - 0.002), 0.0, 0.0]


def test_prompt_grid_gives_up_at_the_timeout(monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(prompt_grid.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(prompt_grid.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    grid = _SlowGrid({"a": 1, "never": 10**9})
    replies = PromptGrid(grid).send_and_receive(["a", "never"], timeout=5.0)  # type: ignore[arg-type,list-item]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert clock[0] == pytest.approx(5.0)


def test_a_fab_is_unpacked_once_per_content(monkeypatch, tmp_path: Path) -> None:
    module = __import__("flwr.supernode.runtime.run_clientapp", fromlist=["install_from_fab"])
    unpacked: list[bytes] = []

    def fake_install(fab_file: Any, install_dir: Any = None, skip_prompt: bool = False) -> Path:
        unpacked.append(fab_file)
        target = tmp_path / "apps" / f"app-{len(unpacked)}"
        target.mkdir(parents=True)
        return target

    monkeypatch.setattr(module, "install_from_fab", fake_install)
    flower_internals.install_each_fab_once(tmp_path / "records")
    first = module.install_from_fab(b"fab one", skip_prompt=True)
    assert module.install_from_fab(b"fab one", skip_prompt=True) == first  # the same bytes: not unpacked again
    other = module.install_from_fab(b"fab two", skip_prompt=True)
    assert other != first and unpacked == [b"fab one", b"fab two"]
    first.rmdir()  # an installation that is gone is installed again
    assert module.install_from_fab(b"fab one", skip_prompt=True) != first
    assert len(unpacked) == 3


def test_an_installed_fab_is_compiled_to_bytecode_once(monkeypatch, tmp_path: Path) -> None:
    """Where Python writes no bytecode (PYTHONDONTWRITEBYTECODE), every ClientApp would compile
    the app's modules from source again: the installation compiles them once."""
    module = __import__("flwr.supernode.runtime.run_clientapp", fromlist=["install_from_fab"])

    def fake_install(fab_file: Any, install_dir: Any = None, skip_prompt: bool = False) -> Path:
        target = tmp_path / "apps" / "app"
        (target / "pkg").mkdir(parents=True)
        (target / "pkg" / "__init__.py").write_text("")
        (target / "pkg" / "task.py").write_text("VALUE = 42\n")
        return target

    monkeypatch.setattr(module, "install_from_fab", fake_install)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    flower_internals.install_each_fab_once(tmp_path / "records")
    installed = module.install_from_fab(b"fab", skip_prompt=True)
    compiled = sorted(p.name.split(".")[0] for p in (installed / "pkg" / "__pycache__").glob("*.pyc"))
    assert compiled == ["__init__", "task"]


def test_object_pulls_retry_sooner(monkeypatch) -> None:
    module = __import__(flower_internals._INFLATABLE, fromlist=["pull_objects"])
    for function in (module.pull_objects, module.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    flower_internals.prompt_object_pulls(first=0.01, longest=1.0)
    for function in (module.pull_objects, module.pull_and_inflate_object_from_tree):
        assert function.__kwdefaults__["initial_backoff"] == 0.01 and function.__kwdefaults__["backoff_cap"] == 1.0
    # an object that is not there yet is asked for again after 10 ms, not Flower's 1 s
    asked: list[float] = []

    def not_yet(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < 3:
            raise module.ObjectUnavailableError(object_id)
        return b"content"

    assert module.pull_objects(["x"], not_yet) == {"x": b"content"}
    assert asked[-1] - asked[0] < 0.7  # Flower waits at least 0.8 s (1 s, jittered by 20%) before the second look


def test_supernode_log_lines_carry_the_time(monkeypatch) -> None:
    import logging

    handlers = [h for h in logging.getLogger("flwr").handlers if hasattr(h, "timestamps")]
    assert handlers  # Flower's console handler
    for handler in handlers:
        monkeypatch.setattr(handler, "timestamps", False)
    flower_internals.timestamp_flower_logs()
    record = logging.LogRecord("flwr", logging.INFO, __file__, 1, "Sending: train message", None, None)
    line = handlers[0].format(record)
    assert "Sending: train message" in line and time.strftime("%Y-%m-%d") in line


PRELOAD_DRIVER = '''
import sys
from pathlib import Path
import deploy.warm_clientapp as warm
import flwr.supernode.runtime.run_clientapp as run_clientapp
from shared import flower_internals
fabs = {b"fab-one": Path(sys.argv[3]), b"fab-two": Path(sys.argv[4])}
run_clientapp.install_from_fab = lambda fab_file, install_dir=None, skip_prompt=False: fabs[fab_file]
flower_internals.FLOWER_COMMANDS[flower_internals.CLIENTAPP_COMMAND] = ("probe_entry", "main")
warm.serve(Path(sys.argv[1]), int(sys.argv[2]))
'''

PROBE_ENTRY = '''
import importlib, json, os, sys
def main():
    before = "client.task" in sys.modules
    run_clientapp = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    installed = run_clientapp.install_from_fab(sys.argv[1].encode(), skip_prompt=True)
    kept = "client.task" in sys.modules
    if str(installed) not in sys.path:
        sys.path.insert(0, str(installed))
    import client.task
    here = client.task.IMPORTED_BY == os.getpid()
    shown = {"preloaded": before, "kept": kept, "from": client.task.FROM, "imported_here": here}
    if sys.argv[2:] == ["more"]:  # imports another module of the app; True: it had not been preloaded
        shown["more"] = "client.more" not in sys.modules
        import client.more
    print(json.dumps(shown))
'''


def _fake_fab(folder: Path, name: str) -> Path:
    (folder / "client").mkdir(parents=True)
    (folder / "client" / "__init__.py").write_text("")
    (folder / "client" / "task.py").write_text(f"import os\nFROM = {name!r}\nIMPORTED_BY = os.getpid()\n")
    (folder / "client" / "more.py").write_text("")
    return folder


def test_the_warm_process_imports_the_app_a_clientapp_imported_once_for_the_next_ones(tmp_path: Path) -> None:
    """The first ClientApp of a FAB imports the app and names its modules; the warm process then
    imports them once, and the children forked afterwards find them loaded (from the FAB). A
    message of another FAB forgets them and imports its own."""
    one, two = _fake_fab(tmp_path / "fab-one", "one"), _fake_fab(tmp_path / "fab-two", "two")
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "probe_entry.py").write_text(PROBE_ENTRY)
    (tmp_path / "driver.py").write_text(PRELOAD_DRIVER)
    socket_path = tmp_path / "run" / "warm.sock"
    socket_path.parent.mkdir()
    shim = write_shim(tmp_path / "bin")
    env = {**os.environ, SOCKET_ENV: str(socket_path), "PYTHONPATH": os.pathsep.join([str(tmp_path / "entry"), os.getcwd()])}
    server = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(socket_path), str(os.getpid()), str(one), str(two)],
                              env=env, stdin=subprocess.DEVNULL)
    try:
        _wait_until(socket_path.exists, "the warm process listens")

        def run(fab: str) -> dict[str, Any]:
            done = subprocess.run([str(shim), *fab.split()], env=env, capture_output=True, text=True, timeout=DEADLINE)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout.strip().splitlines()[-1])

        assert run("fab-one") == {"preloaded": False, "kept": False, "from": "one", "imported_here": True}  # the first imports the app
        reports = list((socket_path.parent / "installed-fabs").glob("*.modules"))
        assert len(reports) == 1 and reports[0].read_text().split() == ["client", "client.task"]
        # a run that imports more (a training message, after a probe) adds its modules to the report
        assert run("fab-one more") == {"preloaded": True, "kept": True, "from": "one", "imported_here": False, "more": True}
        assert reports[0].read_text().split() == ["client", "client.more", "client.task"]
        assert run("fab-one more") == {"preloaded": True, "kept": True, "from": "one", "imported_here": False, "more": False}
        for _ in range(2):  # imported once, by the warm process, before these children were forked
            assert run("fab-one") == {"preloaded": True, "kept": True, "from": "one", "imported_here": False}
        # another FAB: the preloaded modules are forgotten and its own imported, then preloaded in turn
        assert run("fab-two") == {"preloaded": True, "kept": False, "from": "two", "imported_here": True}
        assert run("fab-two") == {"preloaded": True, "kept": True, "from": "two", "imported_here": False}
        # back to the first FAB: its first run imports it, and the warm process takes it up again
        assert run("fab-one") == {"preloaded": True, "kept": False, "from": "one", "imported_here": True}
        assert run("fab-one") == {"preloaded": True, "kept": True, "from": "one", "imported_here": False}
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_clientapp_threads_and_isolation_are_the_supernodes_own_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ISOLATION_ENV, raising=False)
    flower = ["--superlink", "h:1", "--clientappio-api-address", "127.0.0.1:9094", "--node-config", "c.toml"]

    def split(arguments: list[str]) -> tuple[int | None, str, list[str]]:
        own, rest = split_arguments(arguments)
        return own.clientapp_threads, own.clientapp_isolation, rest

    assert split(["--clientapp-threads", "2", *flower]) == (2, "shared", flower)
    assert split([*flower[:2], "--clientapp-threads=1", "--clientapp-isolation", "shared", *flower[2:]]) == (1, "shared", flower)
    assert split(flower) == (None, "shared", flower)  # Flower's arguments untouched, abbreviations never taken
    for wrong in (["--clientapp-threads", "0"], ["--clientapp-threads", "-1"], ["--clientapp-threads", "two"],
                  ["--clientapp-isolation", "thread"]):
        with pytest.raises(SystemExit):
            split_arguments(wrong)
    monkeypatch.setenv(ISOLATION_ENV, "process")  # the environment's choice is the default, an option still wins
    assert split(flower) == (None, "process", flower)
    assert split(["--clientapp-isolation", "shared", *flower]) == (None, "shared", flower)
    monkeypatch.setenv(ISOLATION_ENV, "thread")
    with pytest.raises(SystemExit):
        split_arguments(flower)
    assert supernode_command("h:1", "ca", "k", "cfg", clientapp_isolation="shared")[5:7] == ["--clientapp-isolation", "shared"]
    assert thread_limit(None) == {}
    assert supernode_command("h:1", "ca", "k", "cfg", clientapp_threads=3)[5:7] == ["--clientapp-threads", "3"]
    assert "--clientapp-threads" not in supernode_command("h:1", "ca", "k", "cfg")


def _thread_pools(environment: dict[str, str]) -> dict[str, int]:
    program = ("import json, numpy, torch, threadpoolctl\n"
               "pools = {p['internal_api']: p['num_threads'] for p in threadpoolctl.threadpool_info()}\n"
               "print(json.dumps({**pools, 'torch': torch.get_num_threads()}))")
    shown = subprocess.run([sys.executable, "-c", program], env=environment, capture_output=True, text=True, timeout=DEADLINE, check=True)
    return dict(json.loads(shown.stdout))


def test_the_thread_limit_holds_for_the_libraries_a_clientapp_uses() -> None:
    """The variables deploy.supernode sets limit numpy's OpenBLAS (and torch), which otherwise
    take a thread per core."""
    unlimited = {name: value for name, value in os.environ.items() if name not in THREAD_LIMIT_VARIABLES}
    limited = _thread_pools({**unlimited, **thread_limit(1)})
    assert "openblas" in limited and set(limited.values()) == {1}, limited
    if usable_cores() > 1:  # on one core the limit changes nothing to see
        assert _thread_pools(unlimited)["openblas"] == usable_cores()
        assert _thread_pools({**unlimited, **thread_limit(2)})["openblas"] == 2


class _FakeRuntime:
    """Flower's run_clientapp module as `run_clientapp_here` uses it, with the SuperNode's
    Runtime API stood in for: what the run pulled, pushed and reported."""

    def __init__(self, app: Any) -> None:
        from flwr.app import Message, RecordDict

        with flower_internals.server_identity():
            self.message = Message(content=RecordDict(), dst_node_id=1, message_type="train")
        self.message.metadata.__dict__["_message_id"] = "m1"
        self.app = app
        self.pushed: list[Any] = []
        self.outputs: list[tuple[str, str]] = []
        self.events: list[str] = []
        self.heartbeats_stopped = 0
        self.retry = SimpleNamespace(max_tries=None)

    def push(self, reply: Any) -> None:
        self.pushed.append(reply)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
        fake = self

        class Client:
            @staticmethod
            def from_server_address(**kwargs: Any) -> Any:
                return SimpleNamespace(close=lambda: None)

        class Heartbeat:
            def __init__(self, fn: Any) -> None:
                self.running = False

            def start(self) -> None:
                self.running = True

            def stop(self) -> None:
                self.running = False
                fake.heartbeats_stopped += 1

            @property
            def is_running(self) -> bool:
                return self.running

        context = SimpleNamespace(node_id=1, run_id=1)
        run = SimpleNamespace(fab_id="fedads", fab_version="0", run_id=1)
        fab = SimpleNamespace(content=b"fab", hash_str="h")
        monkeypatch.setattr(module, "RuntimeHttpClient", Client)
        monkeypatch.setattr(module, "make_simple_http_retry_invoker", lambda: self.retry)
        monkeypatch.setattr(module, "HeartbeatSender", Heartbeat)
        monkeypatch.setattr(module, "make_task_heartbeat_fn_http", lambda client: None)
        monkeypatch.setattr(module, "pull_task_input", lambda client: (self.message, context, run, fab))
        monkeypatch.setattr(module, "install_from_fab", lambda content, skip_prompt=False: Path("."))
        monkeypatch.setattr(module, "get_load_client_app_fn", lambda **kwargs: lambda *ids: self.app)
        monkeypatch.setattr(module, "push_message", lambda client, reply, ctx: self.push(reply))
        monkeypatch.setattr(module, "push_task_output",
                            lambda client, context, sub_status, details: self.outputs.append((sub_status, details)))
        monkeypatch.setattr(module, "event", lambda event_type, details=None: self.events.append(event_type.name))


TOKEN = "ab" * 32  # a task token as Flower writes them (hex)


def _run_here(fake: _FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> int:
    fake.install(monkeypatch)
    before = signal.getsignal(signal.SIGINT)
    status = flower_internals.run_clientapp_here(["--runtime-api-address", "127.0.0.1:9", "--token", TOKEN, "--insecure"])
    assert signal.getsignal(signal.SIGINT) is before  # this process's own handler again
    assert fake.heartbeats_stopped == 1 and fake.retry.max_tries == 1
    assert fake.events == ["FLWR_CLIENTAPP_RUN_ENTER", "FLWR_CLIENTAPP_RUN_LEAVE"]
    return status


def test_a_clientapp_run_here_pushes_its_reply_then_its_status(monkeypatch) -> None:
    from flwr.app import Message, RecordDict

    replies: list[Message] = []

    def app(message: Message, context: Any) -> Message:
        replies.append(Message(RecordDict(), reply_to=message))
        return replies[-1]

    fake = _FakeRuntime(app)
    assert _run_here(fake, monkeypatch) == 0
    assert fake.pushed == replies and fake.outputs == [("completed", "")]


def test_a_clientapp_that_raises_here_replies_with_flowers_error_and_fails(monkeypatch) -> None:
    from flwr.common.constant import ErrorCode

    def app(message: Any, context: Any) -> Any:
        raise ValueError("no shard")

    fake = _FakeRuntime(app)
    assert _run_here(fake, monkeypatch) == 1  # Flower's process exits 1 for it
    (reply,) = fake.pushed
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION and "no shard" in reply.error.reason
    assert fake.outputs == [("failed", "<class 'ValueError'>:<'no shard'>")]


def test_flower_stopping_a_task_here_ends_the_task_not_the_process(monkeypatch) -> None:
    """Flower stops a task by SIGINT (its heartbeat does when the SuperNode no longer knows the
    task): the run ends without a reply, its status failed, and this process carries on."""
    def app(message: Any, context: Any) -> Any:
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the app ran on past the stop")

    fake = _FakeRuntime(app)
    assert _run_here(fake, monkeypatch) == 0  # Flower's process exits 0 after SIGINT
    assert fake.pushed == [] and fake.outputs == [("failed", "Task stopped.")]


def test_a_stop_that_crosses_the_end_of_a_task_here_changes_nothing(monkeypatch) -> None:
    from flwr.app import Message, RecordDict

    fake = _FakeRuntime(lambda message, context: Message(RecordDict(), reply_to=message))

    def push_then_stopped(reply: Any) -> None:
        fake.pushed.append(reply)
        signal.raise_signal(signal.SIGINT)  # the heartbeat of a task whose reply is in

    fake.push = push_then_stopped  # type: ignore[method-assign]
    assert _run_here(fake, monkeypatch) == 0
    assert len(fake.pushed) == 1 and fake.outputs == [("completed", "")]


def test_this_process_stopping_leaves_a_run_here_at_once(monkeypatch) -> None:
    def app(message: Any, context: Any) -> Any:
        raise SystemExit(0)  # the warm process's SIGTERM handler, raising in the app

    fake = _FakeRuntime(app)
    fake.install(monkeypatch)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        flower_internals.run_clientapp_here(["--token", TOKEN, "--insecure"])
    assert fake.pushed == [] and fake.outputs == [] and signal.getsignal(signal.SIGINT) is before


def test_only_a_run_without_its_own_dependencies_runs_here() -> None:
    assert flower_internals.clientapp_runs_here(["--token", TOKEN, "--insecure"])
    assert not flower_internals.clientapp_runs_here(["--token", TOKEN, "--allow-runtime-dependency-installation"])
    assert not flower_internals.clientapp_runs_here(["--help"])  # Flower's help goes where the run's output goes
    assert not flower_internals.clientapp_runs_here(["--no-such-flag"])  # refused by Flower's own process
