"""The private Ray cluster of a warm simulation runtime: its head node, this process as its
driver, and its stop.

The head node boots as `ray start --head` in its own process group (about 4 s) rather than
from `ray.init()` in this process: `ray.init()` forks Ray's processes with a `preexec_fn`,
which deadlocked when another thread was busy in numpy's BLAS. Its processes get the caller's
mark in their environment, so that checks can find them and a sweeper (deploy.processes) can
stop them if this process dies outright; its session files live in a short
temporary folder (Unix socket paths are limited), named in `work_dir/ray-temp-dir`; its log
is `work_dir/ray.log`. The cluster keeps nothing, so it is killed outright at the end, as
`ray stop --force` does, not through Ray's graceful shut-down of several seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy.processes import Sweeper, free_port, stop_tree, wait_for_port
from simulations import PROJECT_ROOT

BIN = Path(sys.executable).parent
# A single-machine Ray: its node address is loopback, so that its GCS, raylet, workers and
# client server listen on 127.0.0.1 rather than on every interface (Ray's default). Ray's switch
# for this is named for macOS and Windows, where it is the default; `--node-ip-address=127.0.0.1`
# alone does not do it, as Ray swaps loopback for the machine's outward address. Ray reads it
# when imported, in the head node's processes and in this one, its driver (and in a SuperLink
# that starts its own Ray, on Flower's public path): so it is set here, before Ray is imported.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK_ONLY)
# No implicit Ray: by default a Ray call in a process that is not (or no longer) a driver runs
# `ray.init()`, which joins the latest cluster `ray start` left on this machine or starts one.
# After a run was abandoned (timed out, interrupted) Flower's engine threads may still make such
# a call once the runtime has left its cluster; the process then became a driver of whatever it
# found, another harness's cluster included, and Ray ends a driver whose cluster goes away with
# exit status 1 (two test sessions at once on one machine: one of them ended silently with
# status 1 in 3 of 7 tries, in none of 3 with this switch). The runtime always connects
# explicitly (`connect`); a stray call raises in its thread instead.
# Read by Ray when imported, like the switch above.
NO_IMPLICIT_RAY = {"RAY_ENABLE_AUTO_CONNECT": "0"}
os.environ.update(NO_IMPLICIT_RAY)


class _RayDriver:
    """This process as a Ray cluster's driver: joined by `connect`, left by `leave`."""

    def driver_connected(self) -> bool:
        import ray

        return bool(ray.is_initialized())

    def leave(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()


class RayCluster(_RayDriver):
    """A private single-machine Ray cluster the runtime starts, and kills at its end."""

    def __init__(self, work_dir: Path, num_cpus: int, mark: tuple[str, str]) -> None:
        self.work_dir, self.num_cpus, self.mark = work_dir, num_cpus, mark
        self._sweeper: Sweeper | None = None
        self.temp_dir: str | None = None
        self._head: subprocess.Popen | None = None
        self._port = 0

    @property
    def log_path(self) -> Path:
        return self.work_dir / "ray.log"

    def boot(self) -> None:
        """Start the head node; returns at once."""
        self.temp_dir = tempfile.mkdtemp(prefix="fedads-ray-")
        (self.work_dir / "ray-temp-dir").write_text(self.temp_dir)
        self._port = free_port()
        # stops the cluster and removes its session folder even if this process is killed outright
        self._sweeper = Sweeper(*self.mark, folders=(self.temp_dir,))
        # Ray's processes get this environment: its workers import this checkout's packages
        # whether or not it is installed, and without a runtime env (which would make Ray start
        # every worker through a second interpreter)
        pythonpath = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0", **LOOPBACK_ONLY, **self._sweeper.mark}
        with self.log_path.open("w") as log_file:
            self._head = subprocess.Popen(
                [
                    str(BIN / "ray"), "start", "--head", "--block", f"--port={self._port}", f"--num-cpus={self.num_cpus}",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
                ],
                env=env, cwd=self.work_dir, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopping it stops every Ray process
            )

    def connect(self) -> None:
        """Join the cluster as this process's Ray driver, once its head node listens."""
        import ray

        if self._head is None:
            raise RuntimeError("the Ray cluster was not booted")
        wait_for_port(self._port, self._head, self.log_path)
        if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
            raise RuntimeError(
                "Ray was imported before simulations.runtime, so it would look for its cluster on this machine's "
                "outward address: import simulations.runtime first"
            )
        ray.init(address=f"127.0.0.1:{self._port}", logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)

    def shut_down(self) -> None:
        """Leave the cluster and kill every process of it."""
        if self._head is None:
            return  # never booted
        try:
            self.leave()
        finally:
            stop_tree(self._head, signals=(signal.SIGKILL,))
            if self._sweeper is not None:
                self._sweeper.close()  # anything of the cluster that left the head's process tree
            if self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


class ExistingRayCluster(_RayDriver):
    """A Ray cluster someone else runs (RAY_ADDRESS or an address given to the runtime): this
    process joins it as a driver and leaves it at the end; its nodes and their processes stay.
    Ray destroys the actors a driver started when the driver leaves, so the runtime's pool goes
    with it. Every node must be able to import this project (installed, or on its PYTHONPATH)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.temp_dir = f"the session directories of the nodes of {address}"

    def boot(self) -> None:
        """Nothing to start: the cluster runs already."""

    def connect(self) -> None:
        import ray

        ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False, configure_logging=False)

    def shut_down(self) -> None:
        """Leave the cluster (its nodes keep running)."""
        self.leave()
