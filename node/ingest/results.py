"""What ingest returns and raises: outcomes, refusal reasons, the stored-instance record.

Kept apart from :mod:`node.ingest.ingestor` so that :mod:`node.context` (whose hooks
receive a :class:`StoredInstance`) does not import the ingestor that imports it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from storage.index import InstanceRecord

__all__ = ["IngestError", "IngestOutcome", "RejectReason", "StoredInstance"]


class RejectReason(str, Enum):
    """Why an object was not stored (the transport maps each to a status)."""

    UNPARSEABLE = "unparseable"  # encoding broken or truncated
    MISSING_ATTRIBUTE = "missing_attribute"  # a Type 1 key of every storage IOD is absent
    SOP_CLASS_MISMATCH = "sop_class_mismatch"  # data set contradicts its SOP class
    DUPLICATE_CONFLICT = "duplicate_conflict"  # same SOP Instance UID, other content
    INVALID_UID = "invalid_uid"  # a key UID breaks PS3.5 9.1 (e.g. a path-like "UID")
    PIXEL_DATA_MISMATCH = "pixel_data_mismatch"  # Pixel Data does not fit the pixel module
    TRANSFER_SYNTAX_MISMATCH = "transfer_syntax_mismatch"  # bytes contradict the syntax
    TOO_LARGE = "too_large"  # over an ingest limit ([ingest] settings)
    PATIENT_CONFLICT = "patient_conflict"  # study / series stored under another patient
    OUT_OF_SPACE = "out_of_space"
    STORE_FAILED = "store_failed"  # file system or index error


class IngestOutcome(str, Enum):
    STORED = "stored"
    IDENTICAL_DUPLICATE = "identical_duplicate"  # stored once, success again
    REPLACED = "replaced"  # duplicate_policy = replace
    KEPT_FIRST = "kept_first"  # duplicate_policy = keep_first: the new object discarded


class IngestError(Exception):
    """The object was refused. ``comment`` is safe to send to the peer (no PHI)."""

    def __init__(self, reason: RejectReason, comment: str):
        super().__init__(f"{reason.value}: {comment}")
        self.reason = reason
        self.comment = comment



@dataclass(frozen=True)
class StoredInstance:
    """What ``on_instance_stored`` hooks and callers learn about an ingested object."""

    outcome: IngestOutcome
    record: InstanceRecord
    ledger_entry: Any = None  # audit.ledger.LedgerEntry (seq, leaf_hash)

    @property
    def sop_instance_uid(self) -> str:
        return self.record.sop_instance_uid

    @property
    def study_instance_uid(self) -> str:
        return self.record.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.record.series_instance_uid
