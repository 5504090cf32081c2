"""TLS material for a SuperLink and key pairs for SuperNode authentication.

    python -m federated.certs tls --host superlink.example.org --out certs/
    python -m federated.certs node-key --out keys/hospital-a

`tls` writes ca.crt, ca.key (keep it private), server.pem and server.key (the SuperLink's,
signed by the CA, valid for the given host names and IPs). `node-key` writes an EC key pair
in the OpenSSH format Flower reads: `<out>` (private, the client keeps it) and `<out>.pub`
(registered on the SuperLink with `flwr supernode register`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write_private(path: Path, data: bytes) -> None:
    """Created with mode 0600 from the first byte (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def server_names(cert_path: Path) -> set[str]:
    """The host names and IPs a server certificate is valid for (empty if unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def make_tls(out: Path, hosts: list[str], keep_ca_key: bool = True) -> dict[str, Path]:
    """A fresh CA and a server certificate for `hosts`; returns the file paths by role.

    `keep_ca_key=False` signs and forgets the CA's key (certificates made per run: nothing
    else will ever be signed with it, so it is never written to disk)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedforge federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca_cert": out / "ca.crt",
        "server_cert": out / "server.pem",
        "server_key": out / "server.key",
    }
    out.mkdir(parents=True, exist_ok=True)
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["server_cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server_key"], _pem(server_key))
    if keep_ca_key:
        paths["ca_key"] = out / "ca.key"
        _write_private(paths["ca_key"], _pem(ca_key))
    else:
        (out / "ca.key").unlink(missing_ok=True)  # one left by an older run
    return paths


def make_node_key(private_path: Path) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair in OpenSSH format: (private, public) paths."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private_path, public_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="CA + SuperLink server certificate")
    tls.add_argument("--host", action="append", required=True, help="host name or IP (repeat)")
    tls.add_argument("--out", type=Path, required=True)
    node = sub.add_parser("node-key", help="SuperNode authentication key pair")
    node.add_argument("--out", type=Path, required=True, help="private key path")
    args = parser.parse_args(argv)
    if args.command == "tls":
        for role, path in make_tls(args.out, args.host).items():
            print(f"{role:12s} {path}")
    else:
        private, public = make_node_key(args.out)
        print(f"private key  {private}  (keep it on the client)\npublic key   {public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
