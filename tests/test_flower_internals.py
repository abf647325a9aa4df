"""The fence around Flower's internals (shared/flower_internals.py): every private
name it uses still exists with the parameters and attributes used; no other module of the
project uses one; and the public path the runtime falls back to on another Flower runs the app
exactly as the warm runtime does, leaving no process behind."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import simulations.runtime  # noqa: F401  (before the pinned names import Ray: the runtime must configure Ray first)
from shared import flower_internals
from shared.flower_internals import PINNED, Pinned, resolve
from tests.conftest import is_loopback, listening_addresses, processes_mentioning, small_run_config

ROOT = Path(__file__).resolve().parents[1]
FENCE = ROOT / "shared" / "flower_internals.py"
PUBLIC_FLOWER = ("flwr.app", "flwr.clientapp", "flwr.serverapp")
NUM_CLIENTS = 3


def _project_files() -> Iterator[Path]:
    for package in ("client", "server", "shared", "simulations", "deploy"):
        yield from sorted((ROOT / package).rglob("*.py"))


def _has_attribute(obj: Any, name: str) -> bool:
    """On the object (a class's own, or its metaclass's), a dataclass field, or an instance
    attribute its source assigns (`self.name = ...`, `self.name: T = ...`)."""
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return True
    if any(name in vars(owner) for owner in (*inspect.getmro(type(obj)), *getattr(obj, "__mro__", ()))):
        return True
    if hasattr(obj, name):
        return True
    return re.search(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=", inspect.getsource(obj)) is not None


@pytest.mark.parametrize("pinned", PINNED, ids=lambda p: p.path)
def test_every_pinned_name_has_what_the_project_uses(pinned: Pinned):
    obj = resolve(pinned)
    if pinned.parameters:
        # a Ray actor class is called through Ray: its parameters are its class's own
        signature = inspect.signature(getattr(obj, "__ray_actor_class__", obj))
        assert set(pinned.parameters) <= set(signature.parameters), f"{pinned.path}{signature}"
    for attribute in pinned.attributes:
        assert _has_attribute(obj, attribute), f"{pinned.path} has no {attribute}"
    for text in pinned.source:
        assert text in inspect.getsource(obj), f"{pinned.path} no longer holds {text!r}"


def test_the_pin_check_sees_a_missing_name():
    pool = resolve(Pinned("flwr.simulation.ray_transport.ray_actor", "BasicActorPool"))
    assert _has_attribute(pool, "_future_to_actor") and not _has_attribute(pool, "_future_to_actors")
    with pytest.raises(AttributeError):
        resolve(Pinned("flwr.supercore.run", "Run.create_nothing"))
    with pytest.raises(ImportError):
        resolve(Pinned("flwr.no_such_module", "x"))


def test_the_installed_flower_is_supported():
    assert flower_internals.installed_version() == flower_internals.FLOWER_VERSION
    assert flower_internals.unresolved() == []
    assert flower_internals.supported()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr[simulation]=={flower_internals.FLOWER_VERSION}" in dependencies  # the pin and the fence agree


def test_the_ray_logger_the_driver_quiets_is_rays_worker_logger():
    logger = resolve(Pinned("ray._private.worker", "logger"))
    assert logger.name == "ray._private.worker"


def _flower_imports(tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(module, name) of every import from flwr, wherever it stands; name "" for `import flwr.x`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, "") for alias in node.names if alias.name.split(".")[0] == "flwr")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
            yield from ((node.module, alias.name) for alias in node.names)


def _private_flower_imports(source: str) -> list[str]:
    """Imports of anything but Flower's public `flwr.app`, `flwr.clientapp`, `flwr.serverapp`
    (and their sub-modules without a private component), or of a private name from them."""
    found = []
    for module, name in _flower_imports(ast.parse(source)):
        parts = module.split(".")
        public_module = ".".join(parts[:2]) in PUBLIC_FLOWER and not any(part.startswith("_") for part in parts)
        if not public_module or name.startswith("_"):
            found.append(f"{module}:{name}" if name else module)
    return found


def test_the_import_scan_sees_private_imports():
    source = "import flwr.common\nfrom flwr.serverapp import _secret, Grid\nfrom flwr.serverapp.strategy import FedAvg\n" \
             "def f():\n    from flwr.supercore.run import Run\n    from flwr.app._private import x\n"
    assert _private_flower_imports(source) == ["flwr.common", "flwr.serverapp:_secret", "flwr.supercore.run:Run", "flwr.app._private:x"]


def test_no_module_outside_the_fence_imports_a_private_flower_name():
    found = {str(path.relative_to(ROOT)): _private_flower_imports(path.read_text()) for path in _project_files() if path != FENCE}
    assert {path: names for path, names in found.items() if names} == {}
    assert len(found) > 50  # the scan sees the project


def test_every_private_flower_import_of_the_fence_is_pinned():
    pinned = {p.path for p in PINNED}
    imported = [f"{module}.{name}" for module, name in _flower_imports(ast.parse(FENCE.read_text())) if module != "flwr.app"]
    assert imported  # the scan sees the fence's imports
    assert [name for name in imported if not any(path == name or path.startswith(f"{name}.") for path in pinned)] == []


def test_private_flower_and_ray_names_appear_only_in_the_fence():
    # a dunder method of a pinned class (BaseHTTPMiddleware.__call__) is Python's name, not a private one
    private = {"__ray_ready__"} | {part for p in PINNED for part in (*p.name.split("."), *p.attributes)
                                   if part.startswith("_") and not (part.startswith("__") and part.endswith("__"))}
    assert {"__ray_ready__", "_future_to_actor", "_run_simulation", "_modify_class"} <= private
    found = {}
    for path in _project_files():
        if path != FENCE:
            text = path.read_text()
            names = set(re.findall(r"[A-Za-z_]\w*", text)) & private | ({"ray._private"} if "ray._private" in text else set())
            if names:
                found[str(path.relative_to(ROOT))] = sorted(names)
    assert found == {}


def test_another_flower_takes_the_public_path_with_one_warning_and_touches_nothing_private(tmp_path, monkeypatch, capsys):
    import simulations.runtime as runtime_module
    from simulations.runtime import SimulationRuntime

    monkeypatch.setattr(flower_internals, "FLOWER_VERSION", "0.0.0")
    monkeypatch.delenv(runtime_module.PATH_VARIABLE, raising=False)
    runtime_module._warn.cache_clear()

    def private(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a private Flower name was used")

    for name in ("unresolved", "quiet_ray_driver", "load_server_app", "new_actor_pool", "actor_ready", "standing_backend", "run_engine"):
        monkeypatch.setattr(flower_internals, name, private)
    for attempt in range(2):
        with SimulationRuntime(tmp_path / f"runtime-{attempt}") as runtime:
            assert not runtime.warm
        assert not (tmp_path / f"runtime-{attempt}" / "ray.log").exists()  # no Ray cluster was started
    warning = capsys.readouterr().err
    assert warning.count("fedads:") == 1  # once per process
    assert f"written for flwr 0.0.0, found {flower_internals.installed_version()}" in warning
    assert "Flower's public `flwr run` against a private SuperLink" in warning


def test_a_flower_lacking_a_pinned_name_takes_the_public_path(tmp_path, monkeypatch, capsys):
    """Same version, a name gone (a broken install): noticed as Ray starts, in the background;
    the first run warns, stops Ray and takes the public path."""
    import simulations.runtime as runtime_module
    from simulations.runtime import SimulationRuntime
    from simulations.runtime.public_path import PublicRun

    runtime_module._warn.cache_clear()
    monkeypatch.delenv(runtime_module.PATH_VARIABLE, raising=False)
    monkeypatch.setattr(flower_internals, "unresolved", lambda: ["flwr.simulation.run_simulation._run_simulation"])
    public_runs = []
    monkeypatch.setattr(runtime_module, "run_public", lambda *args, **kwargs: public_runs.append(args) or PublicRun("the log", None))
    with SimulationRuntime(tmp_path / "runtime") as runtime:
        assert runtime.warm
        assert runtime.run({"num-rounds": 1}, 2, tmp_path / "run") == "the log"
        assert not runtime.warm and len(public_runs) == 1
    assert "lacks Flower internals the warm simulation runtime uses (flwr.simulation.run_simulation._run_simulation)" in capsys.readouterr().err
    assert processes_mentioning(str(tmp_path / "runtime")) == []


def test_an_unknown_path_is_refused(tmp_path, monkeypatch):
    from simulations.runtime import PATH_VARIABLE, SimulationError, SimulationRuntime

    monkeypatch.setenv(PATH_VARIABLE, "lukewarm")
    with pytest.raises(SimulationError, match="must be 'warm' or 'public'"):
        SimulationRuntime(tmp_path)


class _ProcessesAtFirstReplies:
    """A stream for run_simulation that notes, once the first round's replies are in (every
    process of the run has started: Ray, the ClientApp actors), the live processes marked with
    the run's work dir: what the check after the run would find if they were left."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.seen: list[str] = []
        self.commands: list[list[str]] = []
        self.listening: dict[str, list[str]] = {}

    def write(self, text: str) -> None:
        if "aggregate_train: Received" in text and not self.seen:
            self.seen = processes_mentioning(str(self.work_dir))
            self.listening = listening_addresses(str(self.work_dir))
            for process in self.seen:
                try:
                    self.commands.append(Path(f"/proc/{process.split(':')[0]}/cmdline").read_text().split("\0"))
                except OSError:
                    pass

    def flush(self) -> None:
        pass


