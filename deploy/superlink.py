"""The operator's side: start the SuperLink with TLS, SuperNode authentication, a persistent
state database readable by its owner only and no run-time package installation, on loopback,
with a Fleet-only gateway where merchants reach it; point the `flwr` CLI at it; register the
merchants' public keys; reach it from another machine through SSH.

    python -m deploy.superlink start --tls-dir certs --database state/superlink.db --port 9093 --fleet-address 0.0.0.0:9092
    python -m deploy.superlink start --tls-dir certs --in-memory --port 9093 --fleet-address 0.0.0.0:9092
    python -m deploy.superlink configure-cli --flwr-home ~/.flwr --address 127.0.0.1:9093 --root-certificates certs/ca.crt
    python -m deploy.superlink register --flwr-home ~/.flwr certs/merchants/*.pub
    python -m deploy.superlink tunnel --ssh operator@superlink.example --port 9093     # from the operator's laptop

Flags as flwr 1.42 defines them (flwr/superlink/cli/flower_superlink.py): one HTTPS port
(`--host`/`--port`) serves the Fleet API (SuperNodes), the Control API (`flwr` CLI) and the
Runtime API (the ServerApp process); `--control-api-address` no longer separates the Control
API, that port asks for no client certificate, and the open-source Control API authenticates no
one. So the SuperLink listens on 127.0.0.1 only and the Control API is the operator's by
reaching that host's loopback (a shell there, or an SSH tunnel); merchants reach the Fleet API
through deploy.fleet_gateway on `--fleet-address`, which forwards Fleet calls only.
`--enable-supernode-auth` refuses SuperNodes whose public key was not registered through the
Control API (`flwr supernode register`, flwr/cli/supernode/register.py); the old
`--auth-list-public-keys` CSV is rejected by 1.42.

The state: `--database FILE` (SQLite) keeps registered merchants, runs and messages across a
restart; `--in-memory` (Flower's own default, `:flwr-in-memory:`) keeps them in the SuperLink's
memory: a restart forgets them (register the merchants again; `deploy.runs resume` resumes from
the run's checkpoints as before). What it buys: every Fleet and Runtime API request (a model
message is 6 objects, each pulled and pushed on its own) updates the SQLite file through
SQLAlchemy, which made the SuperLink the busiest process of a deployed round; in memory, a
3-merchant MovieLens round is about 40% shorter (docs/BENCHMARKS.md, "Deployment").

The SuperLink process is deploy.flower_superlink: Flower's `flower-superlink` with each of its
HTTP layers applied only under the API it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from deploy.fleet_gateway import FleetGateway, GatewayTls
from deploy.processes import stop_tree, terminate_as_exit

BIN = Path(sys.executable).parent  # the venv holding flwr and this project's packages
CONNECTION = "fedads"  # the SuperLink connection name in FLWR_HOME/config.toml
DEFAULT_PORT = 9093  # the SuperLink's own port, on 127.0.0.1: Control, Runtime and Fleet API
DEFAULT_FLEET_PORT = 9092  # the Fleet gateway's port, on the interface the operator names
LOOPBACK = "127.0.0.1"
SECRET_UMASK = 0o077  # the SuperLink's files (database, WAL, outputs): its owner only
IN_MEMORY = ":flwr-in-memory:"  # flower-superlink's --database value for its in-memory state (flwr.supercore.constant)


@dataclass(frozen=True)
class ServerTls:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, folder: str | Path) -> ServerTls:
        """The file names deploy.dev_certs writes."""
        folder = Path(folder)
        return cls(folder / "ca.crt", folder / "server.crt", folder / "server.key")


def superlink_command(tls: ServerTls, database: Path | None, host: str = LOOPBACK, port: int = DEFAULT_PORT, bin_dir: Path = BIN) -> list[str]:
    """The flower-superlink command line; `database` None: the state in memory. `host` stays
    loopback: this port is also the unauthenticated Control API (see the module docstring)."""
    return [
        # Flower's flower-superlink, each HTTP layer only under the API it serves (deploy/flower_superlink.py)
        str(bin_dir / "python"), "-m", "deploy.flower_superlink",
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
        "--enable-supernode-auth",
        # SQLite file: runs, registered nodes and messages survive a restart; or in memory, faster and forgotten by one
        "--database", IN_MEMORY if database is None else str(database),
        # the ServerApp runs from the FAB with this venv's packages; nothing is `uv sync`ed at run time
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]


def parse_address(address: str) -> tuple[str, int]:
    """host:port, [v6]:port -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def prepare_database(database: str | Path) -> Path:
    """The SQLite state file, created (or tightened) to mode 0600 before the SuperLink opens it:
    SQLite gives its -wal and -shm files the database file's mode, and the SuperLink runs under
    umask 077 for anything else it creates. A folder this creates is 0700; an existing folder
    is left as the operator set it (it may be shared, like /var/lib)."""
    database = Path(database).resolve()
    missing = [p for p in [database.parent, *database.parent.parents] if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700)
    fd = os.open(database, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm"), Path(f"{database}-journal")):
        if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    return database


def start_command(
    tls: ServerTls, database: Path | None, port: int = DEFAULT_PORT, fleet_address: str | None = None,
) -> list[str]:
    """`python -m deploy.superlink start ...`: how deploy.local starts the SuperLink, as an operator
    does; `database` None: `--in-memory`."""
    state = ["--in-memory"] if database is None else ["--database", str(database)]
    command = [sys.executable, "-m", "deploy.superlink", "start", "--ca-cert", str(tls.ca_cert), "--server-cert", str(tls.server_cert),
               "--server-key", str(tls.server_key), *state, "--port", str(port)]
    return command + (["--fleet-address", fleet_address] if fleet_address else [])


def tunnel_command(ssh_target: str, port: int = DEFAULT_PORT, local_port: int | None = None, ssh: str = "ssh") -> list[str]:
    """An SSH tunnel from this machine's 127.0.0.1:`local_port` to the SuperLink host's loopback
    Control API: SSH authenticates the operator (their key, the host's known_hosts entry). The
    SuperLink's certificate names 127.0.0.1, so `flwr` verifies it through the tunnel too."""
    return [ssh, "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{LOOPBACK}:{local_port or port}:{LOOPBACK}:{port}", ssh_target]


def run_superlink(tls: ServerTls, database: Path | None, port: int, fleet_address: str | None) -> int:
    """Start flower-superlink on loopback (umask 077, database 0600; None: in memory) and, given a fleet address,
    the Fleet gateway in this process; return when the SuperLink exits or on SIGTERM/SIGINT,
    stopping the SuperLink and everything it started."""
    os.umask(SECRET_UMASK)  # inherited by flower-superlink, its SuperExec and ServerApp processes
    command = superlink_command(tls, None if database is None else prepare_database(database), LOOPBACK, port)
    print(" ".join(command), flush=True)
    if fleet_address is None:
        os.execve(command[0], command, tool_env())
    fleet_host, fleet_port = parse_address(fleet_address)
    gateway = FleetGateway(fleet_host, fleet_port, port, GatewayTls(tls.server_cert, tls.server_key, tls.ca_cert))
    with terminate_as_exit():  # a SIGTERM before or after the event loop still stops the SuperLink
        superlink = subprocess.Popen(command, env=tool_env(), stdin=subprocess.DEVNULL)
        try:
            return asyncio.run(_serve_gateway(gateway, superlink))
        finally:
            stop_tree(superlink)


async def _serve_gateway(gateway: FleetGateway, superlink: subprocess.Popen) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await gateway.start()
    try:
        while not stopping.is_set() and superlink.poll() is None:
            try:
                await asyncio.wait_for(stopping.wait(), 0.5)  # the SuperLink's exit is polled, too
            except TimeoutError:
                pass
    finally:
        await gateway.close()
    return superlink.returncode if superlink.returncode is not None else 0


def tool_env(flwr_home: str | Path | None = None, base: Mapping[str, str] | None = None, bin_dir: Path = BIN) -> dict[str, str]:
    """Environment for Flower processes: the venv's binaries first on PATH (the SuperLink and
    SuperNode start `flower-superexec` by name) and, if given, a private FLWR_HOME."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def write_cli_config(flwr_home: str | Path, address: str, root_certificates: str | Path | None, name: str = CONNECTION) -> Path:
    """FLWR_HOME/config.toml with one SuperLink connection: TLS with the given CA certificate,
    or plain HTTP when root_certificates is None (only to show that the SuperLink refuses it)."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, object] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: connection}}))
    return path


def register_command(public_key: str | Path, name: str, connection: str = CONNECTION, bin_dir: Path = BIN) -> list[str]:
    return [str(bin_dir / "flwr"), "supernode", "register", str(public_key), connection, "--name", name, "--format", "json"]


def merchant_name(public_key: str | Path) -> str:
    """merchant-a.pub (deploy.dev_certs) or merchant-a.key.pub (ssh-keygen) -> merchant-a."""
    name = Path(public_key).name
    for suffix in (".pub", ".key"):
        name = name.removesuffix(suffix)
    return name


def register_merchant(public_key: str | Path, env: Mapping[str, str], name: str | None = None, timeout: float = 60.0) -> int:
    """Register one merchant's public key; returns the SuperLink's node id."""
    name = name or merchant_name(public_key)
    done = subprocess.run(register_command(public_key, name), env=dict(env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    reply = parse_cli_json(done.stdout)
    if done.returncode != 0 or not reply.get("success"):
        raise RuntimeError(f"registering {public_key} failed (exit {done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    return int(reply["node-id"])


def parse_cli_json(text: str) -> dict[str, Any]:
    """The JSON object `flwr ... --format json` prints (pretty-printed, possibly after log lines)."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, ch in enumerate(text) if ch == "{"]):
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and "success" in value:
            return value
    return {}


def cli_reply(done: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON reply a `flwr ... --format json` call printed or, when it printed none, an
    unsuccessful one whose error-message is the end of its output."""
    return parse_cli_json(done.stdout) or {"success": False, "error-message": (done.stdout[-2000:] + done.stderr[-2000:]).strip()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run the SuperLink on loopback, and the Fleet gateway if --fleet-address is given")
    start.add_argument("--tls-dir", type=Path, help="folder with ca.crt, server.crt, server.key (deploy.dev_certs layout)")
    start.add_argument("--ca-cert", type=Path)
    start.add_argument("--server-cert", type=Path)
    start.add_argument("--server-key", type=Path)
    state = start.add_mutually_exclusive_group(required=True)
    state.add_argument("--database", type=Path, help="SQLite state file (created with mode 0600): registered merchants and runs survive a restart")
    state.add_argument("--in-memory", action="store_true",
                       help="keep the state in memory: faster rounds; a restart forgets registered merchants and runs")
    start.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help="the SuperLink's port on 127.0.0.1 (Control, Runtime and Fleet API; the `flwr` CLI connects here)")
    start.add_argument("--fleet-address", metavar="HOST:PORT",
                       help=f"where merchants' SuperNodes connect (e.g. 0.0.0.0:{DEFAULT_FLEET_PORT}): a gateway that forwards "
                            "Fleet API calls only; without it, only SuperNodes on this host can connect (127.0.0.1:PORT)")
    configure = sub.add_parser("configure-cli", help="write FLWR_HOME/config.toml for `flwr` commands")
    configure.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    configure.add_argument("--address", required=True, help="SuperLink host:port")
    configure.add_argument("--root-certificates", type=Path, required=True, help="the CA certificate")
    register = sub.add_parser("register", help="register merchants' public keys (named after the file)")
    register.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    register.add_argument("public_keys", nargs="+", type=Path)
    tunnel = sub.add_parser("tunnel", help="SSH tunnel to a remote SuperLink's loopback Control API (replaces this process)")
    tunnel.add_argument("--ssh", required=True, metavar="[USER@]HOST", help="the SuperLink host, as ssh reaches it")
    tunnel.add_argument("--port", type=int, default=DEFAULT_PORT, help="the SuperLink's port on its host's 127.0.0.1")
    tunnel.add_argument("--local-port", type=int, help="the port on this machine's 127.0.0.1 (default: --port)")
    args = parser.parse_args(argv)

    if args.command == "start":
        if args.tls_dir:
            tls = ServerTls.from_dir(args.tls_dir)
        elif args.ca_cert and args.server_cert and args.server_key:
            tls = ServerTls(args.ca_cert, args.server_cert, args.server_key)
        else:
            parser.error("give --tls-dir, or all of --ca-cert, --server-cert and --server-key")
        missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
        if missing:
            parser.error(f"missing TLS files: {', '.join(missing)}")
        if args.fleet_address is not None:
            try:
                parse_address(args.fleet_address)
            except ValueError as exc:
                parser.error(str(exc))
        return run_superlink(tls, args.database, args.port, args.fleet_address)
    if args.command == "tunnel":
        command = tunnel_command(args.ssh, args.port, args.local_port)
        print(" ".join(command), flush=True)
        os.execvp(command[0], command)
    if args.command == "configure-cli":
        print(write_cli_config(args.flwr_home, args.address, args.root_certificates))
        return 0
    env = tool_env(args.flwr_home)
    for key in args.public_keys:
        print(f"{merchant_name(key)}: node id {register_merchant(key, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
