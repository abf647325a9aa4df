"""Who can reach what in a deployment (issue 14): the Control API only from the SuperLink's
loopback, the Fleet API through a gateway that forwards nothing else, a merchant's SuperNode
that runs only FABs signed by a publisher it pinned, and a state database its owner alone reads.

The gateway's parser and re-framing are checked in process in tests/test_fleet_gateway.py; here,
on a real deployment started as deploy.superlink starts it, with the Fleet gateway on this
host's non-loopback address where it has one, and a stranger's `flwr` holding only the CA
certificate.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import time
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="deploy.dev_certs needs the `cryptography` package (a flwr dependency)")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from deploy.dev_certs import create_merchant_keys, create_tls_files
from deploy.local import Merchant, local_deployment, write_merchant_data
from deploy.merchant import load_trusted_entities, supernode_command, write_trusted_entities
from deploy.superlink import (
    CONNECTION,
    IN_MEMORY,
    ServerTls,
    parse_cli_json,
    prepare_database,
    register_command,
    start_command,
    superlink_command,
    tool_env,
    tunnel_command,
    write_cli_config,
)
from deploy.superlink import main as superlink_main
from shared.config import ConfigError
from shared.flower_internals import Pinned, resolve
from tests.conftest import is_loopback, listening_addresses, processes_mentioning, small_run_config

RUN_TIMEOUT = 300.0


def non_loopback_address() -> str | None:
    """An IPv4 address of this host that is not loopback and can be bound, or None: the
    hostname's address, the source address of a route out (a UDP connect sends nothing), or
    a local address from the kernel's routing table."""
    candidates: list[str] = []
    try:
        candidates.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # TEST-NET-1: any routable destination picks a source address
            candidates.append(probe.getsockname()[0])
        except OSError:
            pass
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        candidates += [lines[i - 1].split()[-1] for i, line in enumerate(lines) if "/32 host LOCAL" in line]
    except OSError:
        pass
    for candidate in candidates:
        try:
            if ipaddress.ip_address(candidate).is_loopback:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((candidate, 0))
            return candidate
        except (ValueError, OSError):
            continue
    return None


HOST_ADDRESS = non_loopback_address()


# -- commands and files, no network ---------------------------------------------------------


def test_superlink_binds_loopback_by_default(tmp_path):
    files = create_tls_files(tmp_path / "certs")
    command = superlink_command(ServerTls(files.ca_cert, files.server_cert, files.server_key), tmp_path / "db")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert tunnel_command("op@link.example", 9093, 19093) == [
        "ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-L", "127.0.0.1:19093:127.0.0.1:9093", "op@link.example"]


def test_superlink_state_in_memory_or_in_its_database(tmp_path):
    files = create_tls_files(tmp_path / "certs")
    tls = ServerTls(files.ca_cert, files.server_cert, files.server_key)
    in_memory, on_disk = superlink_command(tls, None), superlink_command(tls, tmp_path / "db")
    assert in_memory[in_memory.index("--database") + 1] == IN_MEMORY == resolve(Pinned("flwr.supercore.constant", "FLWR_IN_MEMORY_DB_NAME"))
    assert on_disk[on_disk.index("--database") + 1] == str(tmp_path / "db")
    assert "--in-memory" in start_command(tls, None) and "--database" not in start_command(tls, None)
    for both_or_neither in (["--in-memory", "--database", str(tmp_path / "db")], []):
        with pytest.raises(SystemExit):
            superlink_main(["start", "--tls-dir", str(tmp_path / "certs"), *both_or_neither])


def test_database_is_created_owner_only(tmp_path):
    previous = os.umask(0o022)  # a typical umask: files 0644 unless created otherwise
    try:
        database = prepare_database(tmp_path / "new" / "state" / "superlink.db")
        (tmp_path / "old").mkdir()
        old = tmp_path / "old" / "superlink.db"
        old.write_bytes(b"")
        Path(f"{old}-wal").write_bytes(b"")
        prepare_database(old)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700 == stat.S_IMODE((tmp_path / "new").stat().st_mode)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600 == stat.S_IMODE(Path(f"{old}-wal").stat().st_mode)


