"""C-GET SCP against DCMTK getscu: files arrive in a temp dir and equal what is stored;
study / series / image levels; failures (A900, unreadable file -> failed sub-operation);
ledger RETRIEVE events with the sub-operation counts.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from tests.support.dimse import SPECS, dcmtk, ingest, make_ctx, make_dataset, part10, run_tool, serve

from audit.events import EventType

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    tmp = tmp_path_factory.mktemp("qrget")
    ctx = make_ctx(tmp, f"sqlite:///{tmp / 'index.db'}")
    ingest(ctx, [make_dataset(s) for s in SPECS])
    # one real file of the pydicom corpus (CT, explicit VR little endian)
    ctx_ing = __import__("node.ingest.ingestor", fromlist=["Ingestor"]).Ingestor(ctx)
    ctx_ing.ingest_part10(Path(get_testdata_file("CT_small.dcm")).read_bytes(), calling_ae="STORESCU")
    with serve(ctx) as port:
        yield ctx, port
    ctx.engine.dispose()


def statuses(log: str) -> list[int]:
    return [int(h, 16) for h in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log)]


def getscu(node: tuple[Any, int], out: Path, root: str, level: str, *keys: str) -> str:
    _ctx, port = node
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-d", root, "-aet", "GETSCU", "-aec", "SYNTHNODE",
            "-k", f"QueryRetrieveLevel={level}"]
    for k in keys:
        args += ["-k", k]
    args += ["-od", str(out), "127.0.0.1", str(port)]
    return run_tool(args, timeout=120).stdout


def received(out: Path) -> dict[str, Any]:
    return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in out.iterdir() if p.is_file())}


def stored(ctx: Any, sop_uid: str) -> Any:
    rec = ctx.index.get_instance(sop_uid)
    return dcmread(ctx.store.path(rec.file_path))


def _same(a: Any, b: Any) -> bool:
    """Same data set (file meta excluded), element by element, pixel data included."""
    return [e for e in a] == [e for e in b]


def test_get_study(node: tuple[Any, int], tmp_path: Path) -> None:
    ctx, _ = node
    study = SPECS[0].study_uid
    log = getscu(node, tmp_path / "out", "-S", "STUDY", f"StudyInstanceUID={study}")
    got = received(tmp_path / "out")
    want = {s.sop_uid for s in SPECS if s.study_uid == study}
    assert set(got) == want, log[-3000:]
    for uid, ds in got.items():
        assert _same(ds, stored(ctx, uid)), uid
    assert statuses(log)[-1] == 0x0000


def test_get_series_patient_root(node: tuple[Any, int], tmp_path: Path) -> None:
    s0 = SPECS[0]
    log = getscu(node, tmp_path / "out", "-P", "SERIES", f"PatientID={s0.patient_id}",
                 f"StudyInstanceUID={s0.study_uid}", f"SeriesInstanceUID={s0.series_uid}")
    assert set(received(tmp_path / "out")) == {s.sop_uid for s in SPECS if s.series_uid == s0.series_uid}, log[-3000:]


def test_get_image_uid_list_real_file(node: tuple[Any, int], tmp_path: Path) -> None:
    ctx, _ = node
    real = dcmread(get_testdata_file("CT_small.dcm"))
    log = getscu(node, tmp_path / "out", "-S", "IMAGE", f"StudyInstanceUID={real.StudyInstanceUID}",
                 f"SeriesInstanceUID={real.SeriesInstanceUID}", f"SOPInstanceUID={real.SOPInstanceUID}")
    got = received(tmp_path / "out")
    assert set(got) == {real.SOPInstanceUID}, log[-3000:]
    # the received data set equals the original file of the corpus
    assert _same(got[real.SOPInstanceUID], real)


def test_get_without_unique_key_fails_a900(node: tuple[Any, int], tmp_path: Path) -> None:
    log = getscu(node, tmp_path / "out", "-S", "SERIES", f"StudyInstanceUID={SPECS[0].study_uid}")
    assert received(tmp_path / "out") == {}
    assert statuses(log)[-1] == 0xA900, log[-3000:]


def test_get_no_match_succeeds_empty(node: tuple[Any, int], tmp_path: Path) -> None:
    log = getscu(node, tmp_path / "out", "-S", "STUDY", "StudyInstanceUID=1.2.3.999")
    assert received(tmp_path / "out") == {}
    assert statuses(log) == [0x0000], log[-3000:]


def test_unreadable_file_is_a_failed_sub_operation(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, f"sqlite:///{tmp_path / 'index.db'}")
    specs = [s for s in SPECS if s.series_uid == SPECS[0].series_uid]
    ingest(ctx, [make_dataset(s) for s in specs])
    broken = specs[1].sop_uid
    ctx.store.path(ctx.index.get_instance(broken).file_path).write_bytes(b"not dicom")
    with serve(ctx) as port:
        out = tmp_path / "out"
        log = getscu((ctx, port), out, "-S", "SERIES", f"StudyInstanceUID={specs[0].study_uid}",
                     f"SeriesInstanceUID={specs[0].series_uid}")
        # DCMTK getscu does not print the final response's data set: read the Failed SOP
        # Instance UID List (PS3.4 C.4.3.1.3.1) with a pynetdicom SCU
        final = _pynetdicom_get(port, specs[0].study_uid, specs[0].series_uid)
    assert set(received(out)) == {s.sop_uid for s in specs} - {broken}, log[-3000:]
    assert statuses(log)[-1] == 0xB000, log[-3000:]  # sub-operations complete, one failed
    ev = ctx.ledger.query(event_types=[EventType.RETRIEVE.value])[0].event
    assert ev.payload["service"] == "C-GET" and ev.payload["status"] == 0xB000
    assert ev.payload["failed"] == 1 and ev.payload["completed"] == len(specs) - 1
    assert final[0] == 0xB000
    assert final[1].FailedSOPInstanceUIDList == broken
    ctx.engine.dispose()


def _pynetdicom_get(port: int, study: str, series: str) -> tuple[int, Any]:
    """C-GET with a pynetdicom SCU (SCP role for CT storage); the final (status, identifier)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHNODE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = series
    last: tuple[int, Any] = (-1, None)
    for status, ident in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
        last = (int(status.Status), ident)
    assoc.release()
    return last


