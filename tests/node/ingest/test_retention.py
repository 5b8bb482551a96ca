"""Instance retention (``storage.retention_days``) runs in the node: expired instances leave
the index, the store and the metadata cache, each series' removal recorded in the ledger
(with the study's patient digest); newer instances stay; the ledger still verifies."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

from sqlalchemy import update

from audit.events import EventType
from audit.verify import verify_database
from config.settings import load_settings
from node.app import create_node
from node.ingest.ingestor import Ingestor
from storage.derived import DerivedCache
from storage.tables import Instance
from tests.support.dimse import node_settings_dict
from tests.support.factory import make_series
from tests.support.net import get_port


def _send(ing: Ingestor, datasets: list) -> list[str]:  # type: ignore[type-arg]
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest_part10(buf.getvalue(), calling_ae="CT", called_ae="SYNTHNODE",
                          source="dimse")
    return [str(ds.SOPInstanceUID) for ds in datasets]


def test_node_removes_expired_instances_with_ledger_entries(tmp_path: Path) -> None:
    settings = load_settings(None, **node_settings_dict(tmp_path / "n", get_port(),
                                                        storage={"retention_days": 7}))
    node = create_node(settings)
    node.start()
    assert node.retention is not None
    ctx = node.ctx
    old_a = _send(Ingestor(ctx), make_series(2, rows=32, cols=32))
    old_b = _send(Ingestor(ctx), make_series(1, rows=32, cols=32))
    new = _send(Ingestor(ctx), make_series(2, rows=32, cols=32))
    expired = old_a + old_b
    rows = {i.sop_instance_uid: i for i in ctx.index.instances()}
    with ctx.engine.begin() as conn:  # received ten days ago
        conn.execute(update(Instance).where(Instance.sop_instance_uid.in_(expired))
                     .values(received_at=datetime.now(UTC) - timedelta(days=10)))
    cache = DerivedCache(settings.cache_dir / "metadata")
    cache.put(rows[old_a[0]].sha256, b"{}")  # a DICOMweb metadata document of one of them
    cache.put(rows[new[0]].sha256, b"{}")
    node.stop(grace_s=5)

    again = create_node(settings)  # a pass runs at start-up
    again.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(again.ctx.index.instances()) != len(new):
            time.sleep(0.2)
        left = sorted(i.sop_instance_uid for i in again.ctx.index.instances())
        assert left == sorted(new)
        for sop in expired:
            assert not again.ctx.store.exists(rows[sop].file_path)
        assert all(again.ctx.store.exists(rows[s].file_path) for s in new)
        assert cache.get(rows[old_a[0]].sha256) is None
        assert cache.get(rows[new[0]].sha256) == b"{}"
        events = [e.event for e in again.ctx.ledger.entries()
                  if e.event.type == EventType.INSTANCES_EXPIRED]
        assert len(events) == 2  # one per series
        by_series = {e.subject["series_uid"]: e for e in events}
        assert sorted(by_series[rows[old_a[0]].series_instance_uid].payload["sop_uids"]) == \
            sorted(old_a)
        assert by_series[rows[old_b[0]].series_instance_uid].payload["sop_uids"] == old_b
        for e in events:
            assert e.actor == "component:retention"
            assert e.payload["retention_days"] == 7
            assert e.subject.get("patient")  # the study's patient digest, for the auditor
        assert again.ctx.audit is not None
        report = verify_database(again.ctx.engine, again.ctx.audit.verifier, deep=True)
        assert report.ok, report.problems
    finally:
        again.stop(grace_s=5)


def test_no_retention_without_a_period(tmp_path: Path) -> None:
    settings = load_settings(None, **node_settings_dict(tmp_path / "n", get_port()))
    node = create_node(settings)
    node.start()
    try:
        assert node.retention is None
    finally:
        node.stop(grace_s=5)
