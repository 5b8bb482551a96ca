"""Retention removes old instances: rows first, then files (SQLite and PostgreSQL)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from node.db import make_engine
from storage.filestore import FileStore
from storage.index import Index, InstanceRecord
from storage.retention import cutoff_for, expire


def test_expire_old_keeps_new(migrated_db: str, tmp_path: Path) -> None:
    engine = make_engine(migrated_db)
    idx, fs = Index(engine), FileStore(tmp_path / "store")
    now = datetime.now(timezone.utc)
    for i, age in enumerate((40, 35, 1)):
        rel = f"s/{i}.dcm"
        stored = fs.write(rel, f"file {i}".encode())
        with engine.begin() as conn:
            idx.add_instance(conn, InstanceRecord(
                sop_instance_uid=f"1.2.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=f"1.3.{i}", study_instance_uid=f"1.4.{i}",
                transfer_syntax_uid="1.2.840.10008.1.2.1", file_path=rel,
                file_size=stored.size, sha256=stored.sha256,
                received_at=now - timedelta(days=age)))
    gone = expire(idx, fs, cutoff_for(30, now))
    assert sorted(g.sop_instance_uid for g in gone) == ["1.2.0", "1.2.1"]
    assert [i.sop_instance_uid for i in idx.instances()] == ["1.2.2"]
    assert list(fs.iter_files()) == ["s/2.dcm"]
    assert [s.study_instance_uid for s in idx.studies()] == ["1.4.2"]
    assert expire(idx, fs, cutoff_for(30, now)) == []
    engine.dispose()


def test_cutoff_validates() -> None:
    with pytest.raises(ValueError):
        cutoff_for(0)
    with pytest.raises(ValueError):
        cutoff_for(1, datetime(2024, 1, 1))
