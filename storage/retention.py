"""Retention: remove instances received before a cutoff (``storage.retention_days``).

Index rows go first, in one transaction; files after the commit. A crash in between
leaves unreferenced files, which start-up recovery removes (``node.app.recover``), never
an index row without its file. The caller records what was removed in the ledger, in the
same transaction (``record``; node.ingest.retention); storage knows no ledger.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection

from storage.filestore import FileStore
from storage.index import Index, IndexedInstance

logger = logging.getLogger(__name__)

__all__ = ["cutoff_for", "expire"]


def cutoff_for(retention_days: int, now: datetime | None = None) -> datetime:
    """The received-before cutoff for a retention period in days."""
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1, got {retention_days}")
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now - timedelta(days=retention_days)


def expire(index: Index, store: FileStore, cutoff: datetime, *, limit: int = 1000,
           record: Callable[[Connection, list[IndexedInstance]], object] | None = None
           ) -> list[IndexedInstance]:
    """Delete up to ``limit`` instances received before ``cutoff`` (oldest first); empty
    series and studies go with them. ``record`` is called in the deleting transaction, before
    the rows go (the node writes its ledger entries there). Returns what was removed."""
    rows = index.received_before(cutoff, limit=limit)
    if not rows:
        return []
    with index.engine.begin() as conn:
        if record is not None:
            record(conn, rows)
        index.delete_instances(conn, [r.pk for r in rows])
    for r in rows:
        try:
            store.delete(r.file_path)
        except Exception:  # the row is gone: recovery removes the file at next start
            logger.exception("could not remove expired file %s", r.file_path)
    return rows
