"""A merchant's SuperExec: Flower's `flower-superexec`, woken by its SuperNode when a message
arrives instead of asking for work on a timer.

    python -m deploy.superexec [flower-superexec arguments]

Flower 1.42's SuperNode starts `flower-superexec` by name; deploy.supernode puts a shim of that
name (`write_shim`) first on its PATH, which runs this module. Flower's SuperExec asks the
SuperNode for a task, then sleeps FLWR_SUPEREXEC_TASK_POLL_INTERVAL and asks again: every
message waits up to that interval before its ClientApp starts, and a short interval makes three
SuperExecs and their SuperNodes answer 60 empty asks a second between messages, CPU that a
deployed round on a small machine lacks (docs/BENCHMARKS.md, "Deployment"). Here:

- the SuperNode sends a datagram to a Unix socket in its private folder each time it has stored
  a message and its task (`notifier`, shared.flower_internals.notify_stored_messages);
- the SuperExec's pause between asks ends at the first datagram (`Wakeups.wait`,
  shared.flower_internals.superexec_waits_with), so it asks at once, and otherwise after the
  poll interval as before: a lost datagram costs at most one interval, never the message;
- a ClientApp run goes straight to the SuperNode's warm process (deploy.warm_clientapp
  `hand_over`, shared.flower_internals.launch_clientapps_with) instead of through a
  `flwr-clientapp` shim process started for each message; when the warm process cannot be
  reached, the shim (and through it Flower's own ClientApp) starts as before.

Without FEDADS_SUPEREXEC_WAKEUP (FEDADS_WARM_CLIENTAPP) in its environment it waits (starts
ClientApps) as Flower's SuperExec does.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from deploy.warm_clientapp import SOCKET_ENV, hand_over
from shared.flower_internals import SUPEREXEC_COMMAND, launch_clientapps_with, run_flower_command, skip_unsent_telemetry, superexec_waits_with

WAKEUP_ENV = "FEDADS_SUPEREXEC_WAKEUP"  # the socket the SuperNode wakes its SuperExec through

SHIM = '''#!{python}
# fedads: Flower's flower-superexec, woken by its SuperNode (deploy/superexec.py)
import os, sys
try:
    from deploy.superexec import main
except Exception:  # this module unusable here: Flower's own SuperExec, polling, rather than none
    os.execv("{fallback}", ["{fallback}", *sys.argv[1:]])
sys.exit(main(sys.argv[1:]))
'''


def write_shim(folder: Path, python: str = sys.executable) -> Path:
    """An executable `flower-superexec` in `folder` (put `folder` first on the SuperNode's PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / SUPEREXEC_COMMAND
    shim.write_text(SHIM.format(python=python, fallback=Path(python).parent / SUPEREXEC_COMMAND))
    shim.chmod(stat.S_IRWXU)
    return shim


class Wakeups:
    """The SuperExec's end: a datagram socket at `path` (owner-only); `wait(seconds)` returns at
    the next datagram, taking that one only (one announced message, one ask for work), or after
    `seconds`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            self.socket.bind(str(path))
        finally:
            os.umask(old_umask)

    def wait(self, seconds: float) -> None:
        readable, _, _ = select.select([self.socket], [], [], max(seconds, 0.0))
        if readable:
            try:
                self.socket.recv(64)
            except BlockingIOError:
                pass

    def close(self) -> None:
        self.socket.close()
        self.path.unlink(missing_ok=True)


def notifier(path: Path) -> Callable[[], None]:
    """The SuperNode's end: a function that wakes the SuperExec listening at `path`. It never
    blocks or fails: with no SuperExec there yet, or datagrams already queued, the wake-up is
    dropped and the SuperExec finds the task at its next ask anyway."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)

    def notify() -> None:
        try:
            sender.sendto(b"!", str(path))
        except OSError:
            pass

    return notify


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    wakeup_path = os.environ.get(WAKEUP_ENV)
    wakeups = None
    if wakeup_path:
        try:
            wakeups = Wakeups(Path(wakeup_path))
        except OSError as exc:  # e.g. a path past the 108 bytes of a Unix socket's: poll, as Flower does
            print(f"fedads: SuperExec wake-ups off ({wakeup_path}: {exc}); looking for work on Flower's timer",
                  file=sys.stderr, flush=True)
    if wakeups is not None:
        superexec_waits_with(wakeups.wait)
    if os.environ.get(SOCKET_ENV):
        launch_clientapps_with(hand_over)
    skip_unsent_telemetry()
    try:
        run_flower_command(SUPEREXEC_COMMAND, arguments)
    finally:
        if wakeups is not None:
            wakeups.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
