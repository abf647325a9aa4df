"""A merchant's side: start this merchant's SuperNode against the SuperLink.

    python -m deploy.merchant --superlink superlink.example:9093 --root-certificates ca.crt \\
        --private-key merchant-a.key --merchant-id merchant-a \\
        --data-path /srv/merchant-a/interactions.csv --state-dir /srv/merchant-a/fedads-state \\
        [--catalog-path /srv/merchant-a/catalog.csv] [--runtime-port 9094]

    python -m deploy.merchant --superlink ... --root-certificates ca.crt --private-key merchant-a.key \
        --node-config /srv/merchant-a/node-config.toml

The node config (shared/node_config.py: data-path, state-dir, merchant-id, catalog-path) is
the merchant's own; given as flags, it is validated and written as a TOML file into the state
dir; given as a file, the file is validated (errors name its line and field). Either way the
file is handed to `flower-supernode --node-config`, so paths with spaces survive, and the
merchant agent reads the same file (`fedads-merchant budget --node-config FILE`). The SuperNode runs the ClientApp code of the FAB the SuperLink
sends, with this venv's packages: `flower-supernode` installs nothing unless given
`--allow-runtime-dependency-installation` (flwr/common/args.py, default off in 1.42).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from deploy.superlink import BIN, tool_env
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
) -> list[str]:
    """`root_certificates=None` gives a plain-HTTP SuperNode (only to show it is refused)."""
    command = [str(bin_dir / "flower-supernode"), "--superlink", superlink]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    command += ["--node-config", str(node_config_file)]
    # the Runtime API the ClientApp process talks to: loopback only, one port per SuperNode
    command += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command


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
    parser.add_argument("--superlink", required=True, help="SuperLink host:port")
    parser.add_argument("--root-certificates", type=Path, required=True, help="CA certificate of the SuperLink")
    parser.add_argument("--private-key", type=Path, required=True, help="this merchant's registered private key (OpenSSH)")
    parser.add_argument("--node-config", type=Path, help="the merchant's node config (TOML), instead of the four flags below")
    parser.add_argument("--merchant-id")
    parser.add_argument("--data-path", type=Path, help="interaction log, CSV or Parquet")
    parser.add_argument("--state-dir", type=Path, help="user factors, privacy ledger, last global model")
    parser.add_argument("--catalog-path", type=Path, help="the public ad catalog (CSV or Parquet)")
    parser.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT)
    parser.add_argument("--flwr-home", type=Path, help="where Flower unpacks received apps (default ~/.flwr)")
    args = parser.parse_args(argv)
    for path in (args.root_certificates, args.private_key, args.data_path, args.catalog_path, args.node_config):
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist")
    try:
        config_file = node_config_file(args)
    except ConfigError as exc:
        parser.error(str(exc))
    command = supernode_command(args.superlink, args.root_certificates.resolve(), args.private_key.resolve(), config_file, args.runtime_port)
    print(" ".join(command), flush=True)
    os.execve(command[0], command, tool_env(args.flwr_home))


if __name__ == "__main__":
    raise SystemExit(main())
