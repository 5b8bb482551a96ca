"""PS3.4 C.2.2.2 matching against the index, on SQLite and PostgreSQL.

Rows are inserted directly into the index tables (storage/tables.py), then queried through
``storage.matching``; every expectation is a set of keys derived from the inserted rows.
"""
from __future__ import annotations

import re
import string
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, select

from node.db import make_engine
from storage.matching import InvalidQuery, build_query, find, run
from storage.tables import Instance, Patient, Series, Study

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

PATIENTS = [
    # pk, id, name, birth, sex
    (1, "P1", "Doe^John", "19700101", "M"),
    (2, "P2", "DOE^JANE^^^", "19800215", "F"),
    (3, "p3", "Smith^Anna", "", "F"),
    (4, "P_4", "Mc%Donald^Ron", None, "O"),
]
STUDIES = [
    # pk, uid, patient_pk, date, time, accession, description, referring
    (1, "1.2.3.1", 1, "20200101", "083000", "ACC1", "CT Chest", "House^Greg"),
    (2, "1.2.3.2", 1, "20200615", "1405", "ACC2", "MR Brain", None),
    (3, "1.2.3.3", 2, "20211231", "235959.123456", "acc3", "ct abdomen", "house^greg"),
    (4, "1.2.3.4", 3, "", None, "ACC[4]", "Mixed", None),
    (5, "1.2.3.5", 4, "20190301", "12", "ACC_5", "Chest*", None),
]
SERIES = [
    # pk, uid, study_pk, modality, number, description, body part
    (1, "1.2.3.1.1", 1, "CT", 1, "Axial", "CHEST"),
    (2, "1.2.3.1.2", 1, "CT", 2, "Coronal", "CHEST"),
    (3, "1.2.3.2.1", 2, "MR", 1, "T1", "HEAD"),
    (4, "1.2.3.3.1", 3, "CT", 1, "Axial", "ABDOMEN"),
    (5, "1.2.3.4.1", 4, "MR", 1, "T2", "HEAD"),
    (6, "1.2.3.4.2", 4, "CT", 2, "Scout", None),
    (7, "1.2.3.4.3", 4, "SR", 3, "Report", None),
]
# series_pk -> number of instances
INSTANCES = {1: 3, 2: 2, 3: 4, 4: 1, 5: 2, 6: 1, 7: 1}


def _populate(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Patient), [
            dict(id=pk, patient_id=pid, issuer_of_patient_id="", patient_name=name,
                 patient_birth_date=birth, patient_sex=sex)
            for pk, pid, name, birth, sex in PATIENTS
        ])
        conn.execute(insert(Study), [
            dict(id=pk, study_instance_uid=uid, patient_pk=ppk, study_date=d, study_time=t,
                 accession_number=acc, study_description=desc, referring_physician_name=ref,
                 study_id=f"S{pk}", created_at=NOW, updated_at=NOW)
            for pk, uid, ppk, d, t, acc, desc, ref in STUDIES
        ])
        conn.execute(insert(Series), [
            dict(id=pk, series_instance_uid=uid, study_pk=spk, modality=mod, series_number=num,
                 series_description=desc, body_part_examined=bp, created_at=NOW, updated_at=NOW)
            for pk, uid, spk, mod, num, desc, bp in SERIES
        ])
        rows = []
        n = 0
        for se_pk, count in INSTANCES.items():
            se_uid = next(s[1] for s in SERIES if s[0] == se_pk)
            modality = next(s[3] for s in SERIES if s[0] == se_pk)
            for i in range(1, count + 1):
                n += 1
                rows.append(dict(
                    id=n, sop_instance_uid=f"{se_uid}.{i}", series_pk=se_pk, instance_number=i,
                    sop_class_uid=MR if modality == "MR" else CT, transfer_syntax_uid="1.2.840.10008.1.2.1",
                    rows=512, columns=512, bits_allocated=16, content_date="20200101",
                    content_time=f"10{i:02d}00", file_path=f"x/{n}.dcm", file_size=100,
                    sha256="0" * 64, received_at=NOW,
                ))
        conn.execute(insert(Instance), rows)


