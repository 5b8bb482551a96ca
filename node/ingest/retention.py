"""Instance retention: received instances older than ``storage.retention_days`` are removed,
each removal recorded in the ledger.

The node runs :class:`InstanceRetention` when the period is set (unset: instances are kept
forever): one pass at start-up, then one every :data:`CHECK_S`. A pass removes the expired
instances oldest first, in batches of at most ``batch``; per batch, the index rows and one
``instance.expired`` ledger entry per series (its SOP Instance UIDs, the cutoff and the
period; the ledger adds the patient digests of the study) are written in one transaction,
then the files and their derived documents (the DICOMweb metadata cache) are removed. A crash
between the commit and the file removals leaves unreferenced files, which start-up recovery
removes (``node.app.recover``); never an index row without its file, never a removal without
its ledger entry.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, select

from audit.events import Event, EventType
from node.context import NodeContext
from storage.index import IndexedInstance
from storage.retention import cutoff_for, expire
from storage.tables import Instance

logger = logging.getLogger(__name__)

__all__ = ["CHECK_S", "InstanceRetention", "expire_instances"]

#: seconds between two retention passes while the node runs
CHECK_S = 3600.0
ACTOR = "component:retention"


def expire_instances(ctx: NodeContext, retention_days: int, *, now: datetime | None = None,
                     batch: int = 1000) -> int:
    """Remove every instance received more than ``retention_days`` before ``now`` (default:
    the current time); returns how many were removed."""
    cutoff = cutoff_for(retention_days, now)

    def record(conn: Connection, rows: list[IndexedInstance]) -> None:
        # before the rows go: the ledger's hook reads the study's patient
        ctx.ledger.append_many(_events(rows, cutoff, retention_days), conn=conn)

    total = 0
    while True:
        rows = expire(ctx.index, ctx.store, cutoff, limit=batch, record=record)
        if not rows:
            break
        _drop_derived(ctx, rows)
        total += len(rows)
        if len(rows) < batch:
            break
    if total:
        logger.info("retention: %d instance(s) received before %s removed (%d day(s))",
                    total, cutoff.isoformat(), retention_days)
    return total


def _events(rows: Sequence[IndexedInstance], cutoff: datetime, retention_days: int
            ) -> list[Event]:
    """One ``instance.expired`` entry per series."""
    series: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        series[(r.study_instance_uid, r.series_instance_uid)].append(r.sop_instance_uid)
    return [Event(type=EventType.INSTANCES_EXPIRED, actor=ACTOR,
                  subject={"study_uid": study, "series_uid": ser},
                  payload={"sop_uids": sops, "instances": len(sops),
                           "received_before": cutoff.isoformat(),
                           "retention_days": retention_days})
            for (study, ser), sops in series.items()]


def _drop_derived(ctx: NodeContext, rows: Sequence[IndexedInstance]) -> None:
    """The DICOMweb metadata documents of the removed files (unless an identical copy is
    still indexed: documents are keyed by file digest)."""
    digests = sorted({r.sha256 for r in rows})
    with ctx.engine.connect() as conn:
        kept = set(conn.execute(select(Instance.sha256).where(
            Instance.sha256.in_(digests))).scalars())
    cache = ctx.metadata_documents()
    for d in digests:
        if d not in kept:
            cache.discard(d)


class InstanceRetention:
    """Runs :func:`expire_instances` at start and every ``interval_s`` on a daemon thread
    (primary node process only)."""

    def __init__(self, ctx: NodeContext, retention_days: int, interval_s: float = CHECK_S):
        self.ctx = ctx
        self.retention_days = retention_days
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="instance-retention",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                expire_instances(self.ctx, self.retention_days)
            except Exception:  # a failed pass is retried at the next one
                logger.exception("instance retention pass failed")
            if self._stop.wait(self.interval_s):
                return
