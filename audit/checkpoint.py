"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed-note envelopes (Ed25519).

Checkpoint body (https://c2sp.org/tlog-checkpoint)::

    <origin>\\n<decimal tree size>\\n<base64 root hash>\\n

Signed note (https://c2sp.org/signed-note): the body, an empty line, then one line per
signature ``— <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>``; the
signature covers the body bytes. Key id = ``SHA-256(name || 0x0A || 0x01 || pubkey)[:4]``;
the verifier key string is ``<name>+<key id hex>+<base64(0x01 || pubkey)>``.

The :class:`Checkpointer` never signs two different roots for one size, nor a size smaller
than one already signed (checked against the database *and* the external checkpoint file,
which is written first, so a crash between the two leaves the file ahead, never behind),
and refuses to sign a tree that is not an extension of the last signed one.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import insert, select

from audit import merkle
from audit.events import Event, EventType
from audit.keys import read_private_key, write_new_private_key
from audit.ledger import Ledger, LedgerError
from audit.merkle import InvalidProof
from audit.tables import ledger_checkpoints, ledger_entries

log = logging.getLogger(__name__)

EM_DASH = "\u2014"
ALG_ED25519 = 0x01


class InvalidCheckpoint(InvalidProof):
    """A checkpoint or signed note is malformed or its signature does not verify."""


# -- keys --------------------------------------------------------------------------------
def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, public: Ed25519PublicKey) -> bytes:
    """C2SP signed-note key id: ``SHA-256(name || 0x0A || 0x01 || pubkey)[:4]``."""
    return hashlib.sha256(
        name.encode() + b"\n" + bytes([ALG_ED25519]) + raw_public(public)
    ).digest()[:4]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise ValueError(f"note key name {name!r} must be non-empty without spaces or '+'")


@dataclass(frozen=True)
class Verifier:
    """A named Ed25519 note verifier key."""

    name: str
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public)

    def vkey(self) -> str:
        """The verifier key string ``name+hexid+base64(0x01||pubkey)``."""
        blob = base64.b64encode(bytes([ALG_ED25519]) + raw_public(self.public)).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Parse a verifier key string (raises ValueError)."""
        try:
            name, hexid, blob = text.strip().split("+", 2)
            raw = base64.b64decode(blob, validate=True)
        except Exception as exc:
            raise ValueError(f"not a note verifier key: {exc}") from None
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise ValueError("verifier key is not an Ed25519 (0x01) key")
        v = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if v.key_id.hex() != hexid.lower():
            raise ValueError("verifier key id does not match name and key")
        return v


def load_verifier(path: Path, name: str | None = None) -> Verifier:
    """Load a verifier from a vkey file, or from a PEM public key plus ``name``."""
    text = Path(path).read_text().strip()
    if text.startswith("-----BEGIN"):
        if not name:
            raise ValueError("a PEM public key needs the key name (the checkpoint origin)")
        pub = serialization.load_pem_public_key(text.encode())
        if not isinstance(pub, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return Verifier(name, pub)
    return Verifier.parse(text)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The node's Ed25519 signing key; generated on first use (PKCS#8 PEM, mode 0600).

    Creation is atomic (temp file, fsync, hard link), so concurrent first starts agree on
    one key. An existing key readable by group or others is refused.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_new_private_key(tmp)
        try:
            os.link(tmp, path)
            log.info("generated ledger signing key %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        return read_private_key(path, owner_only=True)
    except ValueError as exc:
        raise LedgerError(str(exc)) from None


# -- notes and checkpoints ---------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint: origin, tree size, root hash (and the signed note text)."""

    origin: str
    size: int
    root: bytes
    note: str = ""

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def sign_note(body: str, name: str, key: Ed25519PrivateKey) -> str:
    """C2SP signed note over ``body`` (which must end in a newline)."""
    _check_name(name)
    if not body.endswith("\n") or "\n\n" in body:
        raise ValueError("note text must end in a newline and contain no empty line")
    sig = key.sign(body.encode("utf-8"))
    kid = key_id(name, key.public_key())
    return f"{body}\n{EM_DASH} {name} {base64.b64encode(kid + sig).decode()}\n"


def sign_checkpoint(origin: str, size: int, root: bytes, key: Ed25519PrivateKey) -> Checkpoint:
    cp = Checkpoint(origin, size, root)
    return Checkpoint(origin, size, root, sign_note(cp.body(), origin, key))


