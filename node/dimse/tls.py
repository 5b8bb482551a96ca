"""DICOM TLS on the SCP (PS3.15 Annex B.9, the BCP 195 secure transport profile).

TLS 1.2 or later with the BCP 195 (RFC 9325 4.2) cipher suites: ECDHE key exchange with
AES-GCM or ChaCha20-Poly1305, no compression. The handshake runs in the connection's own
thread under ``dimse.tls.handshake_timeout_s`` (pynetdicom would do it in the accept loop,
where one silent client would stop every other connection). The client certificate's
subject Common Name is what ``allowed_peers[].tls_subject`` is matched against.
"""
from __future__ import annotations

import ssl
from typing import Any

__all__ = ["BCP195_CIPHERS", "client_context", "peer_common_name", "server_context"]

#: RFC 9325 4.2 recommended cipher suites for TLS 1.2 (TLS 1.3 suites are all AEAD)
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])


def server_context(tls: Any) -> ssl.SSLContext:
    """The SCP's TLS context from ``dimse.tls`` settings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    if tls.require_client_cert:
        if tls.ca_file is None:
            raise ValueError("dimse.tls.require_client_cert needs dimse.tls.ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: Any, cert_file: Any = None, key_file: Any = None) -> ssl.SSLContext:
    """TLS context for the node's own associations (C-STORE dispatch): the peer's
    certificate verified against ``ca_file`` and its host name, BCP 195 suites, and this
    node's client certificate when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def peer_common_name(sock: Any) -> str | None:
    """Subject CN of the verified client certificate on ``sock`` (None: no TLS / no cert)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    subject: Any = (cert or {}).get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
