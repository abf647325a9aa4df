"""A merchant's SuperNode process: Flower's `flower-supernode`, without its idle waits and with a
warm ClientApp start.

    python -m deploy.supernode [flower-supernode arguments]

deploy.merchant starts the SuperNode this way. Flower 1.42's SuperNode waits 3 s after every
empty pull and 0.5 s between looks for the ClientApp's reply, its SuperExec looks for work once a
second, and every message starts a `flwr-clientapp` process that imports Flower and the
scientific stack first: about 13 s of a deployed round's 23-26 s on MovieLens-100K
(docs/BENCHMARKS.md, "Deployment"), none of it work. Here, in this process:

- the SuperNode's waits start at 50 ms and grow by 1.15x per empty pull in a row, back to Flower's
  3 s after about 20 s idle, so an idle merchant does not hammer the SuperLink; it looks for
  its ClientApp's reply, in its own state, the moment the ClientApp stores it (and otherwise
  after 5 ms growing to 50 ms) instead of every 0.5 s (shared.flower_internals.prompt_supernode_polling);
- its SuperExec (deploy.superexec, through a `flower-superexec` shim first on PATH) is woken
  by this process the moment a message is stored, instead of looking for work every
  FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's setting, 1 s by default, still the fallback);
- the SuperExec hands each ClientApp run to deploy.warm_clientapp's warm process, which has
  Flower's runtime and the app imported and runs it there, one message after another, as
  Flower's simulation runs a ClientApp (`--clientapp-isolation process`, or the environment's
  FEDADS_CLIENTAPP_ISOLATION=process: forked from it, each message in a process of its own, as
  Flower isolates them); the app's code still comes from the
  received FAB, unpacked once per FAB rather than once per message; `flwr-clientapp` on PATH
  resolves to a shim that does the same, for when the SuperExec cannot reach the warm process;
- the handlers of the Runtime API its ClientApps call (a message pulled, a reply pushed, on the
  SuperNode's state in memory) run in its HTTP server's event loop rather than each in a worker
  thread, through HTTP layers that call the layers below in the request's own task
  (shared.flower_internals.run_supernode_handlers_inline).

`--clientapp-threads N` (this module's own option, not Flower's): the numerical libraries of
the ClientApps (OpenBLAS, OpenMP, MKL) use at most N threads each: OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS are set for the warm process, the SuperExec and the
shim. Left out, the libraries keep their defaults (one thread per core, unless the environment
says otherwise), which suits a merchant alone on its machine; where several SuperNodes and the
SuperLink share the cores, the ClientApps' threads spin waiting for one another (a 3-merchant
round on 2 cores: 12% shorter with one thread each, docs/BENCHMARKS.md "Deployment"). torch's
own count is set by the app where it uses torch (client/solvers/sgd_rows.py: one thread).

Its log lines carry the time of day. The warm process stops with this one, however it stops (it watches this process's id).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy import superexec
from deploy.processes import positive_int, thread_limit
from deploy.warm_clientapp import ISOLATION_ENV, ISOLATIONS, SOCKET_ENV, isolation_from_environment, write_shim
from shared.flower_internals import (
    notify_stored_messages,
    prompt_object_pulls,
    prompt_supernode_polling,
    run_flower_command,
    run_supernode_handlers_inline,
    skip_unsent_telemetry,
    timestamp_flower_logs,
)


def split_arguments(arguments: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This module's own options (`--clientapp-threads N`, `--clientapp-isolation shared|process`)
    and the arguments left for `flower-supernode`."""
    parser = argparse.ArgumentParser(prog="python -m deploy.supernode", add_help=False, allow_abbrev=False)
    parser.add_argument("--clientapp-threads", type=positive_int)
    # the environment's choice (ISOLATION_ENV) is the default, so a harness that starts SuperNodes
    # through deploy.merchant can choose for all of them
    parser.add_argument("--clientapp-isolation", choices=ISOLATIONS, default=isolation_from_environment())
    own, flower_arguments = parser.parse_known_args(arguments)
    if own.clientapp_isolation not in ISOLATIONS:  # argparse checks the choices of given values only
        parser.error(f"{ISOLATION_ENV}={own.clientapp_isolation!r}: expected one of {', '.join(ISOLATIONS)}")
    return own, flower_arguments


def main(argv: list[str] | None = None) -> int:
    own, arguments = split_arguments(sys.argv[1:] if argv is None else argv)
    # a short private path: a Unix socket's path must stay under 108 bytes
    work = Path(tempfile.mkdtemp(prefix="fedads-supernode-"))
    socket_path = work / "warm.sock"
    wakeup_path = work / "superexec.sock"
    shim_dir = work / "bin"
    write_shim(shim_dir)
    superexec.write_shim(shim_dir)
    os.environ[SOCKET_ENV] = str(socket_path)
    os.environ[superexec.WAKEUP_ENV] = str(wakeup_path)
    os.environ["PATH"] = f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.update(thread_limit(own.clientapp_threads))  # before the warm process loads the libraries
    os.environ[ISOLATION_ENV] = own.clientapp_isolation
    warm = subprocess.Popen(
        [sys.executable, "-m", "deploy.warm_clientapp", "--socket", str(socket_path), "--parent-pid", str(os.getpid()),
         "--remove-folder"],  # the folder goes with the warm process, also when this one is killed
        stdin=subprocess.DEVNULL,
    )
    prompt_supernode_polling()
    prompt_object_pulls()
    skip_unsent_telemetry()
    notify_stored_messages(superexec.notifier(wakeup_path))
    timestamp_flower_logs()
    run_supernode_handlers_inline()
    try:
        run_flower_command("flower-supernode", arguments)
    finally:
        warm.terminate()
        try:
            warm.wait(timeout=10)
        except subprocess.TimeoutExpired:
            warm.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