@pytest.fixture
def engine(migrated_db: str) -> Iterator[Engine]:
    eng = make_engine(migrated_db)
    _populate(eng)
    yield eng
    eng.dispose()


def q(engine: Engine, level: str, **keys: object) -> list[dict]:
    with engine.connect() as conn:
        return find(conn, level, keys)


def uids(rows: list[dict], key: str) -> set:
    return {r[key] for r in rows}


# ---------------------------------------------------------------- universal / single value
def test_universal_returns_every_entity_at_each_level(engine: Engine) -> None:
    assert uids(q(engine, "PATIENT", PatientName=""), "PatientID") == {"P1", "P2", "p3", "P_4"}
    assert len(q(engine, "STUDY", StudyDate="")) == len(STUDIES)
    assert len(q(engine, "SERIES", Modality="*")) == len(SERIES)
    assert len(q(engine, "IMAGE", SOPInstanceUID="")) == sum(INSTANCES.values())


def test_single_value_is_case_sensitive_except_pn(engine: Engine) -> None:
    assert uids(q(engine, "PATIENT", PatientID="P1"), "PatientID") == {"P1"}
    assert q(engine, "PATIENT", PatientID="p1") == []
    assert uids(q(engine, "STUDY", AccessionNumber="ACC3"), "StudyInstanceUID") == set()
    assert uids(q(engine, "STUDY", AccessionNumber="acc3"), "StudyInstanceUID") == {"1.2.3.3"}
    # PN: case-insensitive, trailing '^' insignificant on both sides
    assert uids(q(engine, "PATIENT", PatientName="doe^jane"), "PatientID") == {"P2"}
    assert uids(q(engine, "PATIENT", PatientName="DOE^JOHN^"), "PatientID") == {"P1"}
    assert uids(q(engine, "STUDY", ReferringPhysicianName="HOUSE^GREG"), "StudyInstanceUID") == {
        "1.2.3.1", "1.2.3.3"}


def test_response_carries_requested_keys_and_unique_key(engine: Engine) -> None:
    rows = q(engine, "STUDY", PatientID="P1", StudyDescription="", PatientName="")
    assert {r["StudyInstanceUID"] for r in rows} == {"1.2.3.1", "1.2.3.2"}
    r = next(r for r in rows if r["StudyInstanceUID"] == "1.2.3.2")
    assert r == {"StudyInstanceUID": "1.2.3.2", "PatientID": "P1", "StudyDescription": "MR Brain",
                 "PatientName": "Doe^John"}


# ---------------------------------------------------------------- wildcards
def test_wildcards(engine: Engine) -> None:
    assert uids(q(engine, "PATIENT", PatientName="doe*"), "PatientID") == {"P1", "P2"}
    assert uids(q(engine, "PATIENT", PatientName="D?E^J*"), "PatientID") == {"P1", "P2"}
    assert uids(q(engine, "STUDY", StudyDescription="CT*"), "StudyInstanceUID") == {"1.2.3.1"}
    assert uids(q(engine, "STUDY", StudyDescription="*Chest*"), "StudyInstanceUID") == {
        "1.2.3.1", "1.2.3.5"}
    assert uids(q(engine, "STUDY", StudyDescription="*a*"), "StudyInstanceUID") == {
        "1.2.3.2", "1.2.3.3"}
    assert uids(q(engine, "SERIES", SeriesDescription="?xial"), "SeriesInstanceUID") == {
        "1.2.3.1.1", "1.2.3.3.1"}


def test_sql_metacharacters_are_literal(engine: Engine) -> None:
    # '_' and '%' are LIKE wildcards, '[' is a GLOB class: none may act as one.
    assert uids(q(engine, "PATIENT", PatientID="P_*"), "PatientID") == {"P_4"}
    assert uids(q(engine, "PATIENT", PatientName="mc%*"), "PatientID") == {"P_4"}
    assert uids(q(engine, "PATIENT", PatientName="m%*"), "PatientID") == set()
    assert uids(q(engine, "STUDY", AccessionNumber="ACC[*"), "StudyInstanceUID") == {"1.2.3.4"}
    assert uids(q(engine, "STUDY", AccessionNumber="ACC_?"), "StudyInstanceUID") == {"1.2.3.5"}
    assert uids(q(engine, "STUDY", AccessionNumber="ACC_5"), "StudyInstanceUID") == {"1.2.3.5"}


