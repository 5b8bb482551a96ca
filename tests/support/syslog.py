"""A real syslog receiver for tests: RFC 5425 (TLS, optional client certificates) or RFC 6587
octet-counting TCP, on loopback, in a background asyncio loop; it can go down (dropping its
connections, as a crashed repository does) and come back on the same port.

Also :func:`make_pki`: a throw-away CA with a server certificate for 127.0.0.1 / localhost
and a client certificate, written as PEM files (``cryptography``; nothing is downloaded).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.net import get_port

_SEQ = re.compile(rb'\[ledger@32473 [^\]]*?seq="(\d+)"')


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                          crl_sign=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    """CA, server (localhost, 127.0.0.1) and client certificates with their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test audit CA")])
    ca = _cert("test audit CA", ca_key, ca_name, ca_key, ca=True)
    paths = {}
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"test {name}", key, ca_name, ca_key, server=server)
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(_key_pem(key))
        (folder / f"{name}.key").chmod(0o600)
        paths[name] = (folder / f"{name}.pem", folder / f"{name}.key")
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(folder / "ca.pem", *paths["server"], *paths["client"])


class SyslogReceiver:
    """Collects octet-counted syslog messages (``.messages``, in arrival order).

    ``pki`` given: TLS (RFC 5425), requiring a client certificate signed by its CA when
    ``require_client_cert``; else plain TCP (RFC 6587 octet counting).
    """

    def __init__(self, pki: Pki | None = None, *, require_client_cert: bool = True,
                 port: int | None = None) -> None:
        self.pki = pki
        self.require_client_cert = require_client_cert
        self.port = port or get_port()
        self.messages: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        #: set: stop reading (what arrives waits, acknowledged by TCP, in the socket buffer)
        self.frozen = threading.Event()
        self._dropped: set[asyncio.StreamWriter] = set()

    def _ssl(self) -> ssl.SSLContext | None:
        if self.pki is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.pki.server_cert), str(self.pki.server_key))
        if self.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.pki.ca))
        return ctx

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._lock:
            self.connections += 1
        try:
            while True:
                while self.frozen.is_set():
                    await asyncio.sleep(0.01)
                if writer in self._dropped:  # what it had not read dies with it
                    return
                head = await reader.readuntil(b" ")
                body = await reader.readexactly(int(head[:-1]))
                with self._lock:
                    self.messages.append(body)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError,
                asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def start(self) -> SyslogReceiver:
        async def up() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                      ssl=self._ssl(), reuse_address=True)
        self._call(up())
        return self

    def stop(self) -> None:
        """Go down like a crashed repository: stop listening, drop every connection (and
        whatever it had received but not read)."""
        async def down() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                self._dropped.add(w)
                w.transport.abort()
            if self._server is not None:
                await self._server.wait_closed()
            self._server = None
        self._call(down())
        self.frozen.clear()

    def close(self) -> None:
        self.stop()
        self._call(asyncio.sleep(0.05))  # let the dropped connections' handlers end
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def seqs(self) -> list[int]:
        """The ledger entry numbers of the messages received, in arrival order."""
        with self._lock:
            return [int(m.group(1)) for b in self.messages if (m := _SEQ.search(b))]
