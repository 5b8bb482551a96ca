"""Group commit of index rows + ledger entries (node.ingest.ingestor.GroupCommit), on SQLite and
PostgreSQL: every caller returns only after its own instance committed, batches form
under concurrency, and one failing instance does not fail the others in its batch."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from audit.events import Event, EventType
from config.settings import load_settings
from node.app import build_context
from node.ingest.ingestor import GroupCommit
from storage.index import InstanceRecord
from tests.support.dimse import node_settings_dict


def _rec(i: int) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"1.2.9.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid="1.2.9", study_instance_uid="1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"f{i}.dcm", file_size=1,
        sha256="00" * 32)


def _event(rec: InstanceRecord) -> Event:
    return Event(EventType.INSTANCE_RECEIVED, "ae:TEST", subject={"sop_uid": rec.sop_instance_uid})


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Any:
    settings = load_settings(None, **node_settings_dict(tmp_path / "d", 11112,
                                                        database={"url": db_url}))
    c = build_context(settings)
    yield c
    c.engine.dispose()


def test_concurrent_callers_all_commit(ctx: Any) -> None:
    gc = GroupCommit(ctx)
    sizes: list[int] = []
    real_one = gc._one

    def spy(items: list[Any]) -> None:
        sizes.append(len(items))
        real_one(items)

    gc._one = spy  # type: ignore[method-assign]
    entries: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            r = _rec(i)
            entries[i] = gc.commit(r, _event(r))
            # returned => committed: visible from another connection
            assert ctx.index.get_instance(r.sop_instance_uid) is not None
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert ctx.index.count_instances() == 24
    assert sorted(e.seq for e in entries.values()) == sorted({e.seq for e in entries.values()})
    assert sum(sizes) == 24
    print(f"\nbatch sizes: {sizes}")


def test_duplicate_in_a_batch_fails_alone(ctx: Any) -> None:
    gc = GroupCommit(ctx)
    first = _rec(0)
    gc.commit(first, _event(first))
    batch = [_rec(0), _rec(1), _rec(2)]  # the first is a duplicate SOP Instance UID
    from node.ingest.ingestor import _Pending

    pending = [_Pending(r, _event(r)) for r in batch]
    gc._run(pending)
    assert isinstance(pending[0].error, IntegrityError)
    assert pending[1].error is None and pending[2].error is None
    assert all(p.finished for p in pending)
    assert ctx.index.count_instances() == 3
    assert len(ctx.ledger.query(uids=["1.2.9.1", "1.2.9.2"])) == 2