def test_the_public_path_runs_the_app_as_the_warm_runtime_does(tmp_path, monkeypatch):
    from simulations.runtime import PATH_VARIABLE, run_simulation

    monkeypatch.delenv(PATH_VARIABLE, raising=False)
    warm = small_run_config(tmp_path / "warm", **{"num-rounds": 1})
    run_simulation(warm.to_flower(), NUM_CLIENTS, tmp_path / "warm" / "flower", timeout=480)

    monkeypatch.setenv(PATH_VARIABLE, "public")
    public = small_run_config(tmp_path / "public", **{"num-rounds": 1})
    flower_dir = tmp_path / "public" / "flower"
    during = _ProcessesAtFirstReplies(flower_dir)
    log = run_simulation(public.to_flower(), NUM_CLIENTS, flower_dir, stream_to=during, timeout=480)

    warm_history = json.loads((tmp_path / "warm" / "out" / "history.json").read_text())
    public_history = json.loads((tmp_path / "public" / "out" / "history.json").read_text())
    assert [h["round"] for h in public_history] == [h["round"] for h in warm_history] == [0, 1]
    for p, w in zip(public_history, warm_history):
        assert sorted(p["clients"]) == sorted(w["clients"])
        assert p["evaluate"] == pytest.approx(w["evaluate"], abs=1e-9)  # ALS without privacy: deterministic
    out = tmp_path / "public" / "out"
    for path in ("checkpoints/round-0000.npz", "checkpoints/round-0001.npz", "model/global_model.npz", "metrics.csv"):
        assert (out / path).is_file(), path
    assert "[ROUND 1/1]" in log and "fedads" in log and "\x1b[" not in log
    assert (flower_dir / "flwr-run.log").read_text() == log

    # the run's processes carried its work dir (the check below sees them), and none is left
    superlink = next(command for command in during.commands if any(arg.endswith("/flower-superlink") for arg in command))
    assert "--disable-runtime-dependency-installation" in superlink and superlink[superlink.index("--host") + 1] == "127.0.0.1"
    for name in ("flwr-simulation", "raylet", "ClientAppActor"):
        assert any(name in p for p in during.seen), name
    # the SuperLink and the Ray that Flower starts listen on loopback only
    assert len(during.listening) >= 3
    assert {pid: a for pid, a in during.listening.items() if not all(map(is_loopback, a))} == {}
    assert processes_mentioning(str(flower_dir)) == []
    assert processes_mentioning(str(flower_dir / "flwr-home")) == []
    still = processes_mentioning("flower-superlink", "flwr-simulation", "raylet", "gcs_server", "ray::", environ=False)
    assert [p for p in still if p in during.seen] == []