def test_ledger_records_get(node: tuple[Any, int], tmp_path: Path) -> None:
    ctx, _ = node
    s0 = SPECS[-1]
    getscu(node, tmp_path / "out", "-S", "SERIES", f"StudyInstanceUID={s0.study_uid}",
           f"SeriesInstanceUID={s0.series_uid}")
    ev = ctx.ledger.query(event_types=[EventType.RETRIEVE.value])[-1].event
    n = sum(1 for s in SPECS if s.series_uid == s0.series_uid)
    assert ev.actor == "ae:GETSCU"
    assert ev.payload["level"] == "SERIES" and ev.payload["sub_operations"] == n
    assert ev.payload["completed"] == n and ev.payload["failed"] == 0 and ev.payload["status"] == 0
    assert ev.subject["study_uid"] == s0.study_uid
    assert sorted(ev.payload["sop_uids"]) == sorted(s.sop_uid for s in SPECS if s.series_uid == s0.series_uid)
    # the ledger's UID index finds the retrieve by instance
    hits = ctx.ledger.query(uids=[s0.sop_uid], event_types=[EventType.RETRIEVE.value])
    assert hits and hits[-1].event.payload == ev.payload


def test_part10_helper_roundtrip() -> None:
    # guards the corpus helper the tests rely on
    ds = make_dataset(SPECS[0])
    assert dcmread(__import__("io").BytesIO(part10(ds))).SOPInstanceUID == SPECS[0].sop_uid