# ---------------------------------------------------------------- UID lists, multiple values
def test_uid_list(engine: Engine) -> None:
    rows = q(engine, "STUDY", StudyInstanceUID="1.2.3.1\\1.2.3.4\\9.9")
    assert uids(rows, "StudyInstanceUID") == {"1.2.3.1", "1.2.3.4"}
    rows = q(engine, "SERIES", StudyInstanceUID=["1.2.3.2", "1.2.3.3"])
    assert uids(rows, "SeriesInstanceUID") == {"1.2.3.2.1", "1.2.3.3.1"}


def test_multiple_values_match_any(engine: Engine) -> None:
    assert uids(q(engine, "SERIES", Modality="MR\\SR"), "SeriesInstanceUID") == {
        "1.2.3.2.1", "1.2.3.4.1", "1.2.3.4.3"}
    assert uids(q(engine, "SERIES", SeriesNumber="2\\3"), "SeriesInstanceUID") == {
        "1.2.3.1.2", "1.2.3.4.2", "1.2.3.4.3"}


# ---------------------------------------------------------------- ranges
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20200101", {"1.2.3.1"}),
        ("20200101-20201231", {"1.2.3.1", "1.2.3.2"}),
        ("20200102-", {"1.2.3.2", "1.2.3.3"}),
        ("-20200101", {"1.2.3.1", "1.2.3.5"}),  # empty StudyDate (1.2.3.4) never matches a range
        ("20190301\\20211231", {"1.2.3.3", "1.2.3.5"}),
    ],
)
def test_date_range(engine: Engine, value: str, expected: set[str]) -> None:
    assert uids(q(engine, "STUDY", StudyDate=value), "StudyInstanceUID") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0830", {"1.2.3.1"}),  # single partial value covers its minute
        ("08", {"1.2.3.1"}),
        ("0800-1200", {"1.2.3.1", "1.2.3.5"}),  # stored "12" is 12:00:00
        ("0800-1159", {"1.2.3.1"}),
        ("-12", {"1.2.3.1", "1.2.3.5"}),  # upper bound hour 12 includes 12:59:59
        ("1200-", {"1.2.3.2", "1.2.3.3", "1.2.3.5"}),
        ("1405-1405", {"1.2.3.2"}),
        ("23:59:59-", {"1.2.3.3"}),  # ACR-NEMA colons tolerated
    ],
)
def test_time_range(engine: Engine, value: str, expected: set[str]) -> None:
    assert uids(q(engine, "STUDY", StudyTime=value), "StudyInstanceUID") == expected


def test_birth_date_range_at_patient_level(engine: Engine) -> None:
    assert uids(q(engine, "PATIENT", PatientBirthDate="19750101-"), "PatientID") == {"P2"}


# ---------------------------------------------------------------- computed attributes
def test_computed_study_attributes(engine: Engine) -> None:
    rows = {r["StudyInstanceUID"]: r for r in q(
        engine, "STUDY", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
        ModalitiesInStudy="", SOPClassesInStudy="")}
    for pk, uid, *_ in STUDIES:
        series = [s for s in SERIES if s[2] == pk]
        assert rows[uid]["NumberOfStudyRelatedSeries"] == len(series)
        assert rows[uid]["NumberOfStudyRelatedInstances"] == sum(INSTANCES[s[0]] for s in series)
        assert rows[uid]["ModalitiesInStudy"] == sorted({s[3] for s in series})
    assert rows["1.2.3.4"]["SOPClassesInStudy"] == sorted({CT, MR})
    assert rows["1.2.3.5"]["ModalitiesInStudy"] == []


