"""A whole deployment on one machine, for tests and measurements: dev certificates, a TLS
SuperLink with SuperNode authentication and a state database (or its state in memory), started as an operator starts it
(`python -m deploy.superlink start`: the SuperLink on 127.0.0.1, the Fleet gateway on
`fleet_host`), the merchants' keys registered, one SuperNode per merchant connected through the
gateway; every process is stopped on the way out, also on failure, and by a sweeper
(deploy.processes) if the process that started them is killed outright.

Each process gets its own FLWR_HOME and log file under the work dir, and free ports, so several
deployments (and simulations) can share a machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy import runs
from deploy.dev_certs import MerchantKeys, create_merchant_keys, create_tls_files
from deploy.merchant import supernode_command
from deploy.processes import Sweeper, free_port, stop_tree, usable_cores, wait_for_port
from deploy.superlink import CONNECTION, ServerTls, cli_reply, register_merchant, start_command, tool_env, write_cli_config
from shared.node_config import NodeConfig
from simulations import PROJECT_ROOT

DEPLOYMENT_MARK = "FEDADS_LOCAL_DEPLOYMENT"  # in every process a local deployment starts: its work dir


class DeploymentError(RuntimeError):
    pass


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    data_path: Path
    state_dir: Path
    catalog_path: Path | None = None
    privacy_mode: str = "user"  # its policy: user-level DP required (the default), or "none"
    secure_aggregation: str = "refuse"  # its policy on secure aggregation: refuse (the default), allow or require
    trusted_entities: Path | None = None  # publishers' keys: its SuperNode runs only FABs they signed


def stop_process(process: subprocess.Popen) -> None:
    """The process tree (found through /proc, whatever group its members moved to), then
    anything left in its own process group (orphans whose parent already exited)."""
    stop_tree(process)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LocalDeployment:
    work_dir: Path
    address: str  # the SuperLink on 127.0.0.1: Control API (the operator's `flwr`)
    fleet_address: str  # the Fleet gateway: where SuperNodes connect
    tls: ServerTls
    operator_env: dict[str, str]  # FLWR_HOME with a TLS connection named CONNECTION
    extra_env: dict[str, str]
    database: Path | None = None  # the SuperLink's SQLite state; None: in its memory
    keys: dict[str, MerchantKeys] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)  # merchant ids whose keys the SuperLink knows
    # how each merchant's SuperNode was last started (merchant, key, tls, max_retries), by merchant id
    supernodes: dict[str, tuple[Merchant, Path | None, bool, int | None]] = field(default_factory=dict)
    supernode_env: dict[str, str] = field(default_factory=dict)  # extra environment of the SuperNodes (and what they start) only
    clientapp_threads: int | None = None  # each ClientApp's numerical threads (deploy.supernode); None: the libraries' defaults
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    def start(self, name: str, command: Sequence[str], flwr_home: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start `command` as process `name`, logging to logs/NAME.log; a name started again keeps
        its earlier log beside the new one (NAME.1.log, ...)."""
        log_path = self.work_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if log_path.exists():
            log_path.rename(log_path.with_suffix(f".{sum(1 for _ in log_path.parent.glob(f'{name}.*'))}.log"))
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                list(command), cwd=self.work_dir, env={**tool_env(flwr_home), **(env or {}), **self.extra_env},
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: stop_process reaches its SuperExec and apps
            )
        self.processes[name] = process
        self._stack.callback(stop_process, process)
        return process

    def log(self, name: str) -> str:
        return (self.work_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def start_supernode(self, merchant: Merchant, key: Path | None, tls: bool = True, max_retries: int | None = None) -> subprocess.Popen:
        node_dir = self.work_dir / "supernodes" / merchant.merchant_id
        config = NodeConfig.model_validate({
            "data_path": str(merchant.data_path), "state_dir": str(merchant.state_dir), "merchant_id": merchant.merchant_id,
            "catalog_path": str(merchant.catalog_path or ""), "privacy_mode": merchant.privacy_mode,
            "secure_aggregation": merchant.secure_aggregation,
        }).write(node_dir / "node-config.toml")
        command = supernode_command(self.fleet_address, self.tls.ca_cert if tls else None, key, config, free_port(), max_retries,
                                    trusted_entities=merchant.trusted_entities, clientapp_threads=self.clientapp_threads)
        self.supernodes[merchant.merchant_id] = (merchant, key, tls, max_retries)
        return self.start(f"supernode-{merchant.merchant_id}", command, node_dir / "flwr-home", self.supernode_env)

    def flwr(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return runs.flwr(args, env or self.operator_env, cwd=PROJECT_ROOT, timeout=timeout)

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink reports online; RunError when the CLI got no answer
        (a SuperLink that does not answer is not one with no SuperNodes)."""
        reply = cli_reply(self.flwr("supernode", "ls", CONNECTION, "--format", "json"))
        if not reply.get("success"):
            raise runs.RunError(f"flwr supernode ls: {reply.get('error-message') or 'no answer'}")
        return sum(1 for node in reply.get("nodes", []) if node.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                online, last_error = self.online_nodes(), ""
            except runs.RunError as error:  # the SuperLink starting up: asked again until the deadline
                online, last_error = 0, str(error)
            if online >= count:
                return
            for name, process in self.processes.items():
                if name.startswith("supernode-") and process.poll() is not None:
                    raise DeploymentError(f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                reason = f" (the SuperLink's last answer: {last_error[-1000:]})" if last_error else ""
                raise DeploymentError(f"{online} of {count} SuperNodes online after {timeout:.0f}s{reason}")
            time.sleep(0.5)  # readiness poll of processes we started

    def submit(self, run_config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """`flwr run` of this project with run-config overrides; returns the CLI's JSON reply."""
        return runs.submit(PROJECT_ROOT, run_config, env or self.operator_env)

    def run_status(self, run_id: int) -> dict[str, Any]:
        return runs.run_status(run_id, self.operator_env)

    def wait_for_run(self, run_id: int, timeout: float) -> tuple[dict[str, Any], str]:
        """(status row of `flwr ls`, log) once the run ended; the log is kept in the work dir."""
        status, output = runs.wait_for_run(run_id, self.operator_env, timeout)
        (self.work_dir / "logs" / f"run-{run_id}.log").write_text(output)
        return status, output

    def register(self, merchant_id: str) -> None:
        register_merchant(self.keys[merchant_id].public_key, self.operator_env)
        if merchant_id not in self.registered:
            self.registered.append(merchant_id)

    def restart_superlink(self) -> subprocess.Popen:
        """The SuperLink again, on its database (or in memory), port and Fleet address (after it
        was stopped). In memory it forgot the merchants: they are registered again, and every
        SuperNode this deployment started, whose node id it no longer knows (Flower's SuperNode
        then exits), is started again as it was, as each merchant would restart theirs."""
        port = int(self.address.rsplit(":", 1)[1])
        name = f"superlink-{sum(1 for key in self.processes if key.startswith('superlink'))}"
        superlink = self.start(name, start_command(self.tls, self.database, port, self.fleet_address), self.work_dir / "superlink" / "flwr-home")
        try:
            wait_for_port(port, superlink, self.work_dir / "logs" / f"{name}.log")
        except Exception as exc:
            raise DeploymentError(str(exc)) from exc
        if self.database is None:
            for merchant_id in self.registered:
                self.register(merchant_id)
            for merchant_id, arguments in list(self.supernodes.items()):
                stop_process(self.processes[f"supernode-{merchant_id}"])
                self.start_supernode(*arguments)
        return superlink


def shared_cores(merchants: int) -> int:
    """Each merchant's share of this machine's cores (at least one): their ClientApps run at once."""
    return max(1, usable_cores() // max(1, merchants))


@contextmanager
def local_deployment(
    work_dir: str | Path,
    merchants: Sequence[Merchant],
    unregistered: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    start_supernodes: bool = True,
    fleet_host: str = "127.0.0.1",
    in_memory_state: bool = False,
    supernode_env: Mapping[str, str] | None = None,
    clientapp_threads: int | None = None,
) -> Iterator[LocalDeployment]:
    """Certificates, SuperLink, registration, SuperNodes; yields when all merchants are online.
    `unregistered`: ids to create key pairs for without registering them. `fleet_host`: the
    interface the Fleet gateway listens on (the server certificate names it, too).
    `in_memory_state`: the SuperLink keeps its state in memory (`--in-memory`) instead of its
    SQLite file: faster rounds, nothing kept across a restart of it. `supernode_env`: extra
    environment of the SuperNodes (and their SuperExecs and ClientApps) only. `clientapp_threads`:
    the threads each ClientApp's numerical libraries may use; by default the machine's cores
    divided among the merchants, at least one (`shared_cores`), as the simulation gives each
    client its CPU."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    hosts = ("localhost", "127.0.0.1", "::1") + (() if fleet_host in ("127.0.0.1", "localhost") else (fleet_host,))
    files = create_tls_files(work_dir / "certs", hosts)
    tls = ServerTls(files.ca_cert, files.server_cert, files.server_key)
    port, fleet_port = free_port(), free_port(fleet_host)
    address, fleet_address = f"127.0.0.1:{port}", f"{fleet_host}:{fleet_port}"
    operator_home = work_dir / "operator-flwr-home"
    write_cli_config(operator_home, address, tls.ca_cert)
    sweeper = Sweeper(DEPLOYMENT_MARK, str(work_dir))  # stops them all even if this process is killed outright
    database = None if in_memory_state else work_dir / "superlink" / "state.db"
    deployment = LocalDeployment(work_dir, address, fleet_address, tls, tool_env(operator_home), {**(extra_env or {}), **sweeper.mark},
                                 database, supernode_env=dict(supernode_env or {}),
                                 clientapp_threads=clientapp_threads or shared_cores(len(merchants)))
    with deployment._stack:
        deployment._stack.callback(sweeper.close)  # last, after each process was stopped
        superlink = deployment.start("superlink", start_command(tls, database, port, fleet_address), work_dir / "superlink" / "flwr-home")
        try:
            wait_for_port(port, superlink, work_dir / "logs" / "superlink.log")
            wait_for_port(fleet_port, superlink, work_dir / "logs" / "superlink.log", host=fleet_host)
        except Exception as exc:  # its error names the log; keep one error type here
            raise DeploymentError(str(exc)) from exc
        for merchant_id in [m.merchant_id for m in merchants] + list(unregistered):
            deployment.keys[merchant_id] = create_merchant_keys(work_dir / "certs" / "merchants", merchant_id)
        for merchant in merchants:
            deployment.register(merchant.merchant_id)
        if start_supernodes:
            for merchant in merchants:
                deployment.start_supernode(merchant, deployment.keys[merchant.merchant_id].private_key)
            deployment.wait_online(len(merchants))
        yield deployment


def write_merchant_data(folder: str | Path, run_config: Mapping[str, Any], count: int, privacy_mode: str = "user",
                        secure_aggregation: str = "refuse") -> list[Merchant]:
    """The synthetic market of `run_config`, cut into `count` shards exactly as a simulation cuts
    it, each written as one merchant's log CSV, plus the public catalog CSV; every merchant with
    the policy `privacy_mode` and `secure_aggregation`."""
    from shared.config import RunConfig
    from shared.data.loaders import write_catalog_csv, write_log_csv
    from shared.data.schema import Dataset
    from shared.data.sources import load_dataset, simulated_shards

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_flower(dict(run_config))
    dataset = load_dataset(cfg)
    catalog_path = folder / "catalog.csv"
    write_catalog_csv(catalog_path, dataset.catalog)
    merchants = []
    for name, shard in simulated_shards(cfg, dataset, count):
        (folder / name).mkdir(exist_ok=True)
        write_log_csv(folder / name / "interactions.csv", Dataset(name, dataset.catalog, shard))
        merchants.append(Merchant(name, folder / name / "interactions.csv", folder / name / "state", catalog_path, privacy_mode,
                                  secure_aggregation))
    return merchants

