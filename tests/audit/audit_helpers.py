"""Helpers shared by the audit tests (imported by conftest and test modules)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from audit.events import Event, EventType
from audit.service import AuditService, open_ledger
from node.db import make_engine


@dataclass
class LedgerEnv:
    url: str
    key_file: Path
    checkpoint_file: Path
    service: AuditService

    def reopen(self) -> AuditService:
        return open_ledger(make_engine(self.url), key_file=self.key_file,
                           checkpoint_file=self.checkpoint_file, origin="test.example/ledger")


def make_event(i: int, kind: EventType = EventType.INSTANCE_RECEIVED, **subject: str) -> Event:
    subject = {"study_uid": "1.2.826.0.1.3680043.2.1125.1", "sop_uid": f"1.2.826.0.1.3680043.2.1125.1.{i}",
               **subject}
    return Event(kind, f"ae:MOD{i % 3}", subject=subject, payload={"sha256": f"{i:064x}", "i": i})


