"""Index writes and reads on SQLite and PostgreSQL (``migrated_db`` is parametrised)."""
from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.exc import IntegrityError

from node.db import make_engine
from storage.index import Index, InstanceRecord


def _rec(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", **kw: object) -> InstanceRecord:
    base = dict(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=series, study_instance_uid=study,
        transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=f"{study}/{series}/{sop}.dcm",
        file_size=100, sha256="ab" * 32, patient_id="P1", patient_name="Doe^Jane",
        modality="CT", study_date="20240101", accession_number="A1",
    )
    base.update(kw)
    return InstanceRecord(**base)  # type: ignore[arg-type]


def test_record_validates() -> None:
    with pytest.raises(ValueError):
        _rec("")
    with pytest.raises(ValueError):
        _rec("1.9", sha256="short")
    with pytest.raises(ValueError):
        _rec("1.9", received_at=datetime(2024, 1, 1))  # naive


def test_add_builds_hierarchy_and_reads_back(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    idx = Index(engine)
    with engine.begin() as conn:
        idx.add_instance(conn, _rec("1.2.3.1.1"))
        idx.add_instance(conn, _rec("1.2.3.1.2", synthetic_data="YES"))
        idx.add_instance(conn, _rec("1.2.3.2.1", series="1.2.3.2", modality="MR"))
    assert idx.count_instances() == 3
    got = idx.get_instance("1.2.3.1.2")
    assert got is not None and got.series_instance_uid == "1.2.3.1" and got.study_instance_uid == "1.2.3"
    assert [i.sop_instance_uid for i in idx.instances(series_instance_uid="1.2.3.1")] == [
        "1.2.3.1.1", "1.2.3.1.2"]
    (study,) = idx.studies()
    assert study.n_series == 2 and study.n_instances == 3 and study.modalities == ("CT", "MR")
    assert study.patient_id == "P1" and study.accession_number == "A1"
    assert idx.references("1.2.3/1.2.3.1/1.2.3.1.1.dcm")
    assert not idx.references("nope.dcm")
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            idx.add_instance(conn, _rec("1.2.3.1.1"))
    assert idx.count_instances() == 3  # the failed transaction left nothing
    engine.dispose()


def test_replace_and_delete(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    idx = Index(engine)
    with engine.begin() as conn:
        idx.add_instance(conn, _rec("1.2.3.1.1"))
    with engine.begin() as conn:
        pk, old = idx.replace_instance(conn, _rec("1.2.3.1.1", file_path="new.dcm", sha256="cd" * 32))
    assert old == "1.2.3/1.2.3.1/1.2.3.1.1.dcm"
    got = idx.get_instance("1.2.3.1.1")
    assert got is not None and got.file_path == "new.dcm" and got.pk == pk
    cutoff = datetime.now(timezone.utc) + timedelta(seconds=1)
    expired = idx.received_before(cutoff)
    assert [e.sop_instance_uid for e in expired] == ["1.2.3.1.1"]
    with engine.begin() as conn:
        idx.delete_instances(conn, [e.pk for e in expired])
    assert idx.count_instances() == 0 and idx.studies() == []
    engine.dispose()


def test_a_series_written_by_an_open_transaction_is_not_taken_from_the_cache(
        migrated_db: str) -> None:
    """Thread A writes a new series and holds its transaction open; thread B indexes the
    next instance of that series meanwhile. B must wait for A's parent rows, not reuse
    A's uncommitted series key from the cache (PostgreSQL's foreign key check refuses a
    row whose parent it cannot see yet)."""
    engine = make_engine(migrated_db)
    idx = Index(engine)
    written, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def a() -> None:
        try:
            with engine.begin() as conn:
                idx.add_instance(conn, _rec("1.2.3.1.1"))
                written.set()
                release.wait(10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            written.set()

    def b() -> None:
        try:
            written.wait(10)
            with engine.begin() as conn:  # waits for A on its parent rows (or SQLite's lock)
                idx.add_instance(conn, _rec("1.2.3.1.2"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start()
    tb.start()
    written.wait(10)
    tb.join(0.5)  # B is blocked on A's transaction (or failed at once)
    release.set()
    ta.join(10)
    tb.join(10)
    assert not errors, errors
    (study,) = idx.studies()
    assert study.n_series == 1 and study.n_instances == 2
    engine.dispose()


def test_concurrent_first_instances_of_one_study(migrated_db: str) -> None:
    """8 threads deliver the first instances of one study/series at once: parent rows are
    created once, every instance lands (INSERT .. ON CONFLICT DO NOTHING)."""
    engine = make_engine(migrated_db)
    idx = Index(engine)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(5):
                with engine.begin() as conn:
                    idx.add_instance(conn, replace(_rec(f"1.2.3.1.{i}.{j}"),
                                                   file_path=f"f{i}.{j}.dcm"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    (study,) = idx.studies()
    assert study.n_series == 1 and study.n_instances == 40
    engine.dispose()
