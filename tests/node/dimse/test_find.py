"""C-FIND SCP against DCMTK findscu: Patient Root and Study Root at all four levels,
wildcards, ranges, UID lists, computed keys, failures, cancel, ledger events.

Every expectation is derived from the generated corpus (tests.support.dimse.SPECS) that was stored
through the node's ingest path.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from tests.support.dimse import SPECS, dcmtk, ingest, make_ctx, make_dataset, run_tool, serve

from audit.events import EventType

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    tmp = tmp_path_factory.mktemp("qrfind")
    ctx = make_ctx(tmp, f"sqlite:///{tmp / 'index.db'}")
    ingest(ctx, [make_dataset(s) for s in SPECS])
    with serve(ctx) as port:
        yield ctx, port
    ctx.engine.dispose()


def findscu(node: tuple[Any, int], tmp_path: Path, root: str, level: str,
            *keys: str, extra: tuple[str, ...] = ()) -> tuple[list[Any], str]:
    """Run findscu; return (responses as datasets, tool output)."""
    _ctx, port = node
    out = tmp_path / f"rsp{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [dcmtk("findscu"), "-d", root, "-aet", "FINDSCU", "-aec", "SYNTHNODE",
            "-k", f"QueryRetrieveLevel={level}"]
    for k in keys:
        args += ["-k", k]
    args += ["-X", "-od", str(out), *extra, "127.0.0.1", str(port)]
    proc = run_tool(args)
    rsps = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return rsps, proc.stdout


def statuses(log: str) -> list[int]:
    """DIMSE Status of every response findscu received (from its -d output)."""
    return [int(h, 16) for h in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log)]


def col(rsps: list[Any], keyword: str) -> set[Any]:
    return {str(r.get(keyword, "")) for r in rsps}


# --------------------------------------------------------------------------- patient root
def test_patient_level_wildcard(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-P", "PATIENT", "PatientName=doe*", "PatientID",
                        "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances")
    assert len(rsps) == 1, log
    (r,) = rsps
    assert r.PatientID == "QR1" and str(r.PatientName) == "Doe^John"
    assert r.QueryRetrieveLevel == "PATIENT"
    assert int(r.NumberOfPatientRelatedStudies) == len({s.study_uid for s in SPECS if s.patient_id == "QR1"})
    assert int(r.NumberOfPatientRelatedInstances) == sum(1 for s in SPECS if s.patient_id == "QR1")


def test_patient_root_study_level(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-P", "STUDY", "PatientID=QR1", "StudyInstanceUID",
                        "StudyDate")
    assert col(rsps, "StudyInstanceUID") == {s.study_uid for s in SPECS if s.patient_id == "QR1"}, log


def test_patient_root_image_level(node: tuple[Any, int], tmp_path: Path) -> None:
    se = SPECS[0].series_uid
    rsps, log = findscu(node, tmp_path, "-P", "IMAGE", "PatientID=QR1",
                        f"StudyInstanceUID={SPECS[0].study_uid}", f"SeriesInstanceUID={se}",
                        "SOPInstanceUID", "InstanceNumber")
    assert col(rsps, "SOPInstanceUID") == {s.sop_uid for s in SPECS if s.series_uid == se}, log
    assert {int(r.InstanceNumber) for r in rsps} == {s.instance_number for s in SPECS if s.series_uid == se}


# --------------------------------------------------------------------------- study root
def test_study_level_date_range_and_computed(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "StudyDate=20200101-20201231",
                        "StudyInstanceUID", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                        "NumberOfStudyRelatedInstances", "PatientName", "StudyTime")
    want = {s.study_uid for s in SPECS if "20200101" <= s.study_date <= "20201231"}
    assert col(rsps, "StudyInstanceUID") == want, log
    for r in rsps:
        specs = [s for s in SPECS if s.study_uid == r.StudyInstanceUID]
        mods = r.ModalitiesInStudy
        mods = [mods] if isinstance(mods, str) else list(mods)
        assert sorted(mods) == sorted({s.modality for s in specs})
        assert int(r.NumberOfStudyRelatedSeries) == len({s.series_uid for s in specs})
        assert int(r.NumberOfStudyRelatedInstances) == len(specs)


def test_study_level_time_range_open_lower(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "StudyTime=-1200", "StudyInstanceUID")
    assert col(rsps, "StudyInstanceUID") == {s.study_uid for s in SPECS if s.study_time <= "120059"}, log


def test_modalities_in_study_matching(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "ModalitiesInStudy=MR",
                        "StudyInstanceUID")
    assert col(rsps, "StudyInstanceUID") == {s.study_uid for s in SPECS if s.modality == "MR"}, log


def test_series_level_wildcard_description(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "SERIES", "StudyDescription=CT*", "Modality=CT",
                        "SeriesInstanceUID", "NumberOfSeriesRelatedInstances")
    want = {s.series_uid for s in SPECS if s.study_description.startswith("CT") and s.modality == "CT"}
    assert col(rsps, "SeriesInstanceUID") == want, log
    for r in rsps:
        assert int(r.NumberOfSeriesRelatedInstances) == sum(
            1 for s in SPECS if s.series_uid == r.SeriesInstanceUID)


def test_image_level_uid_list(node: tuple[Any, int], tmp_path: Path) -> None:
    wanted = [SPECS[1].sop_uid, SPECS[-1].sop_uid]
    rsps, log = findscu(node, tmp_path, "-S", "IMAGE", "SOPInstanceUID=" + "\\".join(wanted),
                        "SOPClassUID", "AccessionNumber")
    assert col(rsps, "SOPInstanceUID") == set(wanted), log
    assert col(rsps, "AccessionNumber") == {SPECS[1].accession, SPECS[-1].accession}


def test_no_match_is_success_without_pending(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "PatientName=Nobody*", "StudyInstanceUID")
    assert rsps == []
    assert statuses(log) == [0x0000], log


def test_retrieve_ae_and_unsupported_key(node: tuple[Any, int], tmp_path: Path) -> None:
    # PatientComments is not in the index: answered zero-length with Pending-warning FF01
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", f"StudyInstanceUID={SPECS[0].study_uid}",
                        "RetrieveAETitle", "InstanceAvailability", "PatientComments")
    assert len(rsps) == 1, log
    assert rsps[0].RetrieveAETitle == "SYNTHNODE" and rsps[0].InstanceAvailability == "ONLINE"
    assert rsps[0].PatientComments in ("", None)
    assert statuses(log) == [0xFF01, 0x0000], log


# --------------------------------------------------------------------------- failures, cancel
def test_patient_level_in_study_root_fails_a900(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "PATIENT", "PatientID")
    assert rsps == []
    assert statuses(log) == [0xA900], log
    assert "not in the study root model" in log  # Error Comment (0000,0902)


def test_wildcard_uid_fails_a900(node: tuple[Any, int], tmp_path: Path) -> None:
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "StudyInstanceUID=1.2.*")
    assert rsps == [] and statuses(log) == [0xA900], log


def test_node_serves_after_failure(node: tuple[Any, int], tmp_path: Path) -> None:
    findscu(node, tmp_path, "-S", "STUDY", "StudyDate=garbage")
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "StudyInstanceUID")
    assert len(rsps) == len({s.study_uid for s in SPECS}), log


def test_cancel_stops_responses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """findscu --cancel 2 against 1,000 index rows: C-CANCEL ends the run with FE00.

    The index is made slow (20 ms per row after the second) so the outcome does not
    depend on a race: without the cancel the run would take 20 s and return every row;
    with it, the node stops at the first row it reads after the C-CANCEL arrives.
    """
    import time
    from datetime import datetime, timezone

    from sqlalchemy import insert

    import node.dimse.qr as qr
    from storage.tables import Instance, Patient, Series, Study

    real_run = qr.run

    def slow_run(conn: Any, query: Any) -> Iterator[Any]:
        for i, row in enumerate(real_run(conn, query)):
            if i >= 2:
                time.sleep(0.02)
            yield row

    monkeypatch.setattr(qr, "run", slow_run)
    ctx = make_ctx(tmp_path, f"sqlite:///{tmp_path / 'big.db'}")
    now = datetime.now(timezone.utc)
    n = 1000
    with ctx.engine.begin() as conn:
        conn.execute(insert(Patient).values(id=1, patient_id="BIG", issuer_of_patient_id=""))
        conn.execute(insert(Study).values(id=1, study_instance_uid="1.2.3", patient_pk=1,
                                          created_at=now, updated_at=now))
        conn.execute(insert(Series).values(id=1, series_instance_uid="1.2.3.4", study_pk=1,
                                           created_at=now, updated_at=now))
        conn.execute(insert(Instance), [dict(
            sop_instance_uid=f"1.2.3.4.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_pk=1, transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"x/{i}",
            file_size=1, sha256="0" * 64, received_at=now) for i in range(n)])
    with serve(ctx) as port:
        rsps, log = findscu((ctx, port), tmp_path, "-S", "IMAGE", "SOPInstanceUID",
                            extra=("--cancel", "2"))
    ctx.engine.dispose()
    assert 2 <= len(rsps) < n // 2, log[-2000:]
    st = statuses(log)
    assert st[-1] == 0xFE00 and set(st[:-1]) == {0xFF00}, log[-2000:]
    ev = ctx.ledger.query(event_types=[EventType.QUERY.value])[-1].event
    assert ev.payload["status"] == 0xFE00 and ev.payload["matches"] < n // 2


def test_ledger_records_queries_without_values(node: tuple[Any, int], tmp_path: Path) -> None:
    ctx, _port = node
    findscu(node, tmp_path, "-S", "STUDY", "PatientName=Roe^Jane", "StudyInstanceUID")
    entries = ctx.ledger.query(event_types=[EventType.QUERY.value])
    assert entries, "no QUERY event"
    ev = entries[-1].event
    assert ev.actor == "ae:FINDSCU"
    assert ev.payload["level"] == "STUDY" and ev.payload["matches"] == 1
    assert "PatientName" in ev.payload["keys"]
    assert b"Roe" not in entries[-1].data  # no PHI values in the leaf
    findscu(node, tmp_path, "-S", "PATIENT", "PatientID")
    last = ctx.ledger.query(event_types=[EventType.QUERY.value])[-1].event
    assert last.payload["status"] == 0xA900 and last.outcome.value == "serious_failure"


def test_storescu_then_findscu(tmp_path: Path) -> None:
    """End to end over the network: DCMTK storescu into the node, then findscu finds it."""
    from dataclasses import replace

    from tests.support.dimse import PREFIX, part10

    specs = [replace(s, study_uid=PREFIX + "77", series_uid=PREFIX + "77.1",
                     sop_uid=f"{PREFIX}77.1.{i}", patient_name="Net^Work")
             for i, s in enumerate(SPECS[:4], start=1)]
    files = []
    for s in specs:
        f = tmp_path / f"{s.sop_uid}.dcm"
        f.write_bytes(part10(make_dataset(s)))
        files.append(str(f))
    ctx = make_ctx(tmp_path, f"sqlite:///{tmp_path / 'e2e.db'}")
    with serve(ctx) as port:
        sent = run_tool([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE",
                         "127.0.0.1", str(port), *files])
        assert sent.returncode == 0, sent.stdout
        rsps, log = findscu((ctx, port), tmp_path, "-S", "IMAGE", f"StudyInstanceUID={PREFIX}77",
                            "PatientName", "NumberOfFrames")
        study, slog = findscu((ctx, port), tmp_path, "-S", "STUDY", "PatientName=net^work",
                              "NumberOfStudyRelatedInstances", "ModalitiesInStudy")
    ctx.engine.dispose()
    assert col(rsps, "SOPInstanceUID") == {s.sop_uid for s in specs}, log[-2000:]
    assert col(rsps, "PatientName") == {"Net^Work"}
    assert len(study) == 1 and int(study[0].NumberOfStudyRelatedInstances) == 4, slog[-2000:]


def test_ledger_failure_reason_has_no_value(node: tuple[Any, int], tmp_path: Path) -> None:
    ctx, _port = node
    rsps, log = findscu(node, tmp_path, "-S", "STUDY", "PatientBirthDate=1970-01-01")
    assert statuses(log) == [0xA900] and "1970-01-01" in log  # Error Comment names it
    ev = ctx.ledger.query(event_types=[EventType.QUERY.value])[-1]
    assert ev.event.payload["reason"] == "PatientBirthDate: invalid value"
    assert b"1970-01-01" not in ev.data
