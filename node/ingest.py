"""Durable ingest of one received object, shared by the DIMSE C-STORE SCP and STOW-RS.

Order (design.md section 4, durability contract)::

    check encoding + keys -> temp file -> fsync -> rename -> fsync(dir)
        -> ONE transaction { index rows + ledger entry } -> success

Only after that transaction commits does the caller answer success. Bad input raises
:class:`IngestError` with a :class:`RejectReason` after a ``instance.rejected`` ledger
entry; the transport maps the reason to its status (DIMSE: ``node.dimse.store``; HTTP:
the DICOMweb layer) at exactly one boundary each.

What is stored is exactly what was sent: the data set bytes in the negotiated transfer
syntax, behind a File Meta Information header built here (PS3.10 7.1). The file meta
holds no sender-specific value, so an identical re-send gives an identical file (same
SHA-256) and is recognised as such.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from io import BytesIO
from typing import Any

import pydicom
from pydicom import __version_info__ as _PYDICOM_VERSION
from pydicom.datadict import dictionary_VR as dictionary_vr, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.filereader import read_dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPIPHTJ2KReferencedDeflate,
)
from sqlalchemy.exc import IntegrityError

from audit.events import Event, EventType, Outcome
from config.sections.dimse import DuplicatePolicy
from node.context import NodeContext
from storage.filestore import OutOfSpaceError, StoreError, instance_rel_path
from storage.index import InstanceRecord

logger = logging.getLogger(__name__)

__all__ = [
    "EncodingError",
    "IngestError",
    "IngestOutcome",
    "Ingestor",
    "RejectReason",
    "StoredInstance",
    "build_part10",
    "check_encoding",
    "split_part10",
]

PREAMBLE = b"\x00" * 128 + b"DICM"
_DEFLATED = {DeflatedExplicitVRLittleEndian, JPIPHTJ2KReferencedDeflate}
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2, Table 7.1-1)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 64
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel / Float / Double Float Pixel Data


class RejectReason(str, Enum):
    """Why an object was not stored (the transport maps each to a status)."""

    UNPARSEABLE = "unparseable"  # encoding broken or truncated
    MISSING_ATTRIBUTE = "missing_attribute"  # a Type 1 key of every storage IOD is absent
    SOP_CLASS_MISMATCH = "sop_class_mismatch"  # data set contradicts its SOP class
    DUPLICATE_CONFLICT = "duplicate_conflict"  # same SOP Instance UID, other content
    OUT_OF_SPACE = "out_of_space"
    STORE_FAILED = "store_failed"  # file system or index error


class IngestOutcome(str, Enum):
    STORED = "stored"
    IDENTICAL_DUPLICATE = "identical_duplicate"  # stored once, success again
    REPLACED = "replaced"  # duplicate_policy = replace
    KEPT_FIRST = "kept_first"  # duplicate_policy = keep_first: the new object discarded


class IngestError(Exception):
    """The object was refused. ``comment`` is safe to send to the peer (no PHI)."""

    def __init__(self, reason: RejectReason, comment: str):
        super().__init__(f"{reason.value}: {comment}")
        self.reason = reason
        self.comment = comment


class EncodingError(ValueError):
    """The data set is not a well-formed encoding in its transfer syntax."""


@dataclass(frozen=True)
class StoredInstance:
    """What ``on_instance_stored`` hooks and callers learn about an ingested object."""

    outcome: IngestOutcome
    record: InstanceRecord
    ledger_entry: Any = None  # audit.ledger.LedgerEntry (seq, leaf_hash)

    @property
    def sop_instance_uid(self) -> str:
        return self.record.sop_instance_uid

    @property
    def study_instance_uid(self) -> str:
        return self.record.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.record.series_instance_uid


# -- encoding check ---------------------------------------------------------------------
def _walk(buf: memoryview, pos: int, end: int, implicit: bool, little: bool, depth: int,
          until_item_end: bool, top_tags: list[tuple[int, int]] | None) -> int:
    """Walk data elements from ``pos``; return the position after the last one (or after
    the item delimiter when ``until_item_end``). Raises EncodingError on any structural
    problem. PS3.5 7.1 (data element encoding), 7.5 (nesting of data sets)."""
    if depth > _MAX_DEPTH:
        raise EncodingError("sequences nested too deeply")
    u16 = "<H" if little else ">H"
    u32 = "<I" if little else ">I"
    last_tag = -1
    while pos < end:
        if pos + 8 > end:
            raise EncodingError(f"truncated element header at byte {pos}")
        group, elem = struct.unpack_from(u16, buf, pos)[0], struct.unpack_from(u16, buf, pos + 2)[0]
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            if not until_item_end:
                raise EncodingError(f"unexpected item delimiter at byte {pos}")
            return pos + 8
        if group == 0xFFFE:
            raise EncodingError(f"unexpected item tag at byte {pos}")
        if top_tags is not None:
            if tag <= last_tag:
                raise EncodingError(f"data elements out of order at byte {pos} (PS3.5 7.1)")
            top_tags.append((tag, pos))
        last_tag = tag
        if implicit:
            vr = b""
            length = struct.unpack_from(u32, buf, pos + 4)[0]
            pos += 8
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise EncodingError(f"invalid VR at byte {pos + 4}")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise EncodingError(f"truncated element header at byte {pos}")
                length = struct.unpack_from(u32, buf, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from(u16, buf, pos + 6)[0]
                pos += 8
        if length == _UNDEFINED:
            # sequence, UN-encoded sequence (implicit LE inside, PS3.5 6.2.2) or
            # encapsulated pixel data (PS3.5 A.4): items until the sequence delimiter
            inner_implicit = implicit or vr == b"UN"
            inner_little = little if vr != b"UN" else True
            pos = _walk_items(buf, pos, end, inner_implicit, inner_little, depth + 1)
            continue
        if pos + length > end:
            raise EncodingError(
                f"value of ({group:04X},{elem:04X}) runs past the end: truncated data set")
        pos += length
    if until_item_end:
        raise EncodingError("item without delimiter: truncated data set")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, little: bool,
                depth: int) -> int:
    u32 = "<I" if little else ">I"
    u16 = "<H" if little else ">H"
    while True:
        if pos + 8 > end:
            raise EncodingError("sequence without delimiter: truncated data set")
        group, elem = struct.unpack_from(u16, buf, pos)[0], struct.unpack_from(u16, buf, pos + 2)[0]
        tag = (group << 16) | elem
        length = struct.unpack_from(u32, buf, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise EncodingError(f"expected an item tag at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, implicit, little, depth + 1, True, None)
        else:
            if pos + length > end:
                raise EncodingError("item runs past the end: truncated data set")
            pos += length


@dataclass(frozen=True)
class Encoding:
    """Result of :func:`check_encoding`."""

    tags: dict[int, int]  # top-level tag -> byte offset of its element in ``plain``
    plain: bytes  # the encoding walked (inflated for deflated transfer syntaxes)
    implicit_vr: bool
    little_endian: bool

    def header_end(self) -> int:
        """Offset of the first top-level pixel data element (or the end): every index
        attribute lies before it."""
        offs = [o for t, o in self.tags.items() if t in _PIXEL_TAGS]
        return min(offs) if offs else len(self.plain)


def check_encoding(dataset: bytes, transfer_syntax: str) -> Encoding:
    """Check that ``dataset`` is a complete, well-formed data set encoding.

    Parameters
    ----------
    dataset : bytes
        Data set bytes as sent (no file meta), in ``transfer_syntax``.
    transfer_syntax : str
        The negotiated transfer syntax UID.

    Returns
    -------
    Encoding
        Top-level tags with their offsets, and the walked (plain) encoding.

    Raises
    ------
    EncodingError
        Truncation, a broken header, an invalid VR, unterminated sequences, or top-level
        elements out of ascending tag order (PS3.5 7.1, 7.5; A.4 for encapsulation).
    """
    ts = UID(transfer_syntax)
    plain = dataset
    if ts in _DEFLATED:
        try:  # PS3.5 A.5: raw deflate (RFC 1951) of the explicit VR LE encoding
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            plain = d.decompress(dataset) + d.flush()
        except zlib.error as exc:
            raise EncodingError(f"deflated data set does not inflate: {exc}") from None
        implicit, little = False, True
    else:
        implicit = ts == ImplicitVRLittleEndian
        little = ts != ExplicitVRBigEndian
    if not plain:
        raise EncodingError("empty data set")
    tags: list[tuple[int, int]] = []
    _walk(memoryview(plain), 0, len(plain), implicit, little, 0, False, tags)
    return Encoding(dict(tags), plain, implicit, little)


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    b = uid.strip().rstrip("\x00").encode("ascii", "replace")
    return b + b"\x00" if len(b) % 2 else b  # UI pads with NULL (PS3.5 6.2)


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """File Meta Information (PS3.10 7.1), explicit VR little endian, group length first.

    Only the required elements and pydicom's implementation identity (the stored bytes
    must not depend on who sent the object). Encoded directly: this runs per instance.
    """
    version = f"PYDICOM {'.'.join(_PYDICOM_VERSION)}".encode()
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
        _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _ui(transfer_syntax)),
        _meta_element(0x0012, b"UI", _ui(PYDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", version),
    ))
    return _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def build_part10(dataset: bytes, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax: str) -> bytes:
    """A DICOM file (PS3.10 7.1): preamble, 'DICM', File Meta Information, data set bytes."""
    return b"".join((PREAMBLE, file_meta_bytes(sop_class_uid, sop_instance_uid,
                                               transfer_syntax), dataset))


def split_part10(data: bytes) -> tuple[Dataset, bytes]:
    """Split a DICOM file into its File Meta Information and the data set bytes.

    PS3.10 7.1: 128-byte preamble, 'DICM', group 0002 in explicit VR little endian led by
    File Meta Information Group Length (0002,0000) UL.
    """
    if len(data) < 144 or data[128:132] != b"DICM":
        raise EncodingError("not a DICOM file: no 'DICM' prefix (PS3.10 7.1)")
    if data[132:138] != b"\x02\x00\x00\x00UL" or struct.unpack_from("<H", data, 138)[0] != 4:
        raise EncodingError("file meta does not start with (0002,0000) UL")
    end = 144 + struct.unpack_from("<I", data, 140)[0]
    if end > len(data):
        raise EncodingError("file meta runs past the end")
    meta = pydicom.filereader.read_dataset(BytesIO(data[132:end]), is_implicit_VR=False,
                                           is_little_endian=True)
    return meta, data[end:]


_INDEX_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "Modality", "SeriesNumber", "SeriesDescription",
    "BodyPartExamined", "SeriesDate", "SeriesTime", "FrameOfReferenceUID",
    "InstanceNumber", "NumberOfFrames", "Rows", "Columns", "BitsAllocated",
    "ContentDate", "ContentTime", "SyntheticData",
]


_INDEX_TAG_INTS = [Tag(tag_for_keyword(k)) for k in _INDEX_TAGS]


_ASCII_VRS = {"UI", "DA", "TM", "DT", "CS", "IS", "DS", "AS", "AE"}  # PS3.5 6.2: default repertoire
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UC", "UT"}  # affected by Specific Character Set
_DEFAULT_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"}


def _raw_value(ds: Dataset, keyword: str) -> tuple[str, bytes] | None:
    """(VR, raw bytes) of a not-yet-converted element, or None."""
    tag = Tag(tag_for_keyword(keyword))
    elem = ds._dict.get(tag)  # noqa: SLF001 - raw access avoids per-element conversion
    if elem is None or not hasattr(elem, "value") or not isinstance(elem.value, bytes):
        return None
    vr = elem.VR or dictionary_vr(tag)
    return str(vr), elem.value


def _text(ds: Dataset, keyword: str) -> str | None:
    """A string value for the index (multi-valued as received, with backslashes).

    Values of the default repertoire are decoded directly from the raw bytes; text VRs go
    through pydicom unless the character set is ASCII / Latin-1 / UTF-8 (PS3.5 6.1)."""
    raw = _raw_value(ds, keyword)
    try:
        if raw is not None and raw[0] in _ASCII_VRS:
            v: Any = raw[1].decode("ascii", "replace")
        elif raw is not None and raw[0] in _TEXT_VRS and _charset(ds) in _DEFAULT_CHARSETS:
            v = raw[1].decode("utf-8" if _charset(ds) == "ISO_IR 192" else "latin-1")
        else:
            v = ds.get(keyword)
    except Exception:  # undecodable value: index it as absent
        return None
    if v is None:
        return None
    s = str(v).strip().rstrip("\x00").strip()
    return s or None


def _charset(ds: Dataset) -> str:
    raw = _raw_value(ds, "SpecificCharacterSet")
    if raw is None:
        return "" if "SpecificCharacterSet" not in ds else "?"
    return raw[1].decode("ascii", "replace").strip(" \x00")


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        raw = _raw_value(ds, keyword)
        if raw is not None and raw[0] == "US" and len(raw[1]) >= 2:
            little = ds.original_encoding[1] is not False
            return int(struct.unpack("<H" if little else ">H", raw[1][:2])[0])
        if raw is not None and raw[0] == "IS":
            t = _text(ds, keyword)
            return None if t is None else int(t.split("\\")[0])
        v = ds.get(keyword)
        return None if v is None or v == "" else int(v)
    except Exception:
        return None


# -- ingest -----------------------------------------------------------------------------
class _Pending:
    __slots__ = ("rec", "event", "finished", "entry", "error")

    def __init__(self, rec: InstanceRecord, event: Event):
        self.rec, self.event = rec, event
        self.finished = False
        self.entry: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Commits new instances' index rows + ledger entries, several per transaction when
    they arrive together (group commit).

    A caller whose instance is queued while another caller's transaction is running waits;
    when that transaction ends, one waiting caller commits everything queued meanwhile in
    ONE transaction (one WAL fsync, one ``Ledger.append_many``), and every caller returns
    only after the transaction holding its instance has committed. A lone caller commits
    at once, alone: no added latency. If a batch fails, its instances are retried one
    transaction each, so one bad instance cannot fail the others.
    """

    def __init__(self, ctx: NodeContext, max_batch: int = 64):
        self.ctx = ctx
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leader = False

    def commit(self, rec: InstanceRecord, event: Event) -> Any:
        """Index ``rec`` and append ``event`` durably; returns the ledger entry. Raises
        what the transaction raised (IntegrityError for a duplicate SOP Instance UID)."""
        p = _Pending(rec, event)
        with self._cond:
            self._queue.append(p)
            while True:
                if p.finished:
                    break
                if not self._leader:
                    self._leader = True
                    batch = self._queue[:self.max_batch]
                    del self._queue[:self.max_batch]
                    break
                self._cond.wait()
        if not p.finished:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._leader = False
                    self._cond.notify_all()
        if p.error is not None:
            raise p.error
        return p.entry

    def _one(self, items: list[_Pending]) -> None:
        ctx = self.ctx
        with ctx.engine.begin() as conn:
            for it in items:
                ctx.index.add_instance(conn, it.rec)
            entries = ctx.ledger.append_many([it.event for it in items], conn=conn)
        for it, e in zip(items, entries):
            it.entry = e

    def _run(self, batch: list[_Pending]) -> None:
        try:
            self._one(batch)
        except Exception as exc:
            self.ctx.index.clear_cache()
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for it in batch:
                    try:
                        self._one([it])
                    except Exception as one_exc:
                        self.ctx.index.clear_cache()
                        it.error = one_exc
        finally:
            for it in batch:
                it.finished = True


