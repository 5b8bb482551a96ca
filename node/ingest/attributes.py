"""The attributes the index needs, read from a received data set's header without
converting every element (PS3.5 6.1 character sets, 6.2 value representations)."""
from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from pydicom.datadict import dictionary_VR as dictionary_vr
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from storage.index import InstanceRecord

__all__ = ["INDEX_TAGS", "index_record", "int_value", "text_value"]

_INDEX_KEYWORDS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "Modality", "SeriesNumber", "SeriesDescription",
    "BodyPartExamined", "SeriesDate", "SeriesTime", "FrameOfReferenceUID",
    "InstanceNumber", "NumberOfFrames", "Rows", "Columns", "BitsAllocated",
    "ContentDate", "ContentTime", "SyntheticData",
]


def _keyword_tag(keyword: str) -> BaseTag:
    """The tag of a DICOM keyword (PS3.6)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    return Tag(tag)


#: the tags of the index attributes (typed as pydicom's ``specific_tags`` parameter)
INDEX_TAGS: list[BaseTag | int] = [_keyword_tag(k) for k in _INDEX_KEYWORDS]


_ASCII_VRS = {"UI", "DA", "TM", "DT", "CS", "IS", "DS", "AS", "AE"}  # PS3.5 6.2: default repertoire
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UC", "UT"}  # affected by Specific Character Set
_DEFAULT_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"}


def _raw_value(ds: Dataset, keyword: str) -> tuple[str, bytes] | None:
    """(VR, raw bytes) of a not-yet-converted element, or None."""
    tag = _keyword_tag(keyword)
    elem = ds._dict.get(tag)
    if elem is None or not hasattr(elem, "value") or not isinstance(elem.value, bytes):
        return None
    vr = elem.VR or dictionary_vr(tag)
    return str(vr), elem.value


def text_value(ds: Dataset, keyword: str) -> str | None:
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


def int_value(ds: Dataset, keyword: str) -> int | None:
    try:
        raw = _raw_value(ds, keyword)
        if raw is not None and raw[0] == "US" and len(raw[1]) >= 2:
            little = ds.original_encoding[1] is not False
            return int(struct.unpack("<H" if little else ">H", raw[1][:2])[0])
        if raw is not None and raw[0] == "IS":
            t = text_value(ds, keyword)
            return None if t is None else int(t.split("\\")[0])
        v = ds.get(keyword)
        return None if v is None or v == "" else int(v)
    except Exception:
        return None


def index_record(probe: Dataset, ts: str, rel_path: str, size: int, sha: str,
            calling_ae: str | None, called_ae: str | None, source: str) -> InstanceRecord:
    """The index row of a received instance (values as received, trimmed)."""
    return InstanceRecord(
        sop_instance_uid=text_value(probe, "SOPInstanceUID") or "",
        sop_class_uid=text_value(probe, "SOPClassUID") or "",
        series_instance_uid=text_value(probe, "SeriesInstanceUID") or "",
        study_instance_uid=text_value(probe, "StudyInstanceUID") or "",
        transfer_syntax_uid=ts,
        file_path=rel_path,
        file_size=size,
        sha256=sha,
        received_at=datetime.now(UTC),
        calling_ae=calling_ae,
        called_ae=called_ae,
        source=source,
        patient_id=text_value(probe, "PatientID") or "",
        issuer_of_patient_id=text_value(probe, "IssuerOfPatientID") or "",
        patient_name=text_value(probe, "PatientName"),
        patient_birth_date=text_value(probe, "PatientBirthDate"),
        patient_sex=text_value(probe, "PatientSex"),
        study_date=text_value(probe, "StudyDate"),
        study_time=text_value(probe, "StudyTime"),
        accession_number=text_value(probe, "AccessionNumber"),
        study_id=text_value(probe, "StudyID"),
        study_description=text_value(probe, "StudyDescription"),
        referring_physician_name=text_value(probe, "ReferringPhysicianName"),
        modality=text_value(probe, "Modality"),
        series_number=int_value(probe, "SeriesNumber"),
        series_description=text_value(probe, "SeriesDescription"),
        body_part_examined=text_value(probe, "BodyPartExamined"),
        series_date=text_value(probe, "SeriesDate"),
        series_time=text_value(probe, "SeriesTime"),
        frame_of_reference_uid=text_value(probe, "FrameOfReferenceUID"),
        instance_number=int_value(probe, "InstanceNumber"),
        number_of_frames=int_value(probe, "NumberOfFrames"),
        rows=int_value(probe, "Rows"),
        columns=int_value(probe, "Columns"),
        bits_allocated=int_value(probe, "BitsAllocated"),
        content_date=text_value(probe, "ContentDate"),
        content_time=text_value(probe, "ContentTime"),
        synthetic_data=text_value(probe, "SyntheticData"),
    )
