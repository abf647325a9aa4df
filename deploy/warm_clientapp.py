"""A warm start for the ClientApp process Flower's SuperNode starts for every message.

Flower 1.42's SuperExec runs each message in a fresh `flwr-clientapp` process, which spends
1.5-2 s importing Flower's runtime and the scientific stack before it reads the message: on a
2-core machine with three merchants that import, not the training, is most of a deployed round.
This module keeps one process per SuperNode with those imports done (shared.flower_internals
CLIENTAPP_PRELOAD), which runs each message's ClientApp itself or forks it for the message:

- `write_shim(folder)` writes an executable `flwr-clientapp` into `folder`, which
  the SuperNode puts first on its PATH. SuperExec starts it as it would start Flower's; the shim
  (Python without site-packages: about 20 ms) hands its arguments and its stdin, stdout and
  stderr to the warm process over a Unix socket and exits with the status of the ClientApp run
  for it. If the warm process is not there, it becomes Flower's own `flwr-clientapp`.
- `serve(socket_path, parent_pid)` is the warm process. With ISOLATION_ENV "shared" (the
  default) it runs each shim's ClientApp itself, in its main thread, one after another (a shim
  that comes meanwhile waits in the listener's backlog; once one waited TURN_AWAY_SECONDS, it
  and those after it during that run go to Flower's own ClientApp): Flower's run_clientapp steps without what ties
  them to a process of their own (shared.flower_internals.run_clientapp_here), on the shim's
  standard input, output and error. A forked process costs a message about 25 ms of CPU (the
  fork, then copy-on-write faults for every page either process touches: CPython writes
  reference counts) on a machine where three merchants' messages already contend for the cores;
  the app's state between messages is what it is in Flower's simulation, where one process runs
  a ClientApp message after message. With "process", or for a run that installs its own
  dependencies, or one that comes while a forked child still runs, it forks a child that runs
  Flower's `flwr-clientapp` entry point with the shim's arguments and descriptors, Flower's
  isolation. A child is stopped when its shim goes away (SuperExec stopped it); a run in the
  warm process ends when Flower stops its task (SIGINT, from its heartbeat), and every child and
  the warm process itself stop when the SuperNode process that started them is gone, SIGKILL
  included, also in the middle of a run (a watching thread). A run it cannot fork (no process
  or memory left for a moment), or that waited too long, it answers FALLBACK, and the shim (or the SuperExec's
  `hand_over`) starts Flower's own ClientApp for it.

The app's code comes from the FAB the SuperLink sent, never from the merchant's installed
fedads: a run forgets the modules of this project the warm process itself runs on (this
module and shared.flower_internals) before Flower loads the app, or the FAB's `shared` package
would resolve to the installed one (`forget_project_modules`). Once a ClientApp of a FAB has
run, the warm process imports what it imported of the app, from the FAB's installation
(`preload_app`; each child adds to the FAB's list in the install records what it imported that
the list lacked), so that later children start with the app loaded: the app's import cost a
ClientApp 50-100 ms of CPU per message, torch and Opacus on the DP-SGD path seconds. A child
whose message is of another FAB forgets those modules and imports its own (`_fab_in_use`).
Importing runs only the app's module-level code, the same in every process (what it sets in a
library, such as torch's thread count, stays set here), and only while no child runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.flower_internals import (
    CLIENTAPP_COMMAND,
    CLIENTAPP_PRELOAD,
    clientapp_runs_here,
    install_each_fab_once,
    prompt_object_pulls,
    run_clientapp_here,
    run_flower_command,
    skip_unsent_telemetry,
)

SOCKET_ENV = "FEDADS_WARM_CLIENTAPP"  # the shim finds the warm process's socket here
MAX_REQUEST_BYTES = 65536
HAND_OVER_SECONDS = 2.0  # the most the SuperExec waits to hand a run over before it starts the shim
PARENT_CHECK_SECONDS = 0.2
STOP_GRACE_SECONDS = 5.0  # a stop (SIGTERM, or the parent gone) not through by then ends the process at once
# a run that comes while one goes on in the warm process waits this long for it, then is turned
# away (FALLBACK): a run in the warm process never holds up another. Runs of one SuperNode come
# one at a time in a round; what overlaps is the tail of the last one (its status pushed, its
# heartbeat stopped: milliseconds), or a run that may never end, such as Flower 1.42's task for
# a message whose run stopped while the SuperNode was pulling it (the task stays claimable, its
# message's objects never come, and its ClientApp retries for up to two hours)
TURN_AWAY_SECONDS = 1.0
# how each message's ClientApp runs: "shared" (the default), in the warm process itself, one after
# another, as Flower's simulation runs them; "process", in a process forked for it, as Flower
# isolates each message
ISOLATION_ENV = "FEDADS_CLIENTAPP_ISOLATION"
ISOLATIONS = ("shared", "process")


def isolation_from_environment() -> str:
    """The isolation ISOLATION_ENV names (unset or empty: the default, ISOLATIONS[0]); not checked here."""
    return os.environ.get(ISOLATION_ENV) or ISOLATIONS[0]


# the warm process's answer when it could not fork the run (no memory or processes left for a
# moment) or turned it away: the requester starts Flower's own ClientApp for it, as without a
# warm process
FALLBACK = b"fallback"

SHIM = '''#!{python} -S
# fedads: hands this ClientApp run to the SuperNode's warm process (deploy/warm_clientapp.py)
import json, os, socket, sys
path = os.environ.get("{env}", "")
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
except OSError:
    os.execv("{fallback}", ["{fallback}", *sys.argv[1:]])
request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}).encode()
socket.send_fds(sock, [request], [0, 1, 2])
status = b""
while chunk := sock.recv(64):
    status += chunk
if status == {fallback_status!r}:
    os.execv("{fallback}", ["{fallback}", *sys.argv[1:]])
sys.exit(int(status) if status.strip() else 1)
'''


def hand_over(arguments: list[str], quiet: bool = False, socket_path: str | None = None) -> bool:
    """In the SuperExec process: the run Flower would start as `flwr-clientapp ARGUMENTS`, handed
    to the warm process as the shim hands it, without starting the shim (a Python process, 20-30
    ms of a message's time and CPU). A thread holds the connection until the run ends, as the shim
    does, so the run stops when this process goes. `quiet`: the run's stdout and stderr go to
    /dev/null (Flower's `suppress_output`); otherwise they are this process's. False when the warm
    process cannot be reached: the caller starts the shim (or Flower's own ClientApp) instead."""
    path = socket_path or os.environ.get(SOCKET_ENV, "")
    if not path:
        return False
    request = json.dumps({"argv": arguments, "cwd": os.getcwd()}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # a warm process that does not take the run at once (its backlog full) must not stall the
    # SuperExec's loop: the shim then waits for it instead
    sock.settimeout(HAND_OVER_SECONDS)
    devnull = os.open(os.devnull, os.O_RDWR) if quiet else None
    try:
        sock.connect(path)
        sent = socket.send_fds(sock, [request], [0, 1, 2] if devnull is None else [0, devnull, devnull])
        if sent != len(request):
            raise OSError(f"sent {sent} of {len(request)} bytes")
        sock.settimeout(None)
    except OSError:
        sock.close()
        return False
    except BaseException:
        sock.close()
        raise
    finally:
        if devnull is not None:
            os.close(devnull)
    threading.Thread(target=_hold_until_the_run_ends, args=(sock, arguments, quiet), name="fedads-clientapp", daemon=True).start()
    return True


def _hold_until_the_run_ends(sock: socket.socket, arguments: list[str], quiet: bool) -> None:
    answer = b""
    with sock:
        try:
            while chunk := sock.recv(64):  # the run's exit status, then the warm process closes
                answer += chunk
        except OSError:
            pass
    if answer == FALLBACK:
        output = subprocess.DEVNULL if quiet else None
        subprocess.run([str(flowers_clientapp()), *arguments], stdin=subprocess.DEVNULL, stdout=output, stderr=output, check=False)


def flowers_clientapp(python: str = sys.executable) -> Path:
    """Flower's own `flwr-clientapp` beside `python` (the shim's name is first on the PATH)."""
    return Path(python).parent / CLIENTAPP_COMMAND


def write_shim(folder: Path, python: str = sys.executable) -> Path:
    """An executable `flwr-clientapp` in `folder` (put `folder` first on the SuperNode's PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / CLIENTAPP_COMMAND
    shim.write_text(SHIM.format(python=python, env=SOCKET_ENV, fallback=flowers_clientapp(python), fallback_status=FALLBACK))
    shim.chmod(stat.S_IRWXU)
    return shim


# this project's packages (pyproject's packages.find): the ones a FAB carries its own copy of
PROJECT_PACKAGES = ("shared", "server", "client", "simulations", "deploy")


def forget_project_modules(packages: tuple[str, ...] = PROJECT_PACKAGES) -> list[str]:
    """Drop from sys.modules every module of this project's `packages` (as the merchant installed
    them: the warm process runs on them), so that the app's imports resolve in the FAB Flower
    puts first on sys.path. The functions already running keep their modules alive. Returns the
    names dropped."""
    dropped = [name for name in sys.modules if name.partition(".")[0] in packages]
    for name in dropped:
        del sys.modules[name]
    return dropped


MODULES_SUFFIX = ".modules"  # beside a FAB's install record: the app's modules its ClientApps imported


@dataclass
class _AppModules:
    """Which FAB's modules this process holds in sys.modules (the warm process: none, or the
    latest FAB a ClientApp ran), and, in a child, the FAB its message runs."""

    records: Path | None = None  # the install records (shared.flower_internals.install_each_fab_once)
    preloaded: tuple[str, Path] | None = None  # (sha256 of the FAB, where it is installed)
    imported: frozenset[str] = frozenset()  # the preloaded FAB's modules this process imported
    in_use: tuple[str, Path] | None = None
    switched: bool = False  # a child whose message's FAB was not the preloaded one


_app = _AppModules()


def _drop_from_path(folder: Path) -> None:
    sys.path[:] = [entry for entry in sys.path if entry != str(folder)]


def _modules_under(folder: Path, names: Iterable[str] | None = None) -> set[str]:
    """The modules in sys.modules (or of `names`, those in it) loaded from `folder` (a FAB's
    installation, on sys.path as Flower puts it there)."""
    prefix = os.path.join(str(folder), "")
    candidates = list(sys.modules.items()) if names is None else [(name, sys.modules.get(name)) for name in set(names)]
    return {name for name, module in candidates
            if isinstance(origin := getattr(module, "__file__", None), str) and origin.startswith(prefix)}


class _ImportRecorder:
    """First on a child's sys.meta_path: finds nothing, and remembers the name of every module
    the child imports (what is already in sys.modules is not looked for). Its report then looks
    at these alone: reading every module of sys.modules after a fork copies the pages that hold
    them, 20-30 ms of CPU a message on a 2-core machine."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        self.names.append(fullname)
        return None


_child_imports = _ImportRecorder()


def _parents_first(names: set[str]) -> list[str]:
    return sorted(names, key=lambda name: (name.count("."), name))


def _fab_in_use(sha: str, installed: Path) -> None:
    """In a child, before Flower loads the app: the FAB of its message. Modules of another FAB
    than the one preloaded are forgotten, so that the app is imported from its own."""
    _app.in_use = (sha, installed)
    if _app.preloaded is not None and _app.preloaded[0] != sha:
        forget_project_modules()
        _drop_from_path(_app.preloaded[1])
        _app.preloaded, _app.switched = None, True


def _report_app_modules(latest: bool = False) -> set[str]:
    """After a run (in a child, or in the warm process itself): the app modules it imported that
    the FAB's report does not list yet (a probe imports less than a training message), added to
    it for the warm process to import (`preload_app`); `latest`: the report is marked the latest
    even when nothing is added. The report is replaced whole, never left half written. Returns
    the modules of the FAB this run imported."""
    if _app.in_use is None or _app.records is None:
        return set()
    sha, installed = _app.in_use
    target = _app.records / f"{sha}{MODULES_SUFFIX}"
    # the FAB's modules preloaded here are on its list already: what this run imported is new
    imported = _modules_under(installed, _child_imports.names)
    listed = set(target.read_text().split()) if target.is_file() else set()
    if imported <= listed:
        if (_app.switched or latest) and listed:  # back to a FAB run before: the warm process takes it up again
            os.utime(target)
        return imported
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_text("\n".join(_parents_first(imported | listed)) + "\n")
    os.replace(partial, target)
    return imported


def preload_app() -> None:
    """In the warm process, between runs: the modules a ClientApp of the latest FAB imported,
    imported here once, so that every child forked afterwards has them (a fresh import of the
    app costs a ClientApp 50-100 ms of CPU). The process's own modules of this project (it runs
    on the merchant's installed fedads) are forgotten first: its functions keep theirs."""
    if _app.records is None or not (reports := list(_app.records.glob(f"*{MODULES_SUFFIX}"))):
        return
    latest = max(reports, key=lambda path: path.stat().st_mtime_ns)
    sha = latest.name.removesuffix(MODULES_SUFFIX)
    names = set(latest.read_text().split())
    if _app.preloaded is not None and _app.preloaded[0] == sha:
        installed = _app.preloaded[1]
        if names <= _app.imported:
            return
    else:
        record = _app.records / sha
        if not record.is_file() or not (installed := Path(record.read_text())).is_dir():
            return
        forget_project_modules()
        if _app.preloaded is not None:
            _drop_from_path(_app.preloaded[1])
        _app.preloaded, _app.imported = None, frozenset()
        sys.path.insert(0, str(installed))
    try:
        for name in _parents_first(names - _app.imported):
            importlib.import_module(name)
        if stray := sorted(names - _modules_under(installed)):
            raise ImportError(f"{stray[0]} was not imported from the FAB")
    except Exception:  # the children then import the app themselves, as Flower's would
        traceback.print_exc()
        forget_project_modules()
        _drop_from_path(installed)
        _app.preloaded, _app.imported = None, frozenset()
        return
    _app.preloaded, _app.imported = (sha, installed), frozenset(names)


def preload(install_records: Path) -> None:
    for module in CLIENTAPP_PRELOAD:
        importlib.import_module(module)
    _app.records = install_records
    install_each_fab_once(install_records, on_use=_fab_in_use)
    # started as soon as its message is announced, a ClientApp may ask before the objects are in
    prompt_object_pulls()
    skip_unsent_telemetry()
    _preload_app_or_say_why()


def _preload_app_or_say_why() -> None:
    try:
        preload_app()
    except Exception:  # an unreadable report or record: the children import the app themselves
        traceback.print_exc()


def _exit_status(exc: SystemExit) -> int:
    """The status a process ending with `exc` exits with (Python's rule for SystemExit's code)."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _run_child(request: dict[str, object], fds: list[int]) -> None:
    """In the forked child: become the shim's process (its descriptors and working directory) and
    run Flower's ClientApp entry point; never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        os.chdir(str(request["cwd"]))
        argv = request["argv"]
        assert isinstance(argv, list)
        if _app.preloaded is None:  # the warm process's own modules of this project, not the FAB's
            forget_project_modules()
        sys.meta_path.insert(0, _child_imports)
        run_flower_command(CLIENTAPP_COMMAND, [str(arg) for arg in argv])
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        try:  # nothing may unwind past here into the warm process's own loop, a copy of which this is
            try:
                _report_app_modules()
            except Exception:
                traceback.print_exc()  # only the next ClientApps' start is slower
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
        finally:
            os._exit(code)


class Stopped(SystemExit):
    """The warm process is stopping (SIGTERM, or its SuperNode gone): raised in its main thread,
    through a ClientApp running there, which then pushes nothing more."""


_on_abandon: list[Callable[[], None]] = []  # what an immediate exit still does (the socket's removal)


def _abandon() -> None:
    """A stop not through in STOP_GRACE_SECONDS (a ClientApp run that does not give way, a join
    on a thread waiting on a gone SuperNode): the process ends at once."""
    for cleanup in _on_abandon:
        cleanup()
    os._exit(1)


def _stop(signum: int, frame: object) -> None:
    timer = threading.Timer(STOP_GRACE_SECONDS, _abandon)
    timer.daemon = True
    timer.start()
    raise Stopped(0)


def _run_here(request: dict[str, object], fds: list[int]) -> int:
    """In the warm process itself: the shim's run of Flower's ClientApp, on the shim's standard
    input (the task token), output and error and in its working directory, all given back
    afterwards; returns its exit status. The app's modules stay imported for the next run (the
    FAB's own: `_fab_in_use`), as in Flower's simulation, where one process runs a ClientApp
    message after message; a run's state is the message, its Context and the merchant's files."""
    saved = [os.dup(target) for target in range(3)]
    saved_stdin, cwd = sys.stdin, os.getcwd()
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        fds.clear()
        sys.stdin = open(0, closefd=False)  # where Flower reads a task token given on standard input
        os.chdir(str(request["cwd"]))
        argv = request["argv"]
        assert isinstance(argv, list)
        if _app.preloaded is None:  # the warm process's own modules of this project, not the FAB's
            forget_project_modules()
        _child_imports.names.clear()
        sys.meta_path.insert(0, _child_imports)
        try:
            return run_clientapp_here([str(arg) for arg in argv])
        except Stopped:
            raise
        except SystemExit as exc:  # the arguments or the token refused, as Flower's process would exit
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            return _exit_status(exc)
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            sys.meta_path.remove(_child_imports)
            try:
                _after_run_here()
            except Exception:
                traceback.print_exc()  # only the next runs' start is slower
    finally:
        for fd in fds:
            os.close(fd)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for target, fd in enumerate(saved):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = saved_stdin
        os.chdir(cwd)


def _after_run_here() -> None:
    """The FAB a run in this process used is now the one loaded here: its report says so (for
    the children forked later, `preload_app`), and what the run imported counts as preloaded."""
    if _app.in_use is None:
        return
    imported = _report_app_modules(latest=True)
    if _app.preloaded == _app.in_use:
        _app.imported = _app.imported | frozenset(imported)
    else:
        _app.preloaded, _app.imported = _app.in_use, frozenset(imported)
    _app.in_use, _app.switched = None, False


def _watch_parent(parent_pid: int) -> None:
    """A thread of the warm process: when the SuperNode that started it is gone (SIGKILL
    included), the process stops, also in the middle of a ClientApp run in its main thread, which
    may wait on that SuperNode: SIGTERM to itself (`_stop`)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)


class WarmServer:
    """The warm process's loop: accept shims, fork a child per shim, report each child's exit."""

    def __init__(self, socket_path: Path, parent_pid: int, isolation: str = ISOLATIONS[0]) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"{ISOLATION_ENV}={isolation!r}: expected one of {', '.join(ISOLATIONS)}")
        self.parent_pid = parent_pid
        self.isolation = isolation
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if socket_path.exists():
            socket_path.unlink()
        old_umask = os.umask(0o177)  # the socket hands out the merchant's ClientApp: its owner only
        try:
            self.listener.bind(str(socket_path))
        finally:
            os.umask(old_umask)
        self.listener.listen(16)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        # a child's exit wakes the loop at once: SIGCHLD writes a byte into this pair
        self.wakeup, wakeup_writer = socket.socketpair()
        self.wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        self._wakeup_writer = wakeup_writer
        signal.set_wakeup_fd(wakeup_writer.fileno())
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector.register(self.wakeup, selectors.EVENT_READ)
        self.children: dict[int, socket.socket] = {}
        self.own_stderr = os.dup(2)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
            request = json.loads(data)
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        argv = request.get("argv") if isinstance(request, dict) else None
        if (self.isolation == "shared" and not self.children and isinstance(argv, list)
                and clientapp_runs_here([str(arg) for arg in argv])):
            with self._turning_away():  # later shims wait in the listener's backlog meanwhile
                status = _run_here(request, fds)
            with conn:
                try:
                    conn.sendall(str(status).encode())
                except OSError:
                    pass  # its shim is gone: the run's status is Flower's record, not the shim's
            return
        try:
            pid = os.fork()
        except OSError as exc:  # this run goes to Flower's own ClientApp; the warm process serves the next
            print(f"fedads: could not fork a ClientApp ({exc}): its requester starts Flower's own", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            with conn:
                try:
                    conn.sendall(FALLBACK)
                except OSError:
                    pass
            return
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for handled in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(handled, signal.SIG_DFL)
            self.selector.close()
            for own in (self.listener, self.wakeup, self._wakeup_writer, conn, *self.children.values()):
                own.close()
            os.close(self.own_stderr)
            _run_child(request, fds)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)

    @contextlib.contextmanager
    def _turning_away(self) -> Iterator[None]:
        """For a run in the main thread: a thread answers FALLBACK to the shims that wait for
        it longer than TURN_AWAY_SECONDS (they start Flower's own ClientApp). No fork there:
        a child forked from a thread while the main thread runs an app may inherit held locks.
        Without the thread (no descriptor or thread left for it) shims wait for the run."""
        done = threading.Event()
        pair: tuple[socket.socket, socket.socket] | None = None
        try:
            pair = socket.socketpair()
            thread = threading.Thread(target=self._turn_away_while, args=(done, pair[0]), name="fedads-turn-away", daemon=True)
            thread.start()
        except (OSError, RuntimeError) as exc:
            for end in pair or ():
                end.close()
            self._say(f"fedads: runs arriving during this ClientApp run wait for it ({exc})")
            yield
            return
        stop_reader, stop_writer = pair
        try:
            yield
        finally:
            done.set()
            stop_writer.close()  # wakes the thread's select
            thread.join()
            stop_reader.close()

    def _turn_away_while(self, done: threading.Event, stop_reader: socket.socket) -> None:
        waited = False  # once a shim waited TURN_AWAY_SECONDS for this run, the next ones do not wait
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(stop_reader, selectors.EVENT_READ)
            while not done.is_set():
                ready = {key.fileobj for key, _ in selector.select()}
                if self.listener not in ready or (not waited and done.wait(TURN_AWAY_SECONDS)):
                    continue  # the run ended: the main loop takes the shim
                waited = True
                try:
                    self._turn_away()
                except Exception:
                    self._say(traceback.format_exc())  # that shim waits for the main loop instead

    def _turn_away(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(HAND_OVER_SECONDS)
            fds: list[int] = []
            try:
                _, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                conn.sendall(FALLBACK)
            except OSError:
                return
        self._say("fedads: a ClientApp run is still under way in the warm process: the next one goes to Flower's own ClientApp")

    def _say(self, line: str) -> None:
        """A line on the warm process's own standard error (while a run goes on here, fd 2 is the
        run's); losing it never loses a run."""
        try:
            os.write(self.own_stderr, (line.rstrip("\n") + "\n").encode(errors="replace"))
        except OSError:
            pass

    def _reap(self) -> int:
        """Report every child that exited to its shim; returns how many."""
        reaped = 0
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            reaped += 1
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    self.selector.unregister(conn)
                except KeyError:
                    pass  # its shim is gone: _shim_gone unregistered it
                try:
                    conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:
                    pass
                conn.close()
        return reaped

    def _shim_gone(self, pid: int, conn: socket.socket) -> None:
        """A shim's socket became readable: it only ever closes, when SuperExec stopped the shim."""
        self.selector.unregister(conn)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _drain_wakeup(self) -> None:
        """Read away the SIGCHLD bytes (the reaping that follows each select does the work)."""
        try:
            while self.wakeup.recv(512):
                pass
        except BlockingIOError:
            pass

    def serve_forever(self) -> None:
        try:
            while os.getppid() == self.parent_pid:
                for key, _ in self.selector.select(timeout=PARENT_CHECK_SECONDS):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is self.wakeup:
                        self._drain_wakeup()
                    elif isinstance(key.fileobj, socket.socket):
                        self._shim_gone(key.data, key.fileobj)
                # between runs only: the imports would hold up the shims waiting to start and the
                # exits of the runs under way
                if self._reap() and not self.children:
                    _preload_app_or_say_why()
        finally:
            for pid in list(self.children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.listener.close()


def serve(socket_path: Path, parent_pid: int, remove_folder: bool = False) -> None:
    """Serve until the parent is gone or SIGTERM; `remove_folder`: then remove the socket's folder
    too (the SuperNode's private folder: it cannot clean up after itself when it is killed)."""
    # SIGTERM (the deployment stopping this SuperNode's group) ends the loop through its finally
    signal.signal(signal.SIGTERM, _stop)

    def remove() -> None:
        socket_path.unlink(missing_ok=True)
        if remove_folder:
            shutil.rmtree(socket_path.parent, ignore_errors=True)

    _on_abandon.append(remove)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="fedads-parent-watch", daemon=True).start()
    try:
        # listening before the imports: shims queue up, none falls back
        server = WarmServer(socket_path, parent_pid, isolation_from_environment())
        preload(socket_path.parent / "installed-fabs")
        server.serve_forever()
    finally:  # also when stopped during the imports
        remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="stop when this process is gone")
    parser.add_argument("--remove-folder", action="store_true", help="on the way out, remove the socket's folder")
    args = parser.parse_args(argv)
    serve(args.socket, args.parent_pid, args.remove_folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
