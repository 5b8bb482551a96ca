"""DICOM files (PS3.10 7.1): preamble, 'DICM', File Meta Information, data set."""
from __future__ import annotations

import struct
from io import BytesIO

import pydicom
from pydicom import __version_info__ as _PYDICOM_VERSION
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from node.dicom.encoding import EncodingError

__all__ = ["PREAMBLE", "build_part10", "file_meta_bytes", "split_part10"]

PREAMBLE = b"\x00" * 128 + b"DICM"


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
