"""Secret watermark keys: 32 random bytes plus a public key id (0..255).

The key id is not secret: it travels in the clear inside the payload (see
:func:`audit.watermark.make_payload`) and tells an auditor which key to try first after a
key rotation. The secret seeds every keyed choice of the mark (frequency bins, phases,
scrambling), derived with HMAC-SHA256 and a domain-separation label per use (RFC 2104).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_FORMAT = "synthnode-watermark-key/1"
SECRET_BYTES = 32


@dataclass(frozen=True)
class WatermarkKey:
    """A secret watermark key.

    Parameters
    ----------
    secret
        32 secret bytes (from :func:`secrets.token_bytes`).
    key_id
        Public identifier 0..255, embedded in the payload and reported by the detector.

    Raises
    ------
    ValueError
        If the secret is not 32 bytes or the key id is outside 0..255.
    """

    secret: bytes = field(repr=False)
    key_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.secret, (bytes, bytearray)) or len(self.secret) != SECRET_BYTES:
            raise ValueError(f"watermark secret must be {SECRET_BYTES} bytes")
        if not isinstance(self.key_id, int) or not 0 <= self.key_id <= 255:
            raise ValueError(f"key_id must be an int in 0..255, got {self.key_id!r}")

    @classmethod
    def generate(cls, key_id: int = 0) -> WatermarkKey:
        """A fresh random key (CSPRNG, :mod:`secrets`)."""
        return cls(secrets.token_bytes(SECRET_BYTES), key_id)

    def derive(self, label: str, n: int = 32) -> bytes:
        """``n`` bytes of HMAC-SHA256(secret, label || counter) keystream (domain separated)."""
        out = b""
        counter = 0
        while len(out) < n:
            msg = f"synthnode-wm/v1/{label}/{counter}".encode()
            out += hmac.new(bytes(self.secret), msg, hashlib.sha256).digest()
            counter += 1
        return out[:n]

    def seed(self, label: str) -> int:
        """A 256-bit integer seed for :class:`numpy.random.Generator` (PCG64)."""
        return int.from_bytes(self.derive(label, 32), "big")

    @property
    def fingerprint(self) -> str:
        """Public fingerprint (first 16 hex of a domain-separated digest); safe to log."""
        return self.derive("fingerprint", 8).hex()

    def to_file(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the key as JSON with file mode 0600 (created with O_EXCL unless ``overwrite``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(
            {"format": KEY_FORMAT, "key_id": self.key_id, "secret": bytes(self.secret).hex()},
            sort_keys=True,
        ).encode()
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data + b"\n")
        finally:
            os.close(fd)
        logger.info(
            "wrote watermark key id=%d fingerprint=%s to %s", self.key_id, self.fingerprint, path
        )
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> WatermarkKey:
        """Read a key written by :meth:`to_file`.

        Raises
        ------
        ValueError
            If the file is not a watermark key, or is readable or writable by group or
            others (anyone who reads it can forge or strip the watermark).
        """
        path = Path(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"watermark key {path} has mode {mode:o}; it must be 0600 "
                             f"(chmod 600 {path})")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != KEY_FORMAT:
                raise ValueError(f"not a {KEY_FORMAT} file")
            return cls(bytes.fromhex(data["secret"]), int(data["key_id"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a watermark key file ({exc})") from None