def test_a_failing_run_on_the_public_path_raises_with_its_log(tmp_path, monkeypatch):
    """Flower's status of the run (failed) is read back: the harness raises with the log, which
    holds the ServerApp's own error, instead of returning as if it had trained."""
    from simulations.runtime import PATH_VARIABLE, SimulationError, run_simulation

    monkeypatch.setenv(PATH_VARIABLE, "public")
    cfg = small_run_config(tmp_path, **{"dataset": "movielens-100k", "data-path": str(tmp_path / "no-such-folder")})
    with pytest.raises(SimulationError, match="no-such-folder") as failure:
        run_simulation(cfg.to_flower(), 2, tmp_path / "flower", timeout=300)
    assert "the run failed (Flower's status finished:failed" in str(failure.value)
    assert "no-such-folder" in (tmp_path / "flower" / "flwr-run.log").read_text()
    assert processes_mentioning(str(tmp_path / "flower")) == []


def test_a_usage_report_flower_would_not_send_is_not_built(monkeypatch):
    telemetry = resolve(Pinned("flwr.supercore.telemetry", "event")).__module__
    module = sys.modules[telemetry]
    event_type = resolve(Pinned("flwr.supercore.telemetry", "EventType")).FLWR_CLIENTAPP_RUN_ENTER
    monkeypatch.setattr(module, "create_event", module.create_event)  # Flower's own again after the test
    monkeypatch.setattr(module, "FLWR_TELEMETRY_ENABLED", "1")
    flower_internals.skip_unsent_telemetry()
    assert module.create_event is resolve(Pinned("flwr.supercore.telemetry", "create_event"))  # reports on: built and sent as Flower does
    monkeypatch.setattr(module, "FLWR_TELEMETRY_ENABLED", "0")
    def architecture(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("built a report that is not sent")  # Flower's thread hands an Exception to the future

    monkeypatch.setattr(module.platform, "architecture", architecture)
    flower_internals.skip_unsent_telemetry()
    assert module.event(event_type).result(timeout=5) == "disabled"  # what Flower's own answers unsent


def test_deployed_processes_send_no_usage_reports_unless_asked():
    def switch(env: dict[str, str]) -> str:
        done = subprocess.run([sys.executable, "-c", "import deploy, os; print(os.environ['FLWR_TELEMETRY_ENABLED'])"],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    base = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    assert switch(base) == "0"
    assert switch({**base, "FLWR_TELEMETRY_ENABLED": "1"}) == "1"  # a merchant who wants them says so


class _FakeLinkState:
    """The two calls of Flower's LinkState the engine's loops make."""

    def __init__(self) -> None:
        self.instructions: dict[int, list[str]] = {}
        self.replies: list[str] = []

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        return [self.instructions[node_id].pop(0)] if self.instructions.get(node_id) else []

    def store_message_res(self, message: str) -> None:
        self.replies.append(message)


def test_the_engine_takes_a_pushed_message_when_woken_not_at_its_next_look(monkeypatch):
    import queue
    import threading

    monkeypatch.setattr(flower_internals, "ENGINE_LOOK", 60.0)  # a loop left to its own timer would not look again in this test
    monkeypatch.setattr(flower_internals, "ENGINE_WAKEUPS", flower_internals._EngineWakeups())  # this test's own: no other engine's
    state, stop = _FakeLinkState(), threading.Event()
    to_actors: queue.Queue[str] = queue.Queue()
    loop = threading.Thread(target=flower_internals._add_messages_to_queue, args=(state, to_actors, {1: 0, 2: 1}, stop), daemon=True)
    loop.start()
    try:
        for message in ("first", "second", "third"):
            state.instructions.setdefault(2, []).append(message)
            flower_internals.ENGINE_WAKEUPS.pushed.set()  # what CheckedGrid.push_messages does
            assert to_actors.get(timeout=10) == message
        state.instructions[1] = ["a", "b"]  # two at once for one node: taken one per look, without waiting between
        flower_internals.ENGINE_WAKEUPS.pushed.set()
        assert [to_actors.get(timeout=10), to_actors.get(timeout=10)] == ["a", "b"]
    finally:
        stop.set()
        flower_internals.ENGINE_WAKEUPS.pushed.set()
        loop.join(10)
    assert not loop.is_alive()


def test_the_grid_pulls_a_reply_when_the_engine_stores_it(monkeypatch):
    import queue
    import threading
    from types import SimpleNamespace

    monkeypatch.setattr(flower_internals, "ENGINE_WAKEUPS", flower_internals._EngineWakeups())  # this test's own: no other engine's

    state, stop = _FakeLinkState(), threading.Event()
    from_actors: queue.Queue[str] = queue.Queue()
    storing = threading.Thread(target=flower_internals._put_message_into_state, args=(state, from_actors, stop), daemon=True)
    storing.start()

    class Grid:
        pull_interval = 60.0  # a grid left to its own timer would not pull again in this test
        pulls = 0

        def push_messages(self, messages: list[str]) -> list[str]:
            return list(messages)

        def pull_messages(self, ids: set[str]) -> list[Any]:
            self.pulls += 1
            arrived = [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in state.replies if m in ids]
            state.replies = [m for m in state.replies if m not in ids]
            return arrived

    grid = Grid()
    answered: list[Any] = []
    exchange = threading.Thread(target=lambda: answered.extend(flower_internals.CheckedGrid(grid, lambda: None).send_and_receive(["x", "y"])),
                                daemon=True)
    try:
        exchange.start()
        from_actors.put("x")
        from_actors.put("y")
        exchange.join(10)
        assert not exchange.is_alive() and sorted(r.metadata.reply_to_message_id for r in answered) == ["x", "y"]
        assert grid.pulls <= 3
    finally:
        stop.set()
        storing.join(10)


def test_the_simulation_engine_runs_the_prompt_loops():
    flower_internals.prompt_engine_loops()
    flower_internals.prompt_engine_loops()  # again: Flower's own stays the one pinned
    vce = sys.modules[resolve(Pinned("flwr.server.superlink.fleet.vce.vce_api", "run_api")).__module__]
    assert vce.add_messages_to_queue is flower_internals._add_messages_to_queue
    assert vce.put_message_into_state is flower_internals._put_message_into_state
    flowers = resolve(Pinned("flwr.server.superlink.fleet.vce.vce_api", "add_messages_to_queue"))
    assert flowers is not flower_internals._add_messages_to_queue and "f_stop.wait(0.1)" in inspect.getsource(flowers)


def test_the_public_path_stops_asking_a_superlink_that_exited(monkeypatch):
    """After the run's log ended, its status is asked of the SuperLink until it shows the run
    finished: a SuperLink that exited meanwhile ends the wait at once, with the CLI's error,
    instead of at the run's deadline."""
    import json as json_module
    import subprocess as subprocess_module
    import time as time_module

    from simulations.runtime import public_path

    class Exited:
        returncode = 1

        def poll(self) -> int:
            return 1

    class Running(Exited):
        def poll(self) -> None:  # type: ignore[override]
            return None

    unavailable = {"success": False, "error-message": "Connection to the SuperLink is unavailable."}
    finished = {"success": True, "runs": [{"run-id": "3", "status": "finished:completed"}]}
    replies = iter([unavailable, finished])
    monkeypatch.setattr(public_path.subprocess, "run", lambda *a, **k: subprocess_module.CompletedProcess(a, 0, json_module.dumps(next(replies)), ""))
    far = time_module.monotonic() + 3600
    assert public_path._final_status(3, {}, far, Exited()) == (None, "Connection to the SuperLink is unavailable.")
    monkeypatch.setattr(public_path.time, "sleep", lambda seconds: None)
    replies = iter([unavailable, finished])
    assert public_path._final_status(3, {}, far, Running()) == (finished["runs"][0], None)  # asked again while it runs
