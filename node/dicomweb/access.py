"""Every QIDO-RS / WADO-RS read becomes a ledger entry: who, what, how many.

Reads are queued and written in batches (one transaction per ``dicomweb.access_flush_s``)
so a viewer's many frame requests do not each wait for a ledger commit. QIDO-RS reads are
``query`` events (ATNA "Query"), WADO-RS reads ``dicomweb.access`` events (ATNA "DICOM
Instances Accessed"); both name the studies they touched (``subject.study_uid`` or
``payload.study_uids``), so the ledger adds the patients' keyed digests and
``synthnode audit patient`` answers "who looked at patient X's images".
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from audit.events import Event, EventType, Outcome
from node.context import NodeContext

__all__ = ["MAX_LISTED", "AccessRecorder"]

log = logging.getLogger(__name__)

#: most UIDs of each kind listed in one event (the count is always exact)
MAX_LISTED = 1000


class AccessRecorder:
    """Queue of access events, flushed to the ledger by a background thread."""

    def __init__(self, ctx: NodeContext, flush_s: float = 1.0):
        self.ctx = ctx
        self.flush_s = flush_s
        self._queue: list[Event] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dicomweb-access",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def record(self, *, actor: str, service: str, kind: str, path: str, address: str,
               studies: list[str], series: list[str] | None = None,
               sops: list[str] | None = None, count: int = 0, status: int = 200,
               extra: dict[str, Any] | None = None) -> None:
        """Queue one read. ``service`` 'QIDO-RS' is a query event, anything else a
        ``dicomweb.access`` event."""
        studies = list(dict.fromkeys(s for s in studies if s))
        subject: dict[str, Any] = {}
        payload: dict[str, Any] = {"service": service, "kind": kind, "method": "GET",
                                   "path": path[:512], "peer": address, "count": count,
                                   "status": status, **(extra or {})}
        if len(studies) == 1:
            subject["study_uid"] = studies[0]
        elif studies:
            payload["study_uids"] = studies[:MAX_LISTED]
        if series:
            payload["series_uids"] = list(dict.fromkeys(series))[:MAX_LISTED]
        if sops:
            payload["sop_uids"] = list(dict.fromkeys(sops))[:MAX_LISTED]
        etype = EventType.QUERY if service == "QIDO-RS" else EventType.DICOMWEB_ACCESS
        outcome = Outcome.SUCCESS if status < 400 else Outcome.MINOR_FAILURE
        ev = Event(type=etype, actor=actor, outcome=outcome, subject=subject, payload=payload)
        with self._lock:
            self._queue.append(ev)
        if self._thread is None:  # not started (tests of single components): write now
            self.flush()

    def flush(self) -> int:
        """Write what is queued; returns once everything queued before the call is in the
        ledger (a flush in progress in the background thread is waited for)."""
        with self._flushing:
            with self._lock:
                batch, self._queue = self._queue, []
            if not batch:
                return 0
            try:
                self.ctx.ledger.append_many(batch)
            except Exception:
                log.exception("could not record %d DICOMweb read(s) in the ledger",
                              len(batch))
                with self._lock:
                    self._queue[:0] = batch  # keep them for the next try
                return 0
            return len(batch)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self.flush()
