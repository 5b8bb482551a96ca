"""Liveness and readiness of a node.

``/healthz``: the process answers. ``/readyz``: each registered probe passes: the database
answers a query, the file store's root is writable with more free space than
``storage.min_free_bytes``, the ledger's head reads, the DIMSE listener is bound and its
thread alive, the pipeline's worker threads are alive. Probes are registered by the
composition root (:mod:`node.app`) for the services it starts.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text

from node.observability.metrics import NodeMetrics

if TYPE_CHECKING:
    from node.context import NodeContext

__all__ = ["Check", "Observability"]

#: A probe returns ``(ok, detail)``; an exception counts as failed with its message.
Probe = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail,
                "seconds": round(self.seconds, 4)}


class Observability:
    """Metrics and readiness probes of one node (``ctx.observability``)."""

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        self.metrics = NodeMetrics(ctx)
        self.started = time.time()
        self.probes: dict[str, Probe] = {
            "database": self._database, "store": self._store, "ledger": self._ledger}

    def add_probe(self, name: str, probe: Probe) -> None:
        self.probes[name] = probe

    def ready(self) -> tuple[bool, list[Check], str]:
        """Run every probe; (all passed, the checks, when measured)."""
        measured = datetime.now(UTC).isoformat(timespec="seconds")
        checks = []
        for name, probe in self.probes.items():
            t0 = time.perf_counter()
            try:
                ok, detail = probe()
            except Exception as exc:  # a probe that raises has failed, naming why
                ok, detail = False, f"{type(exc).__name__}: {exc}"[:200]
            checks.append(Check(name, ok, detail, time.perf_counter() - t0))
        return all(c.ok for c in checks), checks, measured

    # default probes -----------------------------------------------------------------------
    def _database(self) -> tuple[bool, str]:
        with self.ctx.engine.connect() as c:
            c.execute(text("SELECT 1"))
        return True, self.ctx.engine.dialect.name

    def _store(self) -> tuple[bool, str]:
        root = self.ctx.store.root
        if not root.is_dir() or not os.access(root, os.W_OK):
            return False, "store root missing or not writable"
        free = shutil.disk_usage(root).free
        need = self.ctx.settings.storage.min_free_bytes
        if free < need:
            return False, f"{free} bytes free, below storage.min_free_bytes {need}"
        return True, f"{free} bytes free"

    def _ledger(self) -> tuple[bool, str]:
        from audit.tables import ledger_head

        with self.ctx.engine.connect() as c:
            size = c.execute(select(ledger_head.c.size)).scalar()
        return True, f"{int(size or 0)} entries"


def dimse_probe(dimse: Any) -> Probe:
    """The DIMSE listener is bound and its accept thread alive."""
    def probe() -> tuple[bool, str]:
        thread = getattr(dimse, "_thread", None)
        try:
            host, port = dimse.address
        except RuntimeError:
            return False, "not listening"
        if thread is None or not thread.is_alive():
            return False, "accept thread stopped"
        return True, f"{host}:{port}"
    return probe


def workers_probe(pipeline: Any) -> Probe:
    """The pipeline's worker threads are alive."""
    def probe() -> tuple[bool, str]:
        threads = list(getattr(pipeline.pool, "_threads", []))
        alive = sum(t.is_alive() for t in threads)
        if getattr(pipeline.pool, "n", 1) == 0:
            return True, "no local workers (jobs run by external workers)"
        if not threads:
            return False, "no worker thread started"
        return alive == len(threads), f"{alive}/{len(threads)} worker threads alive"
    return probe
