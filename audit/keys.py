"""Ed25519 private key files: the one place that writes and reads them.

Used for the ledger's checkpoint signing key and for model approver keys. Files are PKCS#8
PEM, created exclusively (never overwritten) with mode 0600 and fsynced.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def write_new_private_key(path: Path) -> Ed25519PrivateKey:
    """Generate a key and write it to ``path`` (O_EXCL, mode 0600, fsync).

    Raises
    ------
    FileExistsError
        if ``path`` exists: a key file is never overwritten.
    """
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def read_private_key(path: Path, *, owner_only: bool = False) -> Ed25519PrivateKey:
    """Read an Ed25519 private key file.

    Raises
    ------
    ValueError
        if the file is not an Ed25519 private key, or (``owner_only``) it is readable by
        group or others.
    """
    path = Path(path)
    if owner_only:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"signing key {path} has mode {mode:o}; it must be 0600")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key
