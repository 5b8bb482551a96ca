"""DICOMweb test helpers: tokens of a test node, raw multipart bodies, clients.

:func:`web_overrides` is the ``dicomweb`` settings section of a test node (free port,
tokens with the hash in the config); :data:`TOKENS` their plain values. :func:`multipart`
builds a multipart/related body from raw parts (malformed ones included).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from dicomweb_client.api import DICOMwebClient

__all__ = ["TOKENS", "client", "multipart", "web_overrides"]

#: name -> (plain token, scopes)
TOKENS: dict[str, tuple[str, list[str]]] = {
    "rw": ("tok-rw-3d1f", ["store", "read"]),
    "reader": ("tok-reader-9a2c", ["read"]),
    "storer": ("tok-storer-77b0", ["store"]),
    "admin": ("tok-admin-5e5e", ["admin"]),
}


def web_overrides(**extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "enabled": True, "port": 0, "access_flush_s": 0.2,
        "tokens": [{"name": n, "token_sha256": hashlib.sha256(t.encode()).hexdigest(),
                    "scopes": s} for n, (t, s) in TOKENS.items()],
    }
    d.update(extra)
    return d


def auth(name: str = "rw") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def client(url: str, name: str = "rw") -> DICOMwebClient:
    return DICOMwebClient(url, headers=auth(name))


def multipart(parts: Sequence[bytes], boundary: str = "b0undary",
              part_type: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()
