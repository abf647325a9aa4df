"""DEVELOPMENT / TEST ONLY: a throw-away certificate authority, a SuperLink TLS certificate for
localhost, and merchant authentication key pairs.

    python -m deploy.dev_certs --out certs/ --merchants merchant-a merchant-b merchant-c

Writes, under --out:
  ca.crt, ca.key              the CA (ca.key is SECRET; a real deployment uses its own PKI)
  server.crt, server.key      SuperLink certificate for localhost / 127.0.0.1 / ::1 (server.key is SECRET)
  merchants/<id>.key          a merchant's SuperNode private key, OpenSSH format (SECRET, stays with the merchant)
  merchants/<id>.pub          its public key, OpenSSH format: what the SuperLink operator registers

Never use these files outside a development machine or a test: the CA key sits next to the
certificates it signed, the certificates only name loopback addresses, and nothing is revoked.
Flower's SuperNode authentication takes ECDSA keys on a NIST curve (flwr/cli/supernode/register.py
`try_load_public_key`; flwr/supernode/cli/flower_supernode.py `_try_setup_client_authentication`);
P-384 is the curve Flower's documentation uses.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEV_ONLY_BANNER = "DEVELOPMENT/TEST ONLY: self-signed CA and keys; do not use in production."
_VALIDITY = datetime.timedelta(days=30)  # short on purpose: these files are disposable


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class MerchantKeys:
    merchant_id: str
    private_key: Path
    public_key: Path


def _write_secret(path: Path, data: bytes) -> None:
    """Private keys are created readable by their owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedads dev"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_tls_files(out_dir: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> TlsFiles:
    """A CA and a SuperLink server certificate signed by it, valid for `hosts` (names or IPs)."""
    out = Path(out_dir)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedads dev CA"))
        .issuer_name(_name("fedads dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(files.ca_key, _pem_key(ca_key))
    _write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(files.server_key, _pem_key(server_key))
    return files


def create_merchant_keys(out_dir: str | Path, merchant_id: str) -> MerchantKeys:
    """An ECDSA P-384 key pair in OpenSSH format, the format the SuperNode and `flwr supernode register` read."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = MerchantKeys(merchant_id, out / f"{merchant_id}.key", out / f"{merchant_id}.pub")
    _write_secret(keys.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(keys.public_key, public + f" {merchant_id}\n".encode())
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (created)")
    parser.add_argument("--merchants", nargs="*", default=[], metavar="ID", help="merchant ids to create key pairs for")
    parser.add_argument("--host", action="append", default=None,
                        help="a name or IP the server certificate is valid for (repeatable; default: localhost 127.0.0.1 ::1)")
    args = parser.parse_args(argv)
    print(DEV_ONLY_BANNER)
    tls = create_tls_files(args.out, tuple(args.host) if args.host else ("localhost", "127.0.0.1", "::1"))
    print(f"CA certificate (give to merchants and `flwr` users): {tls.ca_cert}")
    print(f"SuperLink certificate and key:                       {tls.server_cert} {tls.server_key}")
    print(f"SECRET, keep off shared storage:                     {tls.ca_key} {tls.server_key}")
    for merchant_id in args.merchants:
        keys = create_merchant_keys(args.out / "merchants", merchant_id)
        print(f"merchant {merchant_id}: private key (SECRET, merchant only) {keys.private_key}; public key (register it) {keys.public_key}")
    print(DEV_ONLY_BANNER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
