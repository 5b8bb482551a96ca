"""C-MOVE SCP: DCMTK movescu asks the node to send to a DCMTK storescp configured in
``settings.dimse.move_destinations``; files arrive and equal what is stored. Unknown
destination -> 0xA801; missing unique key -> 0xA900; ledger RETRIEVE events.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from tests.support.dimse import (
    SPECS,
    dcmtk,
    dcmtk_storescp,
    get_port,
    ingest,
    make_ctx,
    make_dataset,
    run_tool,
    serve,
)

from audit.events import EventType

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int, Path]]:
    tmp = tmp_path_factory.mktemp("qrmove")
    dest_dir = tmp / "dest"
    with dcmtk_storescp(dest_dir, "STORESCP") as dest_port:
        ctx = make_ctx(tmp, f"sqlite:///{tmp / 'index.db'}", move_destinations=[
            {"ae_title": "STORESCP", "host": "127.0.0.1", "port": dest_port},
            {"ae_title": "DOWN", "host": "127.0.0.1", "port": get_port()},  # nothing listens
        ])
        ingest(ctx, [make_dataset(s) for s in SPECS])
        with serve(ctx) as port:
            yield ctx, port, dest_dir
        ctx.engine.dispose()


def statuses(log: str) -> list[int]:
    return [int(h, 16) for h in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", log)]


def movescu(setup: tuple[Any, int, Path], dest: str, root: str, level: str, *keys: str) -> str:
    _ctx, port, _ = setup
    args = [dcmtk("movescu"), "-d", root, "-aet", "MOVESCU", "-aec", "SYNTHNODE", "-aem", dest,
            "-k", f"QueryRetrieveLevel={level}"]
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", str(port)]
    return run_tool(args, timeout=120).stdout


def arrived(dest_dir: Path, uids: set[str], timeout: float = 10) -> dict[str, Any]:
    """Files storescp wrote for ``uids`` (waits briefly: storescp writes asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        got = {}
        for p in dest_dir.iterdir():
            if p.is_file():
                try:
                    ds = dcmread(p)
                except Exception:
                    continue
                if str(ds.SOPInstanceUID) in uids:
                    got[str(ds.SOPInstanceUID)] = ds
        if len(got) == len(uids) or time.monotonic() > end:
            return got
        time.sleep(0.1)


def test_move_study_to_storescp(setup: tuple[Any, int, Path]) -> None:
    ctx, _port, dest_dir = setup
    study = SPECS[0].study_uid
    want = {s.sop_uid for s in SPECS if s.study_uid == study}
    log = movescu(setup, "STORESCP", "-S", "STUDY", f"StudyInstanceUID={study}")
    assert statuses(log)[-1] == 0x0000, log[-3000:]
    got = arrived(dest_dir, want)
    assert set(got) == want
    for uid, ds in got.items():
        rec = ctx.index.get_instance(uid)
        assert [e for e in ds] == [e for e in dcmread(ctx.store.path(rec.file_path))]
    ev = ctx.ledger.query(event_types=[EventType.RETRIEVE.value])[-1].event
    assert ev.payload["service"] == "C-MOVE" and ev.subject["destination"] == "STORESCP"
    assert ev.payload["completed"] == len(want) and ev.payload["failed"] == 0


def test_move_series_patient_root(setup: tuple[Any, int, Path]) -> None:
    _ctx, _port, dest_dir = setup
    s = SPECS[-1]
    want = {x.sop_uid for x in SPECS if x.series_uid == s.series_uid}
    log = movescu(setup, "STORESCP", "-P", "SERIES", f"PatientID={s.patient_id}",
                  f"StudyInstanceUID={s.study_uid}", f"SeriesInstanceUID={s.series_uid}")
    assert statuses(log)[-1] == 0x0000, log[-3000:]
    assert set(arrived(dest_dir, want)) == want


def test_move_image_uid_list(setup: tuple[Any, int, Path]) -> None:
    _ctx, _port, dest_dir = setup
    a, b = SPECS[3], SPECS[4]
    log = movescu(setup, "STORESCP", "-S", "IMAGE", f"StudyInstanceUID={a.study_uid}",
                  f"SeriesInstanceUID={a.series_uid}", f"SOPInstanceUID={a.sop_uid}\\{b.sop_uid}")
    assert statuses(log)[-1] == 0x0000, log[-3000:]
    assert "Completed Suboperations       : 2" in log
    assert set(arrived(dest_dir, {a.sop_uid, b.sop_uid})) == {a.sop_uid, b.sop_uid}


def test_unknown_destination_a801(setup: tuple[Any, int, Path]) -> None:
    ctx, _port, _ = setup
    log = movescu(setup, "NOWHERE", "-S", "STUDY", f"StudyInstanceUID={SPECS[0].study_uid}")
    assert statuses(log) == [0xA801], log[-3000:]
    ev = ctx.ledger.query(event_types=[EventType.RETRIEVE.value])[-1].event
    assert ev.payload["status"] == 0xA801 and ev.subject["destination"] == "NOWHERE"


def test_unreachable_destination_fails(setup: tuple[Any, int, Path]) -> None:
    log = movescu(setup, "DOWN", "-S", "STUDY", f"StudyInstanceUID={SPECS[0].study_uid}")
    st = statuses(log)
    assert len(st) == 1 and st[0] >= 0xA000, log[-3000:]  # a failure, nothing pending


def test_missing_unique_key_a900(setup: tuple[Any, int, Path]) -> None:
    log = movescu(setup, "STORESCP", "-S", "STUDY", "PatientID=QR1")
    assert statuses(log) == [0xA900], log[-3000:]


def test_node_serves_after_failures(setup: tuple[Any, int, Path]) -> None:
    movescu(setup, "NOWHERE", "-S", "STUDY", "StudyInstanceUID=1.2.3")
    s = SPECS[5]
    log = movescu(setup, "STORESCP", "-S", "SERIES", f"StudyInstanceUID={s.study_uid}",
                  f"SeriesInstanceUID={s.series_uid}")
    assert statuses(log)[-1] == 0x0000, log[-3000:]
