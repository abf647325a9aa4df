"""A merchant's side: start this merchant's SuperNode against the SuperLink.

    python -m deploy.merchant --superlink superlink.example:9092 --root-certificates ca.crt \\
        --private-key merchant-a.key --merchant-id merchant-a \\
        --data-path /srv/merchant-a/interactions.csv --state-dir /srv/merchant-a/fedads-state \\
        [--catalog-path /srv/merchant-a/catalog.csv] [--runtime-port 9094] [--trusted-entities publishers.yaml] \\
        [--clientapp-threads 4] [--clientapp-isolation shared|process]

    python -m deploy.merchant --superlink ... --root-certificates ca.crt --private-key merchant-a.key \
        --node-config /srv/merchant-a/node-config.toml

The node config (shared/node_config.py: data-path, state-dir, merchant-id, catalog-path) is
the merchant's own; given as flags, it is validated and written as a TOML file into the state
dir; given as a file, the file is validated (errors name its line and field). Either way the
file is handed to `flower-supernode --node-config`, so paths with spaces survive, and the
merchant agent reads the same file (`fedads-merchant budget --node-config FILE`). The SuperNode runs the ClientApp code of the FAB the SuperLink
sends, with this venv's packages: `flower-supernode` installs nothing unless given
`--allow-runtime-dependency-installation` (flwr/common/args.py, default off in 1.42).

Which apps it runs: `--trusted-entities FILE` (YAML, `key-id: ssh-ed25519 AAAA...`) is handed
to `flower-supernode --trusted-entities`; the SuperNode then executes only a FAB carrying a valid
Ed25519 signature by one of those keys and answers every other run with an error reply, without
starting its ClientApp (flwr/supernode/start_client_internal.py, where a message is pulled and stored;
`_verify_fab`). In Flower 1.42 a FAB carries signatures only when the SuperLink fetched it from
the Flower platform (`flwr run @publisher/app==version`); a FAB shipped with `flwr run .` has
none, so a pinned SuperNode refuses it (docs/DEPLOYMENT.md, "Which code a merchant runs").

`--clientapp-threads N`: the threads each ClientApp's numerical libraries may use (default: the
libraries' own, one per core unless the environment says otherwise). Set it where the SuperNode
shares its machine, e.g. the cores divided by the SuperNodes on it (deploy.supernode).

`--clientapp-isolation`: `shared` (the default) runs each message's ClientApp in the SuperNode's
warm process, one after another, as Flower's simulation does (no process per message: deployed
MovieLens rounds 11-18% shorter, docs/BENCHMARKS.md "Deployment", stop 41); `process` forks a process
for each message, Flower's isolation (a message's app state, or a crash, cannot reach the next
one).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from deploy.processes import positive_int
from deploy.superlink import BIN, tool_env
from deploy.warm_clientapp import ISOLATIONS
from shared.config import ConfigError
from shared.node_config import NodeConfig

DEFAULT_RUNTIME_PORT = 9094  # flwr 1.42's default; each SuperNode on one host needs its own


def supernode_command(
    superlink: str,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    node_config_file: str | Path,
    runtime_port: int = DEFAULT_RUNTIME_PORT,
    max_retries: int | None = None,
    bin_dir: Path = BIN,
    trusted_entities: str | Path | None = None,
    clientapp_threads: int | None = None,
    clientapp_isolation: str | None = None,
) -> list[str]:
    """`root_certificates=None` gives a plain-HTTP SuperNode (only to show it is refused);
    `trusted_entities`: the publishers whose signed FABs alone it runs (module docstring);
    `clientapp_threads`: each ClientApp's numerical libraries' threads (None: the libraries' defaults);
    `clientapp_isolation`: "process" or "shared" (deploy.supernode; None: its default, shared)."""
    # Flower's flower-supernode, run by deploy.supernode: no idle waits, a warm ClientApp start
    command = [str(bin_dir / "python"), "-m", "deploy.supernode", "--superlink", superlink]
    if clientapp_threads is not None:
        command += ["--clientapp-threads", str(clientapp_threads)]
    if clientapp_isolation is not None:
        command += ["--clientapp-isolation", clientapp_isolation]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    command += ["--node-config", str(node_config_file)]
    # the Runtime API the ClientApp process talks to: loopback only, one port per SuperNode
    command += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if trusted_entities is not None:
        command += ["--trusted-entities", str(trusted_entities)]
    return command


def load_trusted_entities(path: str | Path) -> dict[str, str]:
    """The trusted-entities YAML, checked as flower-supernode will use it (a mapping of key ids
    to OpenSSH Ed25519 public keys), so that a typo fails here with the file's name rather than
    at the SuperNode's start."""
    try:
        entities = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(entities, dict) or not entities:
        raise ConfigError(f"{path}: expected a mapping of key ids to OpenSSH Ed25519 public keys")
    for key_id, public_key in entities.items():
        try:
            loaded = serialization.load_ssh_public_key(str(public_key).encode())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {key_id}: not an OpenSSH public key ({exc})") from None
        if not isinstance(loaded, ed25519.Ed25519PublicKey):
            raise ConfigError(f"{path}: {key_id}: Flower verifies FAB signatures with Ed25519 keys only")
    return {str(k): str(v) for k, v in entities.items()}


def write_trusted_entities(path: str | Path, entities: dict[str, str]) -> Path:
    """Write a trusted-entities file: {key id: 'ssh-ed25519 AAAA...'}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(entities, sort_keys=True))
    load_trusted_entities(path)
    return path


def node_config_file(args: argparse.Namespace) -> Path:
    """The node config to start with: the given file, validated, or one written from the flags."""
    if args.node_config is not None:
        config = NodeConfig.load(args.node_config)
        for path in (config.data_path, config.catalog_path):
            if path and not Path(path).is_file():
                raise ConfigError(f"{args.node_config}: {path} does not exist")
        return Path(args.node_config).resolve()
    missing = [flag for flag in ("merchant_id", "data_path", "state_dir") if getattr(args, flag) is None]
    if missing:
        raise ConfigError(f"give --node-config, or {', '.join('--' + m.replace('_', '-') for m in missing)}")
    config = NodeConfig(data_path=str(args.data_path), state_dir=str(args.state_dir), merchant_id=args.merchant_id,
                        catalog_path=str(args.catalog_path or ""))
    return config.write(Path(args.state_dir) / "node-config.toml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--superlink", required=True, help="the SuperLink's Fleet address, host:port (its gateway's --fleet-address)")
    parser.add_argument("--root-certificates", type=Path, required=True, help="CA certificate of the SuperLink")
    parser.add_argument("--private-key", type=Path, required=True, help="this merchant's registered private key (OpenSSH)")
    parser.add_argument("--node-config", type=Path, help="the merchant's node config (TOML), instead of the four flags below")
    parser.add_argument("--merchant-id")
    parser.add_argument("--data-path", type=Path, help="interaction log, CSV or Parquet")
    parser.add_argument("--state-dir", type=Path, help="user factors, privacy ledger, last global model")
    parser.add_argument("--catalog-path", type=Path, help="the public ad catalog (CSV or Parquet)")
    parser.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT)
    parser.add_argument("--flwr-home", type=Path, help="where Flower unpacks received apps (default ~/.flwr)")
    parser.add_argument("--trusted-entities", type=Path,
                        help="YAML of publisher key ids -> ssh-ed25519 public keys: run only FABs they signed")
    parser.add_argument("--clientapp-threads", type=positive_int,
                        help="threads each ClientApp's numerical libraries may use (default: the libraries' own)")
    parser.add_argument("--clientapp-isolation", choices=ISOLATIONS,
                        help="shared (default): each message's ClientApp runs in the warm process; process: one process per message")
    args = parser.parse_args(argv)
    for path in (args.root_certificates, args.private_key, args.data_path, args.catalog_path, args.node_config, args.trusted_entities):
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist")
    try:
        config_file = node_config_file(args)
        if args.trusted_entities is not None:
            load_trusted_entities(args.trusted_entities)
    except ConfigError as exc:
        parser.error(str(exc))
    trusted = args.trusted_entities.resolve() if args.trusted_entities is not None else None
    command = supernode_command(args.superlink, args.root_certificates.resolve(), args.private_key.resolve(), config_file,
                                args.runtime_port, trusted_entities=trusted, clientapp_threads=args.clientapp_threads,
                                clientapp_isolation=args.clientapp_isolation)
    print(" ".join(command), flush=True)
    os.execve(command[0], command, tool_env(args.flwr_home))


if __name__ == "__main__":
    raise SystemExit(main())