def test_modalities_in_study_matching(engine: Engine) -> None:
    assert uids(q(engine, "STUDY", ModalitiesInStudy="MR"), "StudyInstanceUID") == {
        "1.2.3.2", "1.2.3.4"}
    assert uids(q(engine, "STUDY", ModalitiesInStudy="SR\\MR"), "StudyInstanceUID") == {
        "1.2.3.2", "1.2.3.4"}
    assert uids(q(engine, "STUDY", ModalitiesInStudy="C*"), "StudyInstanceUID") == {
        "1.2.3.1", "1.2.3.3", "1.2.3.4"}


def test_patient_and_series_counts(engine: Engine) -> None:
    rows = {r["PatientID"]: r for r in q(
        engine, "PATIENT", NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="")}
    assert rows["P1"]["NumberOfPatientRelatedStudies"] == 2
    assert rows["P1"]["NumberOfPatientRelatedSeries"] == 3
    assert rows["P1"]["NumberOfPatientRelatedInstances"] == 3 + 2 + 4
    assert rows["P_4"]["NumberOfPatientRelatedInstances"] == 0
    series = {r["SeriesInstanceUID"]: r for r in q(
        engine, "SERIES", NumberOfSeriesRelatedInstances="", NumberOfStudyRelatedSeries="")}
    assert series["1.2.3.2.1"]["NumberOfSeriesRelatedInstances"] == 4
    assert series["1.2.3.4.2"]["NumberOfStudyRelatedSeries"] == 3


def test_counts_are_return_keys_only(engine: Engine) -> None:
    query = build_query("STUDY", {"NumberOfStudyRelatedInstances": "5"})
    assert query.ignored == ("NumberOfStudyRelatedInstances",)
    with engine.connect() as conn:
        assert len(list(run(conn, query))) == len(STUDIES)


# ---------------------------------------------------------------- levels
def test_upper_level_keys_match_at_lower_levels(engine: Engine) -> None:
    rows = q(engine, "IMAGE", PatientName="doe^john", Modality="MR", InstanceNumber="")
    assert uids(rows, "SOPInstanceUID") == {f"1.2.3.2.1.{i}" for i in range(1, 5)}
    assert {r["InstanceNumber"] for r in rows} == {1, 2, 3, 4}
    rows = q(engine, "IMAGE", SeriesInstanceUID="1.2.3.1.1", ContentTime="1002-1003")
    assert uids(rows, "SOPInstanceUID") == {"1.2.3.1.1.2", "1.2.3.1.1.3"}


def test_lower_level_and_unknown_keys_are_unsupported(engine: Engine) -> None:
    query = build_query("STUDY", {"Modality": "CT", "PatientComments": "", "StudyDate": ""})
    assert set(query.unsupported) == {"Modality", "PatientComments"}
    with engine.connect() as conn:
        rows = list(run(conn, query))
    assert len(rows) == len(STUDIES)  # unsupported keys do not filter
    assert all(r["Modality"] is None and r["PatientComments"] is None for r in rows)


def test_limit_offset_and_order(engine: Engine) -> None:
    with engine.connect() as conn:
        page = find(conn, "IMAGE", {}, limit=4, offset=2)
        every = find(conn, "IMAGE", {})
    assert [r["SOPInstanceUID"] for r in page] == [r["SOPInstanceUID"] for r in every[2:6]]


# ---------------------------------------------------------------- invalid values
@pytest.mark.parametrize(
    ("level", "keys", "keyword"),
    [
        ("STUDY", {"StudyInstanceUID": "1.2.*"}, "StudyInstanceUID"),
        ("STUDY", {"StudyInstanceUID": "abc"}, "StudyInstanceUID"),
        ("STUDY", {"StudyDate": "2020-01-01"}, "StudyDate"),
        ("STUDY", {"StudyDate": "2020*"}, "StudyDate"),
        ("STUDY", {"StudyTime": "25"}, "StudyTime"),
        ("STUDY", {"StudyDate": "-"}, "StudyDate"),
        ("SERIES", {"SeriesNumber": "one"}, "SeriesNumber"),
        ("IMAGE", {"Rows": "5*"}, "Rows"),
    ],
)
def test_invalid_values_raise(level: str, keys: dict, keyword: str) -> None:
    with pytest.raises(InvalidQuery) as exc:
        build_query(level, keys)
    assert exc.value.keyword == keyword