class Ingestor:
    """Durable ingest on a :class:`~node.context.NodeContext` (thread-safe)."""

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        self._commits = GroupCommit(ctx)

    # public API -------------------------------------------------------------------
    def ingest_dataset(self, dataset: bytes, transfer_syntax: str, *,
                       sop_class_uid: str | None = None, sop_instance_uid: str | None = None,
                       calling_ae: str | None = None, called_ae: str | None = None,
                       peer: str | None = None, source: str = "dimse") -> StoredInstance:
        """Ingest one data set as sent (no file meta) in ``transfer_syntax``.

        ``sop_class_uid`` / ``sop_instance_uid`` are the Affected SOP Class / Instance
        UIDs of the C-STORE request; the data set must agree with them (PS3.4 B.2.1.1).

        Raises
        ------
        IngestError
            After recording ``instance.rejected`` in the ledger.
        """
        actor = f"ae:{calling_ae}" if calling_ae else f"component:{source}"
        ctx_info = {"calling_ae": calling_ae, "called_ae": called_ae, "peer": peer,
                    "source": source, "transfer_syntax_uid": str(transfer_syntax),
                    "sop_class_uid": sop_class_uid, "sop_instance_uid": sop_instance_uid}
        try:
            return self._ingest(dataset, str(transfer_syntax), sop_class_uid,
                                sop_instance_uid, calling_ae, called_ae, source, actor)
        except IngestError as exc:
            self._record_rejection(exc, actor, ctx_info, len(dataset))
            raise

    def ingest_part10(self, data: bytes, *, calling_ae: str | None = None,
                      called_ae: str | None = None, peer: str | None = None,
                      source: str = "stow") -> StoredInstance:
        """Ingest a DICOM file (PS3.10) as received over HTTP (STOW-RS): the data set
        bytes after the file meta are stored unchanged."""
        try:
            meta, body = split_part10(data)
            ts = meta.get("TransferSyntaxUID")
            if not ts:
                raise EncodingError("file meta has no Transfer Syntax UID")
            sop_class = meta.get("MediaStorageSOPClassUID")
            sop_inst = meta.get("MediaStorageSOPInstanceUID")
        except Exception as exc:
            err = IngestError(RejectReason.UNPARSEABLE, f"cannot read file meta: {exc}"[:64])
            self._record_rejection(err, f"component:{source}",
                                   {"source": source, "calling_ae": calling_ae}, len(data))
            raise err from None
        return self.ingest_dataset(body, str(ts), sop_class_uid=sop_class,
                                   sop_instance_uid=sop_inst, calling_ae=calling_ae,
                                   called_ae=called_ae, peer=peer, source=source)

    # internals ----------------------------------------------------------------------
    def _record_rejection(self, exc: IngestError, actor: str, info: dict[str, Any],
                          size: int) -> None:
        # subject keys as in the ledger vocabulary (audit.events): sop_uid, sop_class_uid
        subject = {"sop_uid": info.get("sop_instance_uid"),
                   "sop_class_uid": info.get("sop_class_uid")}
        subject = {k: str(v) for k, v in subject.items() if v}
        payload = {k: v for k, v in info.items()
                   if v is not None and k not in ("sop_instance_uid", "sop_class_uid")}
        payload.update(reason=exc.reason.value, detail=exc.comment, size=size)
        outcome = (Outcome.SERIOUS_FAILURE if exc.reason in
                   (RejectReason.OUT_OF_SPACE, RejectReason.STORE_FAILED)
                   else Outcome.MINOR_FAILURE)
        logger.warning("instance rejected (%s): %s", exc.reason.value, exc.comment)
        try:
            self.ctx.ledger.append(Event(type=EventType.INSTANCE_REJECTED, actor=actor,
                                         outcome=outcome, subject=subject, payload=payload))
        except Exception:
            logger.exception("could not record the rejection in the ledger")

    def _parse(self, dataset: bytes, ts: str, sop_class_uid: str | None,
               sop_instance_uid: str | None) -> tuple[Dataset, bytes]:
        try:
            enc = check_encoding(dataset, ts)
        except EncodingError as exc:
            raise IngestError(RejectReason.UNPARSEABLE, str(exc)[:64]) from None
        # decode only what precedes the pixel data: every index attribute is there
        try:
            probe = read_dataset(BytesIO(enc.plain[:enc.header_end()]),
                                 is_implicit_VR=enc.implicit_vr,
                                 is_little_endian=enc.little_endian,
                                 specific_tags=_INDEX_TAG_INTS)
        except Exception as exc:
            raise IngestError(RejectReason.UNPARSEABLE, f"cannot decode: {exc}"[:64]) from None
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not _text(probe, kw):
                raise IngestError(RejectReason.MISSING_ATTRIBUTE, f"{kw} missing or empty")
        ds_class, ds_inst = _text(probe, "SOPClassUID"), _text(probe, "SOPInstanceUID")
        if sop_class_uid and ds_class != sop_class_uid.strip():
            raise IngestError(RejectReason.SOP_CLASS_MISMATCH,
                              "SOP Class UID differs from the request's")
        if sop_instance_uid and ds_inst != sop_instance_uid.strip():
            raise IngestError(RejectReason.SOP_CLASS_MISMATCH,
                              "SOP Instance UID differs from the request's")
        cls_name = UID(ds_class or "").name
        if cls_name.endswith("Image Storage") and not cls_name.startswith("Retired"):
            # every image IOD has the Image Pixel module with Pixel Data Type 1C/1 (PS3.3)
            if not enc.tags.keys() & _PIXEL_TAGS:
                raise IngestError(RejectReason.SOP_CLASS_MISMATCH,
                                  "image SOP class without pixel data")
        return probe, build_part10(dataset, ds_class or "", ds_inst or "", ts)

    def _record(self, probe: Dataset, ts: str, rel_path: str, size: int, sha: str,
                calling_ae: str | None, called_ae: str | None, source: str) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=_text(probe, "SOPInstanceUID") or "",
            sop_class_uid=_text(probe, "SOPClassUID") or "",
            series_instance_uid=_text(probe, "SeriesInstanceUID") or "",
            study_instance_uid=_text(probe, "StudyInstanceUID") or "",
            transfer_syntax_uid=ts, file_path=rel_path, file_size=size, sha256=sha,
            received_at=datetime.now(timezone.utc), calling_ae=calling_ae,
            called_ae=called_ae, source=source,
            patient_id=_text(probe, "PatientID") or "",
            issuer_of_patient_id=_text(probe, "IssuerOfPatientID") or "",
            patient_name=_text(probe, "PatientName"),
            patient_birth_date=_text(probe, "PatientBirthDate"),
            patient_sex=_text(probe, "PatientSex"),
            study_date=_text(probe, "StudyDate"), study_time=_text(probe, "StudyTime"),
            accession_number=_text(probe, "AccessionNumber"),
            study_id=_text(probe, "StudyID"),
            study_description=_text(probe, "StudyDescription"),
            referring_physician_name=_text(probe, "ReferringPhysicianName"),
            modality=_text(probe, "Modality"), series_number=_int(probe, "SeriesNumber"),
            series_description=_text(probe, "SeriesDescription"),
            body_part_examined=_text(probe, "BodyPartExamined"),
            series_date=_text(probe, "SeriesDate"), series_time=_text(probe, "SeriesTime"),
            frame_of_reference_uid=_text(probe, "FrameOfReferenceUID"),
            instance_number=_int(probe, "InstanceNumber"),
            number_of_frames=_int(probe, "NumberOfFrames"),
            rows=_int(probe, "Rows"), columns=_int(probe, "Columns"),
            bits_allocated=_int(probe, "BitsAllocated"),
            content_date=_text(probe, "ContentDate"), content_time=_text(probe, "ContentTime"),
            synthetic_data=_text(probe, "SyntheticData"),
        )

    def _received_event(self, rec: InstanceRecord, actor: str, outcome: IngestOutcome) -> Event:
        return Event(
            type=EventType.INSTANCE_RECEIVED, actor=actor,
            subject={"study_uid": rec.study_instance_uid, "series_uid": rec.series_instance_uid,
                     "sop_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid},
            payload={"sha256": rec.sha256, "size": rec.file_size,
                     "transfer_syntax_uid": rec.transfer_syntax_uid, "file": rec.file_path,
                     "calling_ae": rec.calling_ae, "called_ae": rec.called_ae,
                     "source": rec.source, "result": outcome.value},
        )

    def _ingest(self, dataset: bytes, ts: str, sop_class_uid: str | None,
                sop_instance_uid: str | None, calling_ae: str | None, called_ae: str | None,
                source: str, actor: str) -> StoredInstance:
        ctx = self.ctx
        probe, part10 = self._parse(dataset, ts, sop_class_uid, sop_instance_uid)
        sha = hashlib.sha256(part10).hexdigest()
        study = _text(probe, "StudyInstanceUID") or ""
        series = _text(probe, "SeriesInstanceUID") or ""
        sop = _text(probe, "SOPInstanceUID") or ""
        rel = instance_rel_path(study, series, sop, sha)
        rec = self._record(probe, ts, rel, len(part10), sha, calling_ae, called_ae, source)
        policy = ctx.settings.dimse.duplicate_policy
        for attempt in range(4):
            # optimistic first attempt: a new SOP Instance (the common case) costs no
            # lookup; a duplicate shows up as an IntegrityError and is decided on retry
            existing = ctx.index.get_instance(sop) if attempt else None
            if existing is not None and existing.sha256 == sha:
                if not ctx.store.exists(existing.file_path):  # heal a lost file
                    self._write(existing.file_path, part10)
                entry = ctx.ledger.append(
                    self._received_event(rec, actor, IngestOutcome.IDENTICAL_DUPLICATE))
                return StoredInstance(IngestOutcome.IDENTICAL_DUPLICATE, rec, entry)
            if existing is not None and policy == DuplicatePolicy.REJECT:
                raise IngestError(RejectReason.DUPLICATE_CONFLICT,
                                  "SOP Instance UID stored with other content")
            if existing is not None and policy == DuplicatePolicy.KEEP_FIRST:
                self._record_rejection(
                    IngestError(RejectReason.DUPLICATE_CONFLICT, "kept the stored copy"),
                    actor, {"sop_instance_uid": sop, "sop_class_uid": rec.sop_class_uid,
                            "calling_ae": calling_ae, "policy": policy.value,
                            "received_sha256": sha}, len(part10))
                return StoredInstance(IngestOutcome.KEPT_FIRST, rec, None)
            self._write(rel, part10)
            try:
                if existing is None:
                    outcome, old_path = IngestOutcome.STORED, None
                    entry = self._commits.commit(
                        rec, self._received_event(rec, actor, outcome))
                else:
                    with ctx.engine.begin() as conn:
                        _, old_path = ctx.index.replace_instance(conn, rec)
                        outcome = IngestOutcome.REPLACED
                        entry = ctx.ledger.append(self._received_event(rec, actor, outcome),
                                                  conn=conn)
            except IntegrityError:
                # another association indexed this SOP Instance UID meanwhile: decide again
                # (the file just written stays only if it is the one now indexed)
                ctx.index.clear_cache()
                self._forget(rel)
                continue
            except Exception as exc:
                logger.exception("index/ledger commit failed")
                ctx.index.clear_cache()
                self._forget(rel)
                raise IngestError(RejectReason.STORE_FAILED,
                                  f"index commit failed: {type(exc).__name__}") from None
            if old_path and old_path != rel:
                try:
                    ctx.store.delete(old_path)
                except Exception:
                    logger.exception("could not remove replaced file %s", old_path)
            info = StoredInstance(outcome, rec, entry)
            ctx.run_stored_hooks(info)
            return info
        raise IngestError(RejectReason.STORE_FAILED, "concurrent writers kept conflicting")

    def _write(self, rel: str, part10: bytes) -> None:
        try:
            self.ctx.store.write(rel, part10)
        except OutOfSpaceError as exc:
            raise IngestError(RejectReason.OUT_OF_SPACE, str(exc)[:64]) from None
        except StoreError as exc:
            logger.error("file store write failed: %s", exc)
            raise IngestError(RejectReason.STORE_FAILED, "file store write failed") from None

    def _forget(self, rel: str) -> None:
        """Remove a file written for a transaction that did not commit, unless the index
        references it (an identical object indexed by a concurrent association)."""
        try:
            if not self.ctx.index.references(rel):
                self.ctx.store.delete(rel)
        except Exception:
            logger.exception("could not clean up %s", rel)

