"""Keyed digests of patient identifiers: how the ledger refers to a patient without PHI.

A ledger entry that concerns a patient carries ``subject.patient`` (digest of Patient ID
(0010,0020) with Issuer of Patient ID (0010,0021)) and ``subject.accession`` (digest of
Accession Number (0008,0050)); an entry covering several patients lists them in
``payload.patients``. A digest is ``hmac-sha256:`` + the hex HMAC-SHA-256 (RFC 2104) of a
domain-separated value under a ledger-local 256-bit key::

    HMAC(key, "patient" 0x00 issuer 0x00 patient_id)      (values without DICOM padding)
    HMAC(key, "accession" 0x00 accession_number)

Without the key a digest reveals nothing (no dictionary attack on short hospital IDs, which
a plain SHA-256 would allow); with it, the node or an auditor holding a copy of the key
finds every entry of a patient through the ledger's UID index (``synthnode audit patient``).
The key is created on the node's first start beside the ledger signing key, mode 0600
(``[audit] patient_key_file``); keep a copy with the signing key's public half: without it
the digests can no longer be matched to a Patient ID.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = [
    "DIGEST_PREFIX", "PatientDigester", "load_or_create_patient_key", "patient_report",
    "read_patient_key",
]

DIGEST_PREFIX = "hmac-sha256:"
KEY_BYTES = 32
_HEADER = "synthnode patient digest key v1\n"


def load_or_create_patient_key(path: Path) -> bytes:
    """The 32-byte HMAC key at ``path``; created (O_EXCL, mode 0600, fsync) when missing.

    Raises
    ------
    ValueError
        if the file is readable by group or others, or is not a key written here.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: read theirs
            return load_or_create_patient_key(path)
        try:
            os.write(fd, (_HEADER + key.hex() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return key
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"patient digest key {path} has mode {mode:o}; it must be 0600")
    lines = path.read_text(encoding="ascii").splitlines()
    if len(lines) != 2 or lines[0] + "\n" != _HEADER or len(lines[1]) != 2 * KEY_BYTES:
        raise ValueError(f"{path} is not a synthnode patient digest key")
    return bytes.fromhex(lines[1])


def _clean(value: str | None) -> str:
    """DICOM LO / SH values without their padding (PS3.5 6.2: leading and trailing spaces
    are not significant)."""
    return (value or "").strip(" \x00")


class PatientDigester:
    """Digests under one key (see the module docs)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a patient digest key has {KEY_BYTES} bytes")
        self._key = key

    @property
    def key_id(self) -> str:
        """First 16 hex digits of SHA-256 of the key: names the key without revealing it."""
        return hashlib.sha256(b"synthnode patient key id\x00" + self._key).hexdigest()[:16]

    def _mac(self, *parts: str) -> str:
        msg = "\x00".join(parts).encode("utf-8")
        return DIGEST_PREFIX + hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def patient(self, patient_id: str | None, issuer: str | None = "") -> str | None:
        """Digest of a Patient ID with its issuer (None for an empty Patient ID)."""
        pid = _clean(patient_id)
        return self._mac("patient", _clean(issuer), pid) if pid else None

    def accession(self, accession_number: str | None) -> str | None:
        """Digest of an Accession Number (None when empty)."""
        acc = _clean(accession_number)
        return self._mac("accession", acc) if acc else None

    def subject(self, patient_id: str | None, issuer: str | None,
                accession_number: str | None) -> dict[str, str]:
        """The ``patient`` / ``accession`` subject keys of a ledger event (empty values
        left out)."""
        out = {"patient": self.patient(patient_id, issuer),
               "accession": self.accession(accession_number)}
        return {k: v for k, v in out.items() if v}


def read_patient_key(path: Path) -> PatientDigester:
    """A digester from an existing key file (an auditor's copy, or the node's).

    Raises
    ------
    FileNotFoundError, ValueError
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no patient digest key at {path} (the node creates it on its "
                                "first start; an auditor needs a copy of that file)")
    return PatientDigester(load_or_create_patient_key(path))


# -- the patient report ------------------------------------------------------------------
#: Entries that show someone reading or receiving a patient's data (besides the lineage).
ACCESS_TYPES = {"query", "retrieve", "dicomweb.access", "storage.commitment", "audit.queried"}


def patient_report(ledger: Any, digests: list[str]) -> dict[str, Any]:
    """Everything the ledger holds about the patient(s) behind ``digests``.

    Entries carrying a digest (``subject.patient`` / ``subject.accession`` /
    ``payload.patients``) name the patient's studies; each study's lineage
    (:func:`audit.export.lineage`: received series -> engine jobs (task, model, version,
    weights digest) -> synthetic series -> destinations and deliveries, and C-GET / C-MOVE /
    WADO retrievals of every series) is built from there, so events that name only a study
    UID (a DICOMweb access, entries older than the digests) count too.

    Returns ``{"digests", "studies": [{"study_uid", "lineage"}], "accesses": [...],
    "rejected": [...], "entries": [seq, ...]}``; ``accesses`` are queries, retrievals,
    storage commitments and audit searches not already shown in a lineage.
    """
    from audit.export import event_json, lineage, retrieval_item

    direct = ledger.query(uids=list(digests)) if digests else []
    studies = list(dict.fromkeys(
        str(e.event.subject["study_uid"]) for e in direct if e.event.subject.get("study_uid")))
    trees = [lineage(ledger, s) for s in studies]
    shown: set[int] = set()
    for t in trees:
        shown.update(r["seq"] for r in t.get("other_retrievals") or [])
        for home in (*t["sources"], *(o for j in t["jobs"] for o in j["outputs"])):
            shown.update(r["seq"] for r in home.get("retrievals") or [])
    around = ledger.query(uids=studies) if studies else []
    entries = {e.seq: e for e in (*direct, *around)}
    all_seqs = set(entries) | {s for t in trees for s in t["entries"]}
    accesses, rejected = [], []
    for seq in sorted(entries):
        e = entries[seq]
        kind = e.event.type.value
        if kind in ACCESS_TYPES and seq not in shown:
            item = retrieval_item(e)
            for k in ("matches", "keys", "query", "entries", "committed", "requested"):
                if k in e.event.payload:
                    item[k] = e.event.payload[k]
            accesses.append(item)
        elif kind == "instance.rejected":
            j = event_json(e)
            rejected.append({"seq": seq, "time": j["time"], "actor": j["actor"],
                             "reason": j["payload"].get("reason"),
                             "detail": j["payload"].get("detail"),
                             "sop_uid": j["subject"].get("sop_uid")})
    return {"digests": list(digests),
            "studies": [{"study_uid": s, "lineage": t}
                        for s, t in zip(studies, trees, strict=True)],
            "accesses": accesses, "rejected": rejected, "entries": sorted(all_seqs)}
