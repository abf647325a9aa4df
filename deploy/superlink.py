"""The operator's side: start the SuperLink with TLS, SuperNode authentication, a persistent
state database and no run-time package installation; point the `flwr` CLI at it; register
the merchants' public keys.

    python -m deploy.superlink start --tls-dir certs --database state/superlink.db --host 0.0.0.0 --port 9093
    python -m deploy.superlink configure-cli --flwr-home ~/.flwr --address superlink.example:9093 --root-certificates certs/ca.crt
    python -m deploy.superlink register --flwr-home ~/.flwr certs/merchants/*.pub

Flags as flwr 1.42 defines them (flwr/superlink/cli/flower_superlink.py): one HTTPS port
(`--host`/`--port`) serves the Fleet API (SuperNodes), the Control API (`flwr` CLI) and the
Runtime API (the ServerApp process); `--enable-supernode-auth` refuses SuperNodes whose public
key was not registered through the Control API (`flwr supernode register`,
flwr/cli/supernode/register.py); the old `--auth-list-public-keys` CSV is rejected by 1.42.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

BIN = Path(sys.executable).parent  # the venv holding flwr and this project's packages
CONNECTION = "fedads"  # the SuperLink connection name in FLWR_HOME/config.toml
DEFAULT_PORT = 9093


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


def superlink_command(tls: ServerTls, database: str | Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT, bin_dir: Path = BIN) -> list[str]:
    return [
        str(bin_dir / "flower-superlink"),
        "--ssl-ca-certfile", str(tls.ca_cert),
        "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key),
        "--enable-supernode-auth",
        "--database", str(database),  # SQLite file: runs, registered nodes and messages survive a restart
        # the ServerApp runs from the FAB with this venv's packages; nothing is `uv sync`ed at run time
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run the SuperLink (replaces this process)")
    start.add_argument("--tls-dir", type=Path, help="folder with ca.crt, server.crt, server.key (deploy.dev_certs layout)")
    start.add_argument("--ca-cert", type=Path)
    start.add_argument("--server-cert", type=Path)
    start.add_argument("--server-key", type=Path)
    start.add_argument("--database", type=Path, required=True, help="SQLite state file (created)")
    start.add_argument("--host", default="0.0.0.0")
    start.add_argument("--port", type=int, default=DEFAULT_PORT)
    configure = sub.add_parser("configure-cli", help="write FLWR_HOME/config.toml for `flwr` commands")
    configure.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    configure.add_argument("--address", required=True, help="SuperLink host:port")
    configure.add_argument("--root-certificates", type=Path, required=True, help="the CA certificate")
    register = sub.add_parser("register", help="register merchants' public keys (named after the file)")
    register.add_argument("--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
    register.add_argument("public_keys", nargs="+", type=Path)
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
        args.database.parent.mkdir(parents=True, exist_ok=True)
        command = superlink_command(tls, args.database.resolve(), args.host, args.port)
        print(" ".join(command), flush=True)
        os.execve(command[0], command, tool_env())
    if args.command == "configure-cli":
        print(write_cli_config(args.flwr_home, args.address, args.root_certificates))
        return 0
    env = tool_env(args.flwr_home)
    for key in args.public_keys:
        print(f"{merchant_name(key)}: node id {register_merchant(key, env)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