def test_unknown_level_rejected() -> None:
    with pytest.raises(ValueError):
        build_query("FRAME", {})


# ---------------------------------------------------------------- property: wildcard semantics
_ALPHABET = string.ascii_letters[:6] + "%_![]^ "


def _reference(pattern: str, value: str) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, flags=re.DOTALL) is not None


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.text(alphabet=_ALPHABET, min_size=1, max_size=6), min_size=1,
                    max_size=8, unique=True),
    pattern=st.text(alphabet=_ALPHABET + "*?", min_size=1, max_size=6).filter(
        lambda p: p.strip() == p and any(c in p for c in "*?") and set(p) != {"*"}),
)
def test_wildcard_matches_reference(migrated_db: str, values: list[str], pattern: str) -> None:
    """Case-sensitive wildcard matching (StudyDescription, LO) equals a regex reference."""
    values = [v.strip() or "x" for v in values]
    eng = make_engine(migrated_db)
    try:
        with eng.begin() as conn:
            conn.execute(delete(Instance))
            conn.execute(delete(Series))
            conn.execute(delete(Study))
            conn.execute(delete(Patient))
            conn.execute(insert(Patient), [dict(id=1, patient_id="P", issuer_of_patient_id="")])
            conn.execute(insert(Study), [
                dict(id=i + 1, study_instance_uid=f"1.9.{i}", patient_pk=1, study_description=v,
                     created_at=NOW, updated_at=NOW)
                for i, v in enumerate(values)
            ])
        with eng.connect() as conn:
            got = {r["StudyDescription"] for r in find(conn, "STUDY", {"StudyDescription": pattern})}
            stored = {r[0] for r in conn.execute(select(Study.study_description))}
        assert got == {v for v in stored if _reference(pattern, v)}
    finally:
        eng.dispose()


# ---------------------------------------------------------------- retrieve set (storage.query)
def test_retrieve_set_by_level(engine: Engine) -> None:
    from storage.query import instances_by_uid, retrieve_set

    with engine.connect() as conn:
        study = retrieve_set(conn, "STUDY", {"StudyInstanceUID": "1.2.3.4"})
        assert {r.series_instance_uid for r in study} == {"1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"}
        assert len(study) == INSTANCES[5] + INSTANCES[6] + INSTANCES[7]
        two = retrieve_set(conn, "SERIES", {"StudyInstanceUID": "1.2.3.1",
                                            "SeriesInstanceUID": "1.2.3.1.1\\1.2.3.1.2\\1.2.3.2.1"})
        # the upper-level key narrows: 1.2.3.2.1 belongs to another study
        assert {r.series_instance_uid for r in two} == {"1.2.3.1.1", "1.2.3.1.2"}
        img = retrieve_set(conn, "IMAGE", {"SOPInstanceUID": ["1.2.3.2.1.2", "1.2.3.2.1.4"]})
        assert [r.sop_instance_uid for r in img] == ["1.2.3.2.1.2", "1.2.3.2.1.4"]
        assert img[0].study_instance_uid == "1.2.3.2" and img[0].sop_class_uid == MR
        patient = retrieve_set(conn, "PATIENT", {"PatientID": "P2"})
        assert {r.study_instance_uid for r in patient} == {"1.2.3.3"}
        got = instances_by_uid(conn, ["1.2.3.1.1.1", "9.9.9"])
        assert set(got) == {"1.2.3.1.1.1"} and got["1.2.3.1.1.1"].file_path == "x/1.dcm"


@pytest.mark.parametrize("keys", [{}, {"SeriesInstanceUID": ""}, {"SeriesInstanceUID": "*"}])
def test_retrieve_needs_unique_key(keys: dict) -> None:
    from storage.query import retrieve_set

    with pytest.raises(InvalidQuery) as exc:
        retrieve_set(None, "SERIES", keys)  # type: ignore[arg-type]  # raises before any I/O
    assert exc.value.keyword == "SeriesInstanceUID"
