"""Composition helper: the ledger, its checkpointer and key, wired from settings."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from audit.checkpoint import Checkpoint, Checkpointer, Verifier, load_or_create_key
from audit.ledger import Ledger, LedgerError

log = logging.getLogger(__name__)


@dataclass
class AuditService:
    """What the node needs from the audit package: append API, checkpoints, public key."""

    ledger: Ledger
    checkpointer: Checkpointer
    interval_s: float = 60.0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def verifier(self) -> Verifier:
        return self.checkpointer.verifier

    def checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        return self.checkpointer.checkpoint(force=force)

    def start(self) -> None:
        """Sign a checkpoint every ``interval_s`` seconds in a daemon thread (and at stop)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.checkpointer.checkpoint()
                except LedgerError:
                    log.exception("checkpoint refused")
                except Exception:
                    log.exception("checkpoint failed")

        self._thread = threading.Thread(target=run, name="ledger-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        try:
            self.checkpointer.checkpoint()
        except Exception:
            log.exception("final checkpoint failed")


def open_ledger(
    engine: Engine,
    *,
    key_file: Path,
    checkpoint_file: Path,
    origin: str = "synthnode.local/ledger",
    syslog_target: str | None = None,
    interval_s: float = 60.0,
) -> AuditService:
    """Open the ledger on a migrated database; generate the signing key on first use.

    With :class:`config.settings.Settings` ``s``::

        open_ledger(engine, key_file=s.ledger_key_file, checkpoint_file=s.checkpoint_file,
                    origin=s.audit.origin, syslog_target=s.audit.syslog_target,
                    interval_s=s.audit.checkpoint_interval_s)

    or simply :func:`open_ledger_from_settings`.
    """
    ledger = Ledger(engine)
    key = load_or_create_key(key_file)
    cp = Checkpointer(ledger, key, origin, checkpoint_file, syslog_target)
    return AuditService(ledger, cp, interval_s)


def open_ledger_from_settings(settings, engine: Engine | None = None) -> AuditService:  # type: ignore[no-untyped-def]
    """:func:`open_ledger` with every path and option taken from ``config.settings.Settings``."""
    if engine is None:
        from sqlalchemy import create_engine

        engine = create_engine(settings.database_url)
    return open_ledger(engine, key_file=settings.ledger_key_file,
                       checkpoint_file=settings.checkpoint_file, origin=settings.audit.origin,
                       syslog_target=settings.audit.syslog_target,
                       interval_s=settings.audit.checkpoint_interval_s)
