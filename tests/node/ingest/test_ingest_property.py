"""Property: whatever bytes arrive, an instance the ingest path acknowledges reads back
completely and equal: the stored data set is the sent one, pydicom converts every value
(sequences included) and decodes the pixel data to the size the Image Pixel module
declares. Anything else is refused with an IngestError (never another exception) and
leaves nothing new in the store.

Inputs: a real file (pydicom's CT_small) with hypothesis-chosen byte overwrites,
truncation, an inserted private element of any (or no valid) VR, and random text values.
"""
from __future__ import annotations

import struct
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.ingest.ingestor import Ingestor
from node.ingest.results import IngestError
from tests.support.dimse import make_ctx

_SRC = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
_VRS = [b"AE", b"CS", b"DA", b"DS", b"FD", b"FL", b"IS", b"LO", b"OB", b"OW", b"PN",
        b"SL", b"SQ", b"SS", b"UI", b"UL", b"UN", b"US", b"UT", b"ZZ", b"\0\0"]
_LONG = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


def _encode(ds: pydicom.Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@st.composite
def inputs(draw: Any) -> bytes:
    ds = pydicom.Dataset()
    ds.update(_SRC)
    # a new UID per example, of constant length: hypothesis replays an example by its
    # draws, whose bounds (overwrite positions, truncation) follow the body's length
    ds.SOPInstanceUID = "2.25." + str(uuid.uuid4().int | (1 << 127))  # always 39 digits
    text = st.text(alphabet=st.characters(codec="latin-1"), max_size=70)
    ds.PatientName = draw(text).replace("\\", "")
    ds.StudyDescription = draw(text).replace("\\", "")
    ds.InstanceNumber = draw(st.integers(-(2**31), 2**31 - 1))
    body = _encode(ds)
    if draw(st.booleans()):  # a private element, inserted before (0008,...) is ordered
        vr = draw(st.sampled_from(_VRS))
        value = draw(st.binary(max_size=40))
        head = struct.pack("<HH", 0x0077, 0x1001) + vr
        head += (b"\0\0" + struct.pack("<I", len(value))) if vr in _LONG else struct.pack(
            "<H", len(value))
        elem = (struct.pack("<HH", 0x0077, 0x0010) + b"LO" + struct.pack("<H", 4) + b"I20 "
                + head + value)
        at = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
        body = body[:at] + elem + body[at:]
    for _ in range(draw(st.integers(0, 3))):  # overwrite bytes in the header
        pos = draw(st.integers(0, min(len(body), 1200) - 1))
        body = body[:pos] + bytes([draw(st.integers(0, 255))]) + body[pos + 1:]
    if draw(st.booleans()) and draw(st.booleans()):
        body = body[:draw(st.integers(0, len(body)))]
    return body


@pytest.fixture
def ingestor(tmp_path: Path) -> Any:
    ctx = make_ctx(tmp_path, f"sqlite:///{tmp_path / 'index.db'}")
    yield Ingestor(ctx)
    ctx.engine.dispose()


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=inputs())
def test_acknowledged_reads_back_equal(ingestor: Any, body: bytes) -> None:
    ctx = ingestor.ctx
    before = set(ctx.store.iter_files())
    try:
        result = ingestor.ingest_dataset(body, ExplicitVRLittleEndian, source="stow")
    except IngestError:
        assert set(ctx.store.iter_files()) == before
        return
    from node.dicom.part10 import split_part10

    row = ctx.index.get_instance(result.sop_instance_uid)
    assert row is not None
    _, stored = split_part10(ctx.store.read(row.file_path))
    assert stored == body
    back = pydicom.dcmread(ctx.store.path(row.file_path))
    values = [(e.tag, e.value) for e in back.iterall()]
    assert values
    arr = back.pixel_array
    frames = int(back.get("NumberOfFrames", 1) or 1)
    assert arr.size == back.Rows * back.Columns * back.get("SamplesPerPixel", 1) * frames