def publisher_key() -> tuple[ed25519.Ed25519PrivateKey, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_trusted_entities_file_is_checked(tmp_path):
    _, public = publisher_key()
    path = write_trusted_entities(tmp_path / "publishers.yaml", {"fedads-release": public})
    assert load_trusted_entities(path) == {"fedads-release": public}
    assert supernode_command("h:1", "ca", "k", "cfg", trusted_entities=path)[-2:] == ["--trusted-entities", str(path)]
    ecdsa_public = create_merchant_keys(tmp_path, "m").public_key.read_text().split(" m")[0]
    (tmp_path / "ecdsa.yaml").write_text(f"release: {ecdsa_public}\n")
    with pytest.raises(ConfigError, match="Ed25519"):
        load_trusted_entities(tmp_path / "ecdsa.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="mapping"):
        load_trusted_entities(tmp_path / "empty.yaml")


# -- a real deployment ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned_deployment(tmp_path_factory):
    """One merchant whose SuperNode pins a publisher key; the Fleet gateway on this host's
    non-loopback address when it has one."""
    root = tmp_path_factory.mktemp("deploy-security")
    cfg = small_run_config(root, **{"num-rounds": 1, "min-nodes": 1, "synthetic-merchants": 1, "privacy": "user", "local-epochs": 1})
    (merchant,) = write_merchant_data(root / "merchants", cfg.to_flower(), 1)
    _, public = publisher_key()
    trusted = write_trusted_entities(root / "merchants" / "publishers.yaml", {"fedads-release": public})
    pinned = Merchant(merchant.merchant_id, merchant.data_path, merchant.state_dir, merchant.catalog_path, trusted_entities=trusted)
    with local_deployment(root / "flower", [pinned], fleet_host=HOST_ADDRESS or "127.0.0.1") as deployed:
        yield root, cfg, pinned, deployed
    assert processes_mentioning(str(root / "flower")) == [], "a Flower process outlived the deployment"


def test_only_the_fleet_gateway_listens_beyond_loopback(pinned_deployment):
    root, _, _, deployed = pinned_deployment
    listening = [address for addresses in listening_addresses(str(deployed.work_dir)).values() for address in addresses]
    assert deployed.address in listening and deployed.fleet_address in listening, listening
    exposed = [address for address in listening if not is_loopback(address)]
    assert exposed == ([deployed.fleet_address] if HOST_ADDRESS else []), listening


def _stranger(root: Path, name: str, address: str, ca_cert: Path) -> dict[str, str]:
    """A `flwr` configuration with the public CA certificate and nothing else."""
    home = root / f"stranger-{name}"
    write_cli_config(home, address, ca_cert)
    return tool_env(home)


def _refused(done, reason: str) -> None:
    reply = parse_cli_json(done.stdout)
    assert reply.get("success") is False, (done.stdout[-2000:], done.stderr[-2000:])
    assert reason in str(reply.get("error-message", "")).lower(), reply


def _stranger_tries(root: Path, deployed, name: str, address: str, reason: str) -> None:
    """The attack of issue 14: `flwr ls`, and `flwr supernode register` of one's own key, with
    only ca.crt; both refused, and no key but the operator's merchant's is registered."""
    stranger_key = create_merchant_keys(root / f"stranger-keys-{name}", "stranger")
    env = _stranger(root, name, address, deployed.tls.ca_cert)
    control_calls = deployed.log("superlink").count('"POST /v1/control/')  # the SuperLink's access log
    _refused(deployed.flwr("ls", CONNECTION, "--format", "json", env=env), reason)
    _refused(deployed.flwr(*register_command(stranger_key.public_key, "stranger")[1:], env=env), reason)
    assert deployed.log("superlink").count('"POST /v1/control/') == control_calls  # neither reached the SuperLink
    nodes = parse_cli_json(deployed.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]
    assert len(nodes) == 1, nodes  # the operator's one merchant


@pytest.mark.skipif(HOST_ADDRESS is None, reason="this host has no non-loopback address to reach the SuperLink's port from")
def test_stranger_cannot_reach_the_superlink_port(pinned_deployment):
    """The SuperLink's own port (Control API) from the host's network address: nothing listens
    there (it was 0.0.0.0 before issue 14)."""
    root, _, _, deployed = pinned_deployment
    port = int(deployed.address.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):  # refused by the kernel, not by a certificate check (it names HOST_ADDRESS)
        socket.create_connection((HOST_ADDRESS, port), timeout=5).close()
    _stranger_tries(root, deployed, "superlink-port", f"{HOST_ADDRESS}:{port}", "unavailable")


def test_stranger_is_refused_by_the_fleet_gateway(pinned_deployment):
    """The door merchants use answers Control API calls with 403 without forwarding them."""
    root, _, _, deployed = pinned_deployment
    _stranger_tries(root, deployed, "gateway", deployed.fleet_address, "403 forbidden")
    assert "b'/v1/control/list-runs' is not a Fleet API call" in deployed.log("superlink")  # the gateway's own log


def test_pinned_supernode_refuses_an_unsigned_fab(pinned_deployment):
    """`flwr run .` ships a FAB without publisher signatures: the SuperNode that pins a publisher
    answers with an error and never starts its ClientApp, so the merchant's data is not read."""
    root, cfg, merchant, deployed = pinned_deployment
    reply = deployed.submit(cfg.to_flower())
    assert reply.get("success"), reply
    run_id = int(reply["run-id"])
    deadline = time.monotonic() + RUN_TIMEOUT
    log = ""
    while "The FAB could not be verified" not in (log := deployed.log(f"supernode-{merchant.merchant_id}")):
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(1.0)  # polling the log of a process we started
    deployed.flwr("stop", str(run_id), CONNECTION)
    assert "Start `flwr-clientapp` process" not in log and "Successfully installed" not in log, log[-3000:]
    apps = deployed.work_dir / "supernodes" / merchant.merchant_id / "flwr-home" / "apps"
    assert not apps.exists() or not any(apps.iterdir())  # the FAB was never unpacked
    assert not merchant.state_dir.exists() or not any(merchant.state_dir.iterdir()), list(merchant.state_dir.iterdir())
