"""The ingest validation policy: what an object must be before it is acknowledged.

One policy for every receiving service (C-STORE, STOW-RS, the pipeline's own outputs):
:class:`~node.ingest.ingestor.Ingestor` applies it to every data set before anything is
written. Acknowledge only what can be read back completely and is consistent:

* size limits first, before any work (``[ingest]`` settings): the data set as sent, what
  a deflated data set inflates to, the decoded size the Image Pixel module declares;
* a well-formed encoding in the negotiated transfer syntax (:mod:`node.dicom.encoding`:
  truncation, lengths, nesting, unknown VRs);
* every element value decodes (sequences and items walked, defined or undefined length):
  binary values of a whole number of values, IS / DS values that are numbers;
* the key UIDs (SOP Class / Instance, Study / Series Instance, Frame of Reference) are
  UIDs (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters;
* the data set's SOP Class / Instance UID are the request's (PS3.4 B.2.1.1); an image
  SOP class carries pixel data;
* Pixel Data fits the Image Pixel module and the transfer syntax
  (:mod:`node.dicom.pixeldata`).

Cosmetic deviations that real modalities produce stay accepted: odd-length padding,
over-long strings, retired and private elements, dates in old formats.

The checks against what is already stored (conflicting duplicates, a study or series
filed under another patient) need the index: :func:`check_owners` (the ingestor calls it).
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from node.dicom.encoding import (
    PIXEL_TAGS,
    Encoding,
    EncodingError,
    InflateLimitError,
    check_encoding,
    valid_uid,
)
from node.dicom.pixeldata import ImagePixel, PixelDataError, check_pixel_data
from node.ingest.attributes import text_value
from node.ingest.results import IngestError, RejectReason

__all__ = ["Limits", "Validated", "check_owners", "validate"]

# pydicom warns (and keeps the string) for values it cannot validate; this module decides
# what is refused, so its per-value warnings would only flood the node log
warnings.filterwarnings("ignore", message=r"(Invalid value|The value length)",
                        module=r"pydicom\.")
# ... and its per-value checks (a regular expression per value read) cost about as much
# as the rest of the validation: values are checked here instead
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

_KEY_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
             "FrameOfReferenceUID")
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
           "1.2.840.10008.1.2.1.99"}
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Limits:
    """What one object may cost (``[ingest]`` settings)."""

    max_dataset_bytes: int = 2048 * 1024 * 1024
    max_inflated_bytes: int = 256 * 1024 * 1024
    max_frame_bytes: int = 512 * 1024 * 1024
    max_pixel_bytes: int = 4096 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        s = settings.ingest
        return cls(s.max_dataset_bytes, s.max_inflated_bytes, s.max_frame_bytes,
                   s.max_pixel_bytes)


@dataclass(frozen=True)
class Validated:
    """A data set that passed :func:`validate`."""

    probe: Dataset  # the index attributes (pydicom, unconverted where possible)
    encoding: Encoding


def _fail(reason: RejectReason, comment: str) -> IngestError:
    return IngestError(reason, comment[:64])


# VRs whose value pydicom turns into text without any check that can fail (with the
# reading validation off): nothing to decode ahead of time
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UR", "UT"})
# fixed-size binary VRs: a value is a whole number of these (PS3.5 6.2)
_BINARY_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8,
                "UV": 8}
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})


def _check_number(vr: str, text: str, tag: str) -> None:
    s = text.strip(" \0")
    if not s:
        return
    try:
        f = float(s)
    except ValueError:
        raise _fail(RejectReason.UNPARSEABLE, f"{vr} value of {tag} is not a number") from None
    if vr == "IS" and f != int(f):
        raise _fail(RejectReason.UNPARSEABLE, f"IS value of {tag} not an integer")


def _check_values(ds: Dataset) -> None:
    """Decode every element value, sequences included (raises IngestError).

    Elements still in their raw form are checked on their bytes where that decides the
    same thing pydicom's conversion would (a whole number of binary values; IS / DS
    values that are numbers; text, which converts without a check that can fail), so
    only sequences and what this module does not know are converted."""
    raw_dict = ds._dict  # raw elements as read, not yet converted
    for tag in list(raw_dict.keys()):
        raw = raw_dict[tag]
        vr = getattr(raw, "VR", None)
        if getattr(raw, "is_raw", False) and vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = None
        value = getattr(raw, "value", None) if getattr(raw, "is_raw", False) else None
        if isinstance(value, bytes) and vr is not None:
            if vr in _TEXT_VRS or vr in _BYTES_VRS:
                continue
            size = _BINARY_SIZE.get(vr)
            if size is not None:
                if len(value) % size:
                    raise _fail(RejectReason.UNPARSEABLE,
                                f"({tag.group:04X},{tag.element:04X}): {vr} value of "
                                f"{len(value)} bytes")
                continue
            if vr in ("IS", "DS"):
                tag_s = f"({tag.group:04X},{tag.element:04X})"
                for part in value.decode("latin-1").split("\\"):
                    _check_number(vr, part, tag_s)
                continue
        _check_converted(ds, tag)


def _check_converted(ds: Dataset, tag: Any) -> None:
    """Convert one element (and walk its sequence items) and check its numbers."""
    for elem in _iter_all(ds, [tag]):
        vr = str(elem.VR)
        if vr in ("IS", "DS"):
            tag_s = f"({elem.tag.group:04X},{elem.tag.element:04X})"
            for v in (elem.value if elem.VM > 1 else [elem.value]):
                if v is not None:
                    _check_number(vr, str(v), tag_s)
        elif vr == "SQ":
            for item in elem.value:
                _check_values(item)


def _iter_all(ds: Dataset, tags: Any = None) -> Any:
    """Every element of ``ds`` (or those of ``tags``), converted (raises IngestError).
    Sequence items are walked by the caller."""
    for tag in (list(ds.keys()) if tags is None else tags):
        try:
            elem = ds[tag]
            _ = elem.value  # converts (and so checks) the value
        except Exception as exc:
            raise _fail(RejectReason.UNPARSEABLE,
                        f"({tag.group:04X},{tag.element:04X}): {type(exc).__name__}") from None
        yield elem


def _read(enc: Encoding, start: int, end: int) -> Dataset:
    try:
        return read_dataset(BytesIO(enc.plain[start:end]), is_implicit_VR=enc.implicit_vr,
                            is_little_endian=enc.little_endian)
    except Exception as exc:
        raise _fail(RejectReason.UNPARSEABLE, f"cannot decode: {exc}") from None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    v = ds.get(keyword)
    if v is None or v == "":
        if default is None:
            raise _fail(RejectReason.PIXEL_DATA_MISMATCH,
                        f"Pixel Data without {keyword} (PS3.3 C.7.6.3)")
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise _fail(RejectReason.PIXEL_DATA_MISMATCH, f"{keyword} is not a number") from None


def _pixel_value(enc: Encoding, offset: int, end: int) -> tuple[memoryview, bool]:
    """The value bytes of the element at ``offset`` and whether its length is undefined."""
    buf = memoryview(enc.plain)  # no copy of the pixel data
    u32 = "<I" if enc.little_endian else ">I"
    if enc.implicit_vr:
        length, start = struct.unpack_from(u32, buf, offset + 4)[0], offset + 8
    else:
        length, start = struct.unpack_from(u32, buf, offset + 8)[0], offset + 12
    if length == 0xFFFFFFFF:
        return buf[start:end], True
    return buf[start:start + length], False


def _check_pixels(enc: Encoding, header: Dataset, ts: str, limits: Limits) -> None:
    tags = sorted(enc.tags.items(), key=lambda t: t[1])
    for i, (tag, offset) in enumerate(tags):
        if tag not in PIXEL_TAGS:
            continue
        end = tags[i + 1][1] if i + 1 < len(tags) else len(enc.plain)
        bits = _int(header, "BitsAllocated") if tag == _PIXEL_DATA else (
            32 if tag == 0x7FE00008 else 64)
        px = ImagePixel(rows=_int(header, "Rows"), columns=_int(header, "Columns"),
                        samples_per_pixel=_int(header, "SamplesPerPixel", 1),
                        bits_allocated=bits, frames=_int(header, "NumberOfFrames", 1),
                        photometric=str(header.get("PhotometricInterpretation", "")).strip())
        value, undefined = _pixel_value(enc, offset, end)
        native = ts in _NATIVE or tag != _PIXEL_DATA
        try:
            check_pixel_data(value, encapsulated_length=undefined, ts=ts, native=native,
                             little=enc.little_endian, px=px,
                             max_frame_bytes=limits.max_frame_bytes,
                             max_total_bytes=limits.max_pixel_bytes)
        except PixelDataError as exc:
            reason = {"too_large": RejectReason.TOO_LARGE,
                      "transfer_syntax": RejectReason.TRANSFER_SYNTAX_MISMATCH}.get(
                          exc.kind, RejectReason.PIXEL_DATA_MISMATCH)
            raise _fail(reason, str(exc)) from None


def validate(dataset: bytes, ts: str, limits: Limits, *, sop_class_uid: str | None = None,
             sop_instance_uid: str | None = None) -> Validated:
    """Apply the policy to one data set as sent (no file meta) in transfer syntax ``ts``;
    ``sop_class_uid`` / ``sop_instance_uid``: the request's (C-STORE Affected SOP Class /
    Instance UID, or the STOW part's file meta).

    Raises
    ------
    IngestError
        With the reason and a comment safe to send to the peer (no PHI).
    """
    if len(dataset) > limits.max_dataset_bytes:
        raise _fail(RejectReason.TOO_LARGE, f"data set over {limits.max_dataset_bytes} bytes")
    try:
        enc = check_encoding(dataset, ts, max_inflated=limits.max_inflated_bytes)
    except InflateLimitError as exc:
        raise _fail(RejectReason.TOO_LARGE, str(exc)) from None
    except EncodingError as exc:
        raise _fail(RejectReason.UNPARSEABLE, str(exc)) from None
    header_end = enc.header_end()
    # everything before the pixel data, read once, values unconverted: the index
    # attributes come from it (node.ingest.attributes decodes them), then every value
    # is checked (_check_values)
    probe = header = _read(enc, 0, header_end)
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not text_value(probe, kw):
            raise _fail(RejectReason.MISSING_ATTRIBUTE, f"{kw} missing or empty")
    for kw in _KEY_UIDS:
        v = text_value(probe, kw)
        if v and not valid_uid(v.rstrip("\0 ")):
            raise _fail(RejectReason.INVALID_UID, f"{kw} is not a UID (PS3.5 9.1)")
    ds_class, ds_inst = text_value(probe, "SOPClassUID"), text_value(probe, "SOPInstanceUID")
    if sop_class_uid and ds_class != sop_class_uid.strip():
        raise _fail(RejectReason.SOP_CLASS_MISMATCH, "SOP Class UID differs from the request's")
    if sop_instance_uid and ds_inst != sop_instance_uid.strip():
        raise _fail(RejectReason.SOP_CLASS_MISMATCH,
                    "SOP Instance UID differs from the request's")
    cls_name = UID(ds_class or "").name
    if cls_name.endswith("Image Storage") and not cls_name.startswith("Retired"):
        # every image IOD has the Image Pixel module with Pixel Data Type 1C/1 (PS3.3)
        if not enc.tags.keys() & PIXEL_TAGS:
            raise _fail(RejectReason.SOP_CLASS_MISMATCH, "image SOP class without pixel data")
    _check_values(header)
    tail = [o for t, o in enc.tags.items() if t > max(PIXEL_TAGS)]
    if tail:  # elements after the pixel data (e.g. Data Set Trailing Padding)
        _check_values(_read(enc, min(tail), len(enc.plain)))
    _check_pixels(enc, header, ts, limits)
    return Validated(probe, enc)


def check_owners(index: Any, study_uid: str, series_uid: str, patient_id: str,
                 issuer: str, conn: Any = None) -> None:
    """Refuse an instance that would file itself under another patient's study, or put
    its series under another study (the index files by these keys, PS3.4 C.6.1.1).
    The ingestor checks before writing, and again inside the commit transaction; both
    skip the lookup while this process indexed the same series under the same study and
    patient moments ago (``Index.known_owners``)."""
    known = getattr(index, "known_owners", None)
    if known is not None and known(study_uid, series_uid, patient_id, issuer):
        return
    owner, series_study = index.owners(study_uid, series_uid, conn)
    if owner is not None and owner != ((patient_id or "")[:64], (issuer or "")[:64]):
        raise _fail(RejectReason.PATIENT_CONFLICT,
                    "Study Instance UID is stored under another Patient ID")
    if series_study is not None and series_study != study_uid:
        raise _fail(RejectReason.PATIENT_CONFLICT,
                    "Series Instance UID is stored under another study")
