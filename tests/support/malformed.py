"""A malformed and hostile corpus built from real files, with the expected outcome per file.

:func:`build` writes PS3.10 files (valid file meta in front of the data set bytes to send,
so :func:`tests.support.dimse.scu_store` sends exactly those bytes) for every category an
outside tester tries, plus valid controls made from pydicom's real test files that must
keep being stored. Each :class:`Case` names the refusal reasons it may get (empty: it
must be stored and read back equal).

Every case gets its own SOP Instance / Study / Series UIDs (derived from its name), so
the corpus can be sent to one node in one go; the duplicate and patient-conflict cases
deliberately reuse a control's UIDs and must be sent after the controls.

Used by tests/node/ingest/test_malformed_corpus.py and bench/malformed_corpus.py.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from tests.support.dimse import write_part10

__all__ = ["CONTROL_FILES", "Case", "build"]

_PREFIX = "1.2.826.0.1.3680043.10.1137.20."

#: real test files (pydicom) that must keep being stored: every transfer syntax family,
#: multi-frame, trailing pixel padding, private and retired elements
CONTROL_FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm",
                 "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm", "emri_small.dcm", "SC_rgb_rle.dcm",
                 "MR_small_padded.dcm", "SC_rgb.dcm", "rtdose.dcm", "US1_J2KR.dcm"]


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    path: Path
    sop_instance_uid: str
    reasons: tuple[str, ...]  # acceptable refusal reasons; () = must be stored

    @property
    def must_store(self) -> bool:
        return not self.reasons


def _uid(name: str, level: str) -> str:
    return generate_uid(prefix=_PREFIX, entropy_srcs=[name, level])


def _load(fname: str, name: str) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(fname))
    ds.SOPInstanceUID = _uid(name, "sop")
    ds.StudyInstanceUID = _uid(name, "study")
    ds.SeriesInstanceUID = _uid(name, "series")
    ds.PatientID = f"I20-{name}"[:64]
    return ds


def _encode(ds: Dataset, ts: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = ts != ExplicitVRBigEndian
    fp.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    body = fp.getvalue()
    if ts == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = c.compress(body) + c.flush()
    return body


def _el(group: int, elem: int, vr: bytes, value: bytes, *, long: bool = False,
        length: int | None = None) -> bytes:
    """An explicit VR little endian element (raw, possibly lying about its length)."""
    n = len(value) if length is None else length
    if long or vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH", group, elem) + vr + b"\0\0" + struct.pack("<I", n) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", n & 0xFFFF) + value


def _insert(body: bytes, tag: int, raw: bytes) -> bytes:
    """Insert raw element bytes into an explicit VR LE top-level encoding in tag order."""
    from node.dicom.encoding import check_encoding

    enc = check_encoding(body, ExplicitVRLittleEndian)
    after = [o for t, o in enc.tags.items() if t > tag]
    at = min(after) if after else len(body)
    return body[:at] + raw + body[at:]


def _set_length(body: bytes, tag: int, length: int) -> bytes:
    """Overwrite the 2-byte length of a short-VR top-level element."""
    from node.dicom.encoding import check_encoding

    off = check_encoding(body, ExplicitVRLittleEndian).tags[tag]
    return body[:off + 6] + struct.pack("<H", length) + body[off + 8:]


def _nested(depth: int, defined: bool) -> bytes:
    """A private sequence nested ``depth`` deep (explicit VR LE)."""
    inner = _el(0x0077, 0x1002, b"LO", b"leaf")
    for _ in range(depth):
        if defined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = _el(0x0077, 0x1003, b"SQ", item)
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack(
                "<HHI", 0xFFFE, 0xE00D, 0)
            inner = (_el(0x0077, 0x1003, b"SQ", b"", length=0xFFFFFFFF) + item
                     + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return _el(0x0077, 0x0010, b"LO", b"I20 NEST") + inner


class _Builder:
    def __init__(self, out: Path):
        self.out = out
        self.cases: list[Case] = []

    def add(self, name: str, category: str, body: bytes, cls: str, sop: str, ts: str,
            *reasons: str) -> None:
        path = write_part10(self.out / f"{name}.dcm", body, cls, sop, ts)
        self.cases.append(Case(name, category, path, sop, tuple(reasons)))

    def from_ds(self, name: str, category: str, src: str, ts: str | None, *reasons: str,
                change: Callable[[Dataset], None] | None = None,
                raw: Callable[[bytes], bytes] | None = None) -> Dataset:
        ds = _load(src, name)
        if change is not None:
            change(ds)
        ts = ts or str(ds.file_meta.TransferSyntaxUID)
        enc_ts = ts if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                              ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian) else (
            ExplicitVRLittleEndian)
        body = _encode(ds, enc_ts)
        if raw is not None:
            body = raw(body)
        self.add(name, category, body, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts,
                 *reasons)
        return ds


def _controls(b: _Builder) -> dict[str, Dataset]:
    made = {}
    for f in CONTROL_FILES:
        name = "control_" + f.removesuffix(".dcm").replace("-", "_")
        made[f] = b.from_ds(name, "control", f, None)
    b.from_ds("control_deflated_ct", "control", "CT_small.dcm", DeflatedExplicitVRLittleEndian)
    b.from_ds("control_odd_text_padding", "control", "CT_small.dcm", None,
              raw=lambda body: _insert(body, 0x00771001, _el(0x0077, 0x0010, b"LO", b"I20 ")
                                       + _el(0x0077, 0x1001, b"LO", b"odd")))

    def retired(ds: Dataset) -> None:
        ds.add_new(0x00080010, "SH", "RECOGNITION")  # retired Recognition Code
        ds.add_new(0x00771010, "LO", "PRIVATE")
        ds.add_new(0x00770010, "LO", "VENDOR X")
    b.from_ds("control_retired_private", "control", "CT_small.dcm", None, change=retired)

    def hostile_text(ds: Dataset) -> None:
        ds.PatientName = "Robert'); DROP TABLE patient;--^<script>"
        ds.StudyDescription = "../../../../etc/passwd %s%n {0}"
        ds.add_new(0x00771010, "LO", "x" * 1000)  # over-long LO: cosmetic
        ds.add_new(0x00770010, "LO", "VENDOR X")
    b.from_ds("hostile_text_stored", "hostile_text", "CT_small.dcm", None, change=hostile_text)
    return made


def _structure(b: _Builder) -> None:
    ct = "CT_small.dcm"
    for frac in (0.25, 0.5, 0.9):
        b.from_ds(f"truncated_{int(frac * 100)}", "truncation", ct, None, "unparseable",
                  raw=lambda body, f=frac: body[:int(len(body) * f)])
    b.from_ds("truncated_last_byte", "truncation", ct, None, "unparseable",
              raw=lambda body: body[:-1])
    b.from_ds("truncated_header", "truncation", ct, None, "unparseable",
              raw=lambda body: body[:5])
    b.from_ds("length_past_end", "bad_length", ct, None, "unparseable",
              raw=lambda body: _set_length(body, 0x00100010, 0xFFF0))
    b.from_ds("length_huge_ob", "bad_length", ct, None, "unparseable",
              raw=lambda body: _insert(body, 0x00771001, _el(0x0077, 0x0010, b"LO", b"I20 ")
                                       + _el(0x0077, 0x1001, b"OB", b"\0\0",
                                             length=0xFFFFFFF0)))
    b.from_ds("length_us_three_bytes", "bad_length", ct, None, "unparseable",
              raw=lambda body: _insert(body, 0x00771001, _el(0x0077, 0x0010, b"LO", b"I20 ")
                                       + _el(0x0077, 0x1001, b"US", b"\1\0\2")))
    b.from_ds("length_fd_five_bytes", "bad_length", ct, None, "unparseable",
              raw=lambda body: _insert(body, 0x00771001, _el(0x0077, 0x0010, b"LO", b"I20 ")
                                       + _el(0x0077, 0x1001, b"FD", b"12345")))
    for i, vr in enumerate((b"ZZ", b"\0\0", b"xx", b"Q1")):
        b.from_ds(f"unknown_vr_{i}", "unknown_vr", ct, None, "unparseable",
                  raw=lambda body, v=vr: _insert(
                      body, 0x00771001, _el(0x0077, 0x0010, b"LO", b"I20 ")
                      + _el(0x0077, 0x1001, v, b"ab")))
    b.from_ds("vr_flip_pn", "byte_flip", ct, None, "unparseable",
              raw=lambda body: _flip_vr(body, 0x00100010, b"PX"))
    b.from_ds("tag_order_flip", "byte_flip", ct, None, "unparseable",
              raw=lambda body: _swap_first_two(body))
    b.from_ds("wrong_vr_is_text", "wrong_vr", ct, None, "unparseable",
              raw=lambda body: _replace_value(body, 0x00200013, b"IS", b"abc "))
    b.from_ds("wrong_vr_ds_text", "wrong_vr", ct, None, "unparseable",
              raw=lambda body: _replace_value(body, 0x00180050, b"DS", b"1.2.3x"))
    b.from_ds("wrong_vr_sq_text", "wrong_vr", ct, None, "unparseable",
              raw=lambda body: _insert(body, 0x00771001, _el(0x0077, 0x0010, b"LO", b"I20 ")
                                       + _el(0x0077, 0x1001, b"SQ", b"not a sequence!!")))
    b.from_ds("wrong_vr_ui_as_us", "wrong_vr", ct, None, "unparseable",
              raw=lambda body: _replace_value(body, 0x00200013, b"US", b"\1\0\2"))
    b.from_ds("nesting_undefined_100", "nesting", ct, None, "unparseable",
              raw=lambda body: _insert(body, 0x00770010, _nested(100, False)))
    b.from_ds("nesting_defined_100", "nesting", ct, None, "unparseable",
              raw=lambda body: _insert(body, 0x00770010, _nested(100, True)))
    b.from_ds("nesting_defined_5_ok", "control", ct, None,
              raw=lambda body: _insert(body, 0x00770010, _nested(5, True)))
    ref = _load(ct, "non_dicom")
    cls = str(ref.SOPClassUID)
    b.add("non_dicom_random", "non_dicom", os.urandom(4096), cls, _uid("nd1", "sop"),
          ExplicitVRLittleEndian, "unparseable")
    b.add("non_dicom_png", "non_dicom", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, cls,
          _uid("nd2", "sop"), ExplicitVRLittleEndian, "unparseable")
    b.add("non_dicom_text", "non_dicom", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", cls,
          _uid("nd3", "sop"), ExplicitVRLittleEndian, "unparseable")


def _flip_vr(body: bytes, tag: int, vr: bytes) -> bytes:
    from node.dicom.encoding import check_encoding

    off = check_encoding(body, ExplicitVRLittleEndian).tags[tag]
    return body[:off + 4] + vr + body[off + 6:]


def _swap_first_two(body: bytes) -> bytes:
    from node.dicom.encoding import check_encoding

    offs = sorted(check_encoding(body, ExplicitVRLittleEndian).tags.values())
    a, b_, c = offs[0], offs[1], offs[2]
    return body[b_:c] + body[a:b_] + body[c:]


def _replace_value(body: bytes, tag: int, vr: bytes, value: bytes) -> bytes:
    from node.dicom.encoding import check_encoding

    tags = check_encoding(body, ExplicitVRLittleEndian).tags
    off = tags[tag]
    nxt = min(o for t, o in tags.items() if o > off)
    return body[:off] + _el(tag >> 16, tag & 0xFFFF, vr, value) + body[nxt:]


def _uids(b: _Builder) -> None:
    ct = "CT_small.dcm"
    bad = {"leading_zero": "1.2.03.4", "too_long": "1." + "2" * 64, "empty_component": "1..2",
           "letters": "1.2.3a", "trailing_dot": "1.2.3.", "space": "1.2 3"}
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        for label, v in bad.items():
            if kw == "SOPInstanceUID" and label in ("too_long", "space"):
                continue  # the SCU itself refuses to put these in the C-STORE request
            b.from_ds(f"uid_{kw}_{label}", "invalid_uid", ct, None, "invalid_uid",
                      change=lambda ds, k=kw, val=v: setattr(ds, k, val))
    paths = {"dotdot": "../../etc/passwd", "slash": "1.2/../../x", "abs": "/tmp/x",
             "windows": "C:\\x\\y", "dots_only": ".."}
    for kw in ("StudyInstanceUID", "SeriesInstanceUID"):
        for label, v in paths.items():
            b.from_ds(f"path_{kw}_{label}", "path_like_uid", ct, None, "invalid_uid",
                      change=lambda ds, k=kw, val=v: setattr(ds, k, val))
    b.from_ds("uid_FrameOfReference_letters", "invalid_uid", ct, None, "invalid_uid",
              change=lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.abc"))


def _dimse(b: _Builder) -> None:
    ct = "CT_small.dcm"
    ds = _load(ct, "meta_class_mr")
    b.add("meta_class_mr", "dimse_mismatch", _encode(ds, ExplicitVRLittleEndian),
          MRImageStorage, str(ds.SOPInstanceUID), ExplicitVRLittleEndian,
          "sop_class_mismatch")
    ds = _load(ct, "meta_instance_other")
    b.add("meta_instance_other", "dimse_mismatch", _encode(ds, ExplicitVRLittleEndian),
          str(ds.SOPClassUID), _uid("other", "sop"), ExplicitVRLittleEndian,
          "sop_class_mismatch")
    b.from_ds("image_without_pixels", "sop_class", ct, None, "sop_class_mismatch",
              change=lambda d: delattr(d, "PixelData"))
    b.from_ds("missing_study_uid", "missing_uid", ct, None, "missing_attribute",
              change=lambda d: delattr(d, "StudyInstanceUID"))


def _ts_lies(b: _Builder) -> None:
    b.from_ds("ts_native_as_jpeg", "transfer_syntax_lie", "CT_small.dcm", JPEGBaseline8Bit,
              "transfer_syntax_mismatch")
    b.from_ds("ts_j2k_as_jpeg", "transfer_syntax_lie", "JPEG2000.dcm", JPEGBaseline8Bit,
              "transfer_syntax_mismatch")
    b.from_ds("ts_rle_as_jpegls", "transfer_syntax_lie", "MR_small_RLE.dcm", JPEGLSLossless,
              "transfer_syntax_mismatch")
    b.from_ds("ts_jpeg_as_rle", "transfer_syntax_lie", "SC_rgb_jpeg_dcmtk.dcm", RLELossless,
              "transfer_syntax_mismatch")
    ds = _load("CT_small.dcm", "ts_explicit_as_implicit")
    b.add("ts_explicit_as_implicit", "transfer_syntax_lie",
          _encode(ds, ExplicitVRLittleEndian), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
          ImplicitVRLittleEndian, "unparseable")
    ds = _load("CT_small.dcm", "ts_little_as_big")
    b.add("ts_little_as_big", "transfer_syntax_lie", _encode(ds, ExplicitVRLittleEndian),
          str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRBigEndian, "unparseable")
    ds = _load("CT_small.dcm", "ts_plain_as_deflated")
    b.add("ts_plain_as_deflated", "transfer_syntax_lie", _encode(ds, ExplicitVRLittleEndian),
          str(ds.SOPClassUID), str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian,
          "unparseable")


def _pixels(b: _Builder) -> None:
    ct, rle, j2k = "CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"

    def setter(**kw: object) -> Callable[[Dataset], None]:
        def f(ds: Dataset) -> None:
            for k, v in kw.items():
                setattr(ds, k, v)
        return f

    b.from_ds("px_65535_square", "pixel_data", ct, None, "too_large",
              change=setter(Rows=65535, Columns=65535))
    b.from_ds("px_rows_double", "pixel_data", ct, None, "pixel_data_mismatch",
              change=setter(Rows=256))
    b.from_ds("px_1000_frames", "pixel_data", ct, None, "pixel_data_mismatch",
              change=setter(NumberOfFrames=1000))
    b.from_ds("px_bits_12", "pixel_data", ct, None, "pixel_data_mismatch",
              change=setter(BitsAllocated=12))
    b.from_ds("px_no_rows", "pixel_data", ct, None, "pixel_data_mismatch",
              change=lambda d: delattr(d, "Rows"))
    b.from_ds("px_extra_frame", "pixel_data", ct, None, "pixel_data_mismatch",
              change=lambda d: setattr(d, "PixelData", d.PixelData * 2))
    b.from_ds("px_short", "pixel_data", ct, None, "pixel_data_mismatch",
              change=lambda d: setattr(d, "PixelData", d.PixelData[:-4096]))
    b.from_ds("px_rgb_declared", "pixel_data", ct, None, "pixel_data_mismatch",
              change=setter(SamplesPerPixel=3))
    b.from_ds("px_rle_65535", "pixel_data", rle, None, "too_large",
              change=setter(Rows=65535, Columns=65535))
    b.from_ds("px_rle_frames_5", "pixel_data", rle, None, "pixel_data_mismatch",
              change=setter(NumberOfFrames=5))
    b.from_ds("px_rle_bits_8", "pixel_data", rle, None, "transfer_syntax_mismatch",
              change=setter(BitsAllocated=8, BitsStored=8, HighBit=7))
    b.from_ds("px_j2k_frames_3", "pixel_data", j2k, None, "pixel_data_mismatch",
              change=setter(NumberOfFrames=3))
    b.from_ds("px_emri_frames_20", "pixel_data", "emri_small.dcm", None,
              "pixel_data_mismatch", change=setter(NumberOfFrames=20))


def _bomb(b: _Builder, zeros: int) -> None:
    def big(ds: Dataset) -> None:
        ds.add_new(0x00770010, "LO", "I20 BOMB")
        ds.add_new(0x00771001, "OB", b"\0" * zeros)
    b.from_ds("deflate_bomb", "deflate_bomb", "CT_small.dcm", DeflatedExplicitVRLittleEndian,
              "too_large", change=big)


def _after_controls(b: _Builder, controls: dict[str, Dataset]) -> None:
    """Cases that contradict what a control stored (send them last)."""
    ct = controls["CT_small.dcm"]
    dup = Dataset()
    dup.update(ct)
    dup.SeriesDescription = "other content, same SOP Instance UID"
    b.add("duplicate_conflict", "duplicate", _encode(dup, ExplicitVRLittleEndian),
          str(ct.SOPClassUID), str(ct.SOPInstanceUID), ExplicitVRLittleEndian,
          "duplicate_conflict")
    b.add("duplicate_identical", "control", _encode(ct, ExplicitVRLittleEndian),
          str(ct.SOPClassUID), str(ct.SOPInstanceUID), ExplicitVRLittleEndian)
    other = Dataset()
    other.update(ct)
    other.SOPInstanceUID = _uid("patient_conflict", "sop")
    other.PatientID = "SOMEONE-ELSE"
    b.add("patient_conflict", "patient_conflict", _encode(other, ExplicitVRLittleEndian),
          str(ct.SOPClassUID), str(other.SOPInstanceUID), ExplicitVRLittleEndian,
          "patient_conflict")
    moved = Dataset()
    moved.update(ct)
    moved.SOPInstanceUID = _uid("series_conflict", "sop")
    moved.StudyInstanceUID = _uid("series_conflict", "study")
    b.add("series_conflict", "patient_conflict", _encode(moved, ExplicitVRLittleEndian),
          str(ct.SOPClassUID), str(moved.SOPInstanceUID), ExplicitVRLittleEndian,
          "patient_conflict")


def build(out: Path, *, bomb_bytes: int = 4 * 1024 * 1024) -> list[Case]:
    """Write the corpus into ``out``; returns the cases in sending order (controls first,
    the cases that contradict a control last). The deflate bomb inflates to a bit more
    than ``bomb_bytes``: configure the node's ``ingest.max_inflated_bytes`` below it."""
    out.mkdir(parents=True, exist_ok=True)
    b = _Builder(out)
    with warnings.catch_warnings():  # pydicom warns about the invalid values made here
        warnings.simplefilter("ignore")
        controls = _controls(b)
        _structure(b)
        _uids(b)
        _dimse(b)
        _ts_lies(b)
        _pixels(b)
        _bomb(b, bomb_bytes)
        _after_controls(b, controls)
    return b.cases
