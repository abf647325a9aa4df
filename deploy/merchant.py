"""A merchant's side: start this merchant's SuperNode against the SuperLink.

    python -m deploy.merchant --superlink superlink.example:9093 --root-certificates ca.crt \\
        --private-key merchant-a.key --merchant-id merchant-a \\
        --data-path /srv/merchant-a/interactions.csv --state-dir /srv/merchant-a/fedads-state \\
        [--catalog-path /srv/merchant-a/catalog.csv] [--runtime-port 9094]

The node config (data-path, state-dir, merchant-id, catalog-path: what client/shard.py reads)
is written as a TOML file into the state dir and handed to `flower-supernode --node-config`,
so paths with spaces survive. The SuperNode runs the ClientApp code of the FAB the SuperLink
sends, with this venv's packages: `flower-supernode` installs nothing unless given
`--allow-runtime-dependency-installation` (flwr/common/args.py, default off in 1.42).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import tomli_w

from deploy.superlink import BIN, tool_env

DEFAULT_RUNTIME_PORT = 9094  # flwr 1.42's default; each SuperNode on one host needs its own


def write_node_config(
    path: str | Path, data_path: str | Path, state_dir: str | Path, merchant_id: str, catalog_path: str | Path | None = None
) -> Path:
    """The keys client/shard.py `_node_source` reads for a deployed merchant, as absolute paths."""
    config = {"data-path": str(Path(data_path).resolve()), "state-dir": str(Path(state_dir).resolve()), "merchant-id": merchant_id}
    if catalog_path:
        config["catalog-path"] = str(Path(catalog_path).resolve())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--superlink", required=True, help="SuperLink host:port")
    parser.add_argument("--root-certificates", type=Path, required=True, help="CA certificate of the SuperLink")
    parser.add_argument("--private-key", type=Path, required=True, help="this merchant's registered private key (OpenSSH)")
    parser.add_argument("--merchant-id", required=True)
    parser.add_argument("--data-path", type=Path, required=True, help="interaction log, CSV or Parquet")
    parser.add_argument("--state-dir", type=Path, required=True, help="user factors, privacy ledger, last global model")
    parser.add_argument("--catalog-path", type=Path, help="the public ad catalog (CSV or Parquet)")
    parser.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT)
    parser.add_argument("--flwr-home", type=Path, help="where Flower unpacks received apps (default ~/.flwr)")
    args = parser.parse_args(argv)
    for path in (args.root_certificates, args.private_key, args.data_path, args.catalog_path):
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist")
    config_file = write_node_config(args.state_dir / "node-config.toml", args.data_path, args.state_dir, args.merchant_id, args.catalog_path)
    command = supernode_command(args.superlink, args.root_certificates.resolve(), args.private_key.resolve(), config_file, args.runtime_port)
    print(" ".join(command), flush=True)
    os.execve(command[0], command, tool_env(args.flwr_home))


if __name__ == "__main__":
    raise SystemExit(main())