def parse_checkpoint_body(body: str) -> Checkpoint:
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise InvalidCheckpoint("checkpoint body needs origin, size and root lines")
    origin, size_s, root_s = lines[0], lines[1], lines[2]
    if not origin:
        raise InvalidCheckpoint("empty origin line")
    if not size_s.isdigit() or (size_s != "0" and size_s.startswith("0")):
        raise InvalidCheckpoint(f"bad tree size {size_s!r}")
    try:
        root = base64.b64decode(root_s, validate=True)
    except Exception:
        raise InvalidCheckpoint("root hash is not base64") from None
    if len(root) != merkle.HASH_SIZE:
        raise InvalidCheckpoint("root hash is not 32 bytes")
    return Checkpoint(origin, int(size_s), root)


def open_checkpoint(note: str, verifier: Verifier, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint note with ``verifier``; return the checkpoint.

    Raises
    ------
    InvalidCheckpoint
        malformed note, wrong origin, or no valid signature by ``verifier``.
    """
    if "\n\n" not in note or not note.endswith("\n"):
        raise InvalidCheckpoint("not a signed note")
    body, sigs = note.split("\n\n", 1)
    body += "\n"
    cp = parse_checkpoint_body(body)
    if origin is not None and cp.origin != origin:
        raise InvalidCheckpoint(f"origin {cp.origin!r} is not {origin!r}")
    for line in sigs.rstrip("\n").split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH:
            raise InvalidCheckpoint(f"malformed signature line {line!r}")
        if parts[1] != verifier.name:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except Exception:
            raise InvalidCheckpoint("signature is not base64") from None
        if len(blob) != 68 or blob[:4] != verifier.key_id:
            continue
        try:
            verifier.public.verify(blob[4:], body.encode("utf-8"))
        except InvalidSignature:
            raise InvalidCheckpoint(f"bad signature on checkpoint of size {cp.size}") from None
        return Checkpoint(cp.origin, cp.size, cp.root, note)
    raise InvalidCheckpoint(f"checkpoint of size {cp.size} has no signature by {verifier.name}")


def split_notes(text: str) -> tuple[list[str], list[str]]:
    """Split a checkpoint file into signed notes; also return pieces that are not notes
    (a torn final write, or garbage)."""
    pieces = text.split("\n\n")
    notes: list[str] = []
    junk: list[str] = []
    i = 0
    while i < len(pieces):
        body = pieces[i]
        if (
            i + 1 < len(pieces)
            and pieces[i + 1].startswith(EM_DASH + " ")
            and not body.startswith(EM_DASH)
        ):
            notes.append(f"{body}\n\n{pieces[i + 1]}\n")
            i += 2
        else:
            if body.strip():
                junk.append(body)
            i += 1
    return notes, junk


def read_checkpoint_file(path: Path, tail_bytes: int | None = None) -> tuple[list[str], list[str]]:
    """Signed notes in the external checkpoint file (optionally only its last bytes)."""
    path = Path(path)
    if not path.exists():
        return [], []
    with path.open("rb") as fh:
        if tail_bytes is not None:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - tail_bytes))
        raw = fh.read()
    text = raw.decode("utf-8", errors="replace")
    return split_notes(text)


def append_checkpoint_file(path: Path, note: str) -> None:
    """Append one note (and a blank separator line) to the external file; fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (note + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def syslog_send(
    target: str, message: str, *, msgid: str = "CHECKPOINT", app: str = "synthnode"
) -> None:
    """Send one RFC 5424 message (facility 13 "log audit", severity 6 "informational").

    ``target`` is ``udp://host:port`` (RFC 5426) or ``tcp://host:port`` with RFC 6587
    octet-counting framing.
    """
    url = urlparse(target)
    if url.scheme not in ("udp", "tcp") or not url.hostname or not url.port:
        raise ValueError(f"syslog target {target!r} must be udp://host:port or tcp://host:port")
    pri = 13 * 8 + 6
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    host = socket.gethostname() or "-"
    msg = (
        f"<{pri}>1 {ts} {host} {app} {os.getpid()} {msgid} - ".encode()
        + b"\xef\xbb\xbf"
        + message.encode()
    )
    if url.scheme == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(msg, (url.hostname, url.port))
    else:
        with socket.create_connection((url.hostname, url.port), timeout=5) as s:
            s.sendall(str(len(msg)).encode() + b" " + msg)


# -- checkpointer ------------------------------------------------------------------------
class Checkpointer:
    """Signs checkpoints of one ledger, safely (see module docs).

    Parameters
    ----------
    ledger
        the ledger.
    key
        the node's Ed25519 signing key.
    origin
        checkpoint origin line, also the note key name.
    checkpoint_file
        the external append-only checkpoint file.
    syslog_target
        optional ``udp://`` / ``tcp://`` RFC 5424 target that also receives each note.
    """

    def __init__(self, ledger: Ledger, key: Ed25519PrivateKey, origin: str, checkpoint_file: Path,
                 syslog_target: str | None = None, actor: str = "component:ledger") -> None:
        _check_name(origin)
        self.ledger = ledger
        self.key = key
        self.origin = origin
        self.verifier = Verifier(origin, key.public_key())
        self.checkpoint_file = Path(checkpoint_file)
        self.syslog_target = syslog_target
        self.actor = actor

    def last_file_checkpoint(self) -> Checkpoint | None:
        notes, _junk = read_checkpoint_file(self.checkpoint_file, tail_bytes=1 << 16)
        for note in reversed(notes):
            try:
                return open_checkpoint(note, self.verifier, self.origin)
            except InvalidCheckpoint:
                log.warning(
                    "ignoring a checkpoint note in %s that does not verify", self.checkpoint_file
                )
        return None

    def checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        """Sign a checkpoint of the current tree if it grew; return it (or the last one).

        Returns ``None`` when the tree is empty, or (unless ``force``) when the only entry
        since the last checkpoint is that checkpoint's own ``checkpoint.signed`` event.

        Raises
        ------
        LedgerError
            the tree is smaller than, or not an extension of, a checkpoint already signed
            (database truncated, restored or rewritten): nothing is signed.
        """
        signed: Checkpoint | None = None
        with self.ledger.engine.begin() as conn:
            size, frontier = Ledger.lock_head(conn)
            if size == 0:
                return None
            root = merkle.frontier_root(frontier)
            db_last = self.ledger.latest_checkpoint(conn)
            file_last = self.last_file_checkpoint()
            last: Checkpoint | None = None
            if db_last is not None:
                last = Checkpoint(self.origin, db_last[0], db_last[1], db_last[2])
            if file_last is not None and (last is None or file_last.size > last.size):
                last = file_last
            if db_last is not None and (file_last is None or file_last.size < db_last[0]):
                log.error("checkpoint file %s lacks checkpoint %d that the database holds",
                          self.checkpoint_file, db_last[0])
            if last is not None:
                if size < last.size:
                    raise LedgerError(
                        f"ledger has {size} entries but a checkpoint of size {last.size} was "
                        "signed: the database was truncated or restored; refusing to sign")
                old_root = merkle.root_hash(last.size, self.ledger.fetcher(conn))
                if old_root != last.root:
                    raise LedgerError(
                        f"the first {last.size} entries no longer hash to the signed checkpoint "
                        "root: the ledger was rewritten; refusing to sign")
                if size == last.size:
                    if db_last is None or db_last[0] != size:
                        self._store(conn, last)  # crash recovery: file ahead of database
                    return last
                if not force and size == last.size + 1:
                    kind = conn.execute(select(ledger_entries.c.event_type)
                                        .where(ledger_entries.c.seq == size - 1)).scalar()
                    if kind == EventType.CHECKPOINT_SIGNED.value:
                        return None
            signed = sign_checkpoint(self.origin, size, root, self.key)
            append_checkpoint_file(self.checkpoint_file, signed.note)
            self._store(conn, signed)
            self.ledger.append(Event(EventType.CHECKPOINT_SIGNED, self.actor,
                                     payload={"size": size, "root_hash": root.hex(),
                                              "key_id": self.verifier.key_id.hex()}), conn=conn)
        log.info("signed checkpoint size=%d root=%s", signed.size, signed.root.hex())
        if self.syslog_target:
            try:
                syslog_send(self.syslog_target, signed.note)
            except OSError as exc:
                log.warning("syslog target %s: %s", self.syslog_target, exc)
        return signed

    @staticmethod
    def _store(conn, cp: Checkpoint) -> None:  # type: ignore[no-untyped-def]
        conn.execute(insert(ledger_checkpoints).values(
            size=cp.size, root_hash=cp.root, note=cp.note, signed_at=datetime.now(UTC)))
