"""A throw-away PKI for DICOM TLS tests: a CA, a server certificate for 127.0.0.1 /
localhost and client certificates with a given Common Name (PEM files)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class Pki:
    """``ca.crt``, ``server.crt/.key`` and ``client(cn)`` -> (crt, key) under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.ca = (x509.CertificateBuilder().subject_name(_name("i20 test CA"))
                   .issuer_name(_name("i20 test CA")).public_key(self.ca_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(self.ca_key, hashes.SHA256()))
        _write(root / "ca", self.ca_key, self.ca)
        self.server = self._issue("server", "localhost", server=True)

    @property
    def ca_file(self) -> Path:
        return self.root / "ca.crt"

    def _issue(self, stem: str, cn: str, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=1)))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
        cert = b.sign(self.ca_key, hashes.SHA256())
        _write(self.root / stem, key, cert)
        return self.root / f"{stem}.crt", self.root / f"{stem}.key"

    def client(self, cn: str) -> tuple[Path, Path]:
        return self._issue(f"client-{cn}", cn)
