"""Overlapped durability (node.ingest.ingestor, storage.filestore.FileStore.write_async) on
SQLite and PostgreSQL: an instance is indexed with a landing row while its file's flushes
run; the row goes once they are confirmed; start-up recovery keeps a complete landed file
and rolls back an incomplete one (never acknowledged), with a ledger entry; a failed
flush refuses the instance and takes it out of the index again."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

import storage.filestore as filestore
from config.settings import load_settings
from node.app import build_context, recover
from node.ingest.ingestor import Ingestor
from node.ingest.results import IngestError, RejectReason
from storage.filestore import FileStore
from tests.support.dimse import node_settings_dict
from tests.support.net import get_port

FILES = [Path(get_testdata_file(f)) for f in ("CT_small.dcm", "MR_small.dcm")]


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Any:
    settings = load_settings(None, **node_settings_dict(tmp_path / "d", get_port(),
                                                        database={"url": db_url}))
    c = build_context(settings)
    yield c
    c.ledger.close()
    c.engine.dispose()


def _landing(ctx: Any) -> set[str]:
    return {row[1] for row in ctx.index.landing()}


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_landing_row_until_the_next_transaction_confirms(ctx: Any) -> None:
    ing = Ingestor(ctx)
    first = ing.ingest_part10(FILES[0].read_bytes(), calling_ae="CT01")
    # acknowledged => durable; the landing row is only removed by the next transaction
    assert _landing(ctx) == {_sop(FILES[0])}
    assert ctx.store.sha256(first.record.file_path) == first.record.sha256
    ing.ingest_part10(FILES[1].read_bytes(), calling_ae="CT01")
    assert _landing(ctx) == {_sop(FILES[1])}


def test_recovery_keeps_complete_and_rolls_back_incomplete(ctx: Any) -> None:
    ing = Ingestor(ctx)
    a = ing.ingest_part10(FILES[0].read_bytes(), calling_ae="CT01")
    b = ing.ingest_part10(FILES[1].read_bytes(), calling_ae="CT01")
    # as a crash would leave it: both indexed, neither confirmed, b's data cut short
    with ctx.engine.begin() as conn:
        ctx.index.add_landing(conn, a.record)
    path_b = ctx.store.path(b.record.file_path)
    path_b.write_bytes(path_b.read_bytes()[:1000])
    report = recover(ctx)
    assert report.landing_confirmed == 1
    assert report.rolled_back == (b.record.sop_instance_uid,)
    assert ctx.index.get_instance(a.record.sop_instance_uid) is not None
    assert ctx.index.get_instance(b.record.sop_instance_uid) is None
    assert not path_b.exists()
    assert _landing(ctx) == set()
    rolled = [e.event for e in ctx.ledger.query(event_types=["instance.rolled_back"])]
    assert [e.subject["sop_uid"] for e in rolled] == [b.record.sop_instance_uid]
    assert rolled[0].payload["sha256"] == b.record.sha256
    # the sender resends (it never got a success): stored again
    again = ing.ingest_part10(FILES[1].read_bytes(), calling_ae="CT01")
    assert ctx.store.sha256(again.record.file_path) == again.record.sha256


def test_failed_flush_refuses_and_unindexes(ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ing = Ingestor(ctx)
    real = filestore._fsync_close

    def failing(fd: int) -> None:  # fault injection: the disk reports an I/O error
        os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(filestore, "_fsync_close", failing)
    with pytest.raises(IngestError) as err:
        ing.ingest_part10(FILES[0].read_bytes(), calling_ae="CT01")
    assert err.value.reason == RejectReason.STORE_FAILED
    sop = _sop(FILES[0])
    assert ctx.index.get_instance(sop) is None
    assert _landing(ctx) == set()
    assert [e.event.subject["sop_uid"] for e in
            ctx.ledger.query(event_types=["instance.rolled_back"])] == [sop]
    monkeypatch.setattr(filestore, "_fsync_close", real)
    stored = ing.ingest_part10(FILES[0].read_bytes(), calling_ae="CT01")
    assert ctx.index.get_instance(sop) is not None
    assert ctx.store.sha256(stored.record.file_path) == stored.record.sha256


def test_write_async_existing_name_replaced_atomically(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    first = store.write_async("a/b/c.dcm", b"x" * 100).wait()
    assert first.size == 100
    # the same name again (an identical object sent twice at once): made durable first,
    # then replaced; no temp file left
    second = store.write_async("a/b/c.dcm", b"y" * 50).wait()
    assert store.read("a/b/c.dcm") == b"y" * 50 and second.size == 50
    assert os.listdir(store.temp_dir) == []
