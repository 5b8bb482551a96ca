"""The shared runtime objects of a running node, built once by the composition root
(:mod:`node.app`) and injected into every service module.

Service modules (DIMSE, pipeline, and any HTTP service) receive a :class:`NodeContext`; nothing
reaches for a module-level singleton.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from audit.ledger import Ledger
from audit.service import AuditService
from config.settings import Settings
from storage.derived import DerivedCache
from storage.filestore import FileStore
from storage.index import Index

if TYPE_CHECKING:
    from node.ingest.results import StoredInstance
    from node.patients import PatientRefs

__all__ = ["InFlight", "InstanceStoredHook", "NodeContext"]


#: Called after an instance is durably stored and indexed (after the commit, before the
#: C-STORE response). Must be quick and must not raise; exceptions are logged and
#: swallowed so a hook can never fail a store. The pipeline uses it to (re)start a
#: study's quiet-period timer.
InstanceStoredHook = Callable[["StoredInstance"], None]


class InFlight:
    """Counts operations in progress so shutdown can wait for them (SIGTERM: finish
    in-flight stores, refuse new work)."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    @property
    def count(self) -> int:
        with self._cond:
            return self._n

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._cond:
            self._n += 1
        try:
            yield
        finally:
            with self._cond:
                self._n -= 1
                if self._n == 0:
                    self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is in flight; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout=timeout)


@dataclass
class NodeContext:
    """Runtime objects shared by the node's services.

    Attributes
    ----------
    settings : config.settings.Settings
        Validated settings (read-only by convention).
    engine : sqlalchemy.Engine
        Engine of the migrated index + ledger database.
    store : storage.filestore.FileStore
        Durable file store.
    index : storage.index.Index
        Instance index on ``engine``.
    ledger : audit.ledger.Ledger
        The audit ledger (single writer API).
    logger : logging.Logger
        Node logger (no PHI at INFO).
    on_instance_stored : list of InstanceStoredHook
        Callbacks run after each successful store (see :data:`InstanceStoredHook`).
    stopping : threading.Event
        Set when the node is shutting down: services refuse new work.
    inflight : InFlight
        Stores (and other write operations) in progress.
    audit : audit.service.AuditService or None
        Ledger + checkpointer (signing key from ``settings.ledger_key_file``); None when
        the context was built with a bare ledger (tests of single components).
    patients : node.patients.PatientRefs or None
        Keyed patient digests for ledger events (installed as the ledger's ``annotate``
        hook by :func:`node.app.build_context`); None: events carry no patient reference.
    """

    settings: Settings
    engine: Engine
    store: FileStore
    index: Index
    ledger: Ledger
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("node"))
    on_instance_stored: list[InstanceStoredHook] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    inflight: InFlight = field(default_factory=InFlight)
    audit: AuditService | None = None
    patients: PatientRefs | None = None
    #: node.observability.health.Observability: metrics and readiness probes (None: bare
    #: contexts of component tests)
    observability: Any = None

    def metadata_documents(self) -> DerivedCache:
        """The DICOM JSON metadata documents of stored files (DICOMweb), kept on disk by
        file digest under the settings' cache folder."""
        return DerivedCache(self.settings.cache_dir / "metadata")

    def run_stored_hooks(self, info: StoredInstance) -> None:
        """Run every ``on_instance_stored`` hook; a failing hook is logged, never raised."""
        for hook in list(self.on_instance_stored):
            try:
                hook(info)
            except Exception:
                self.logger.exception("on_instance_stored hook %r failed", hook)
