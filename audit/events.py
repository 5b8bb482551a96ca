"""Ledger event vocabulary: the typed record every part of the node appends.

An event is canonicalised to JSON (sorted keys, UTF-8, no floats) to form a Merkle leaf.
No PHI beyond UIDs: patient-identifying values go in as digests (see ``phi_digest``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any


class EventType(str, Enum):
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCE_RECEIVED = "instance.received"
    INSTANCE_REJECTED = "instance.rejected"  # bad input: reason + status in payload
    QUERY = "query"
    RETRIEVE = "retrieve"
    STORAGE_COMMITMENT = "storage.commitment"
    DICOMWEB_ACCESS = "dicomweb.access"
    STUDY_COMPLETED = "study.completed"
    STUDY_REOPENED = "study.reopened"
    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_FINISHED = "job.finished"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    OUTPUT_CREATED = "output.created"
    OUTPUT_HELD = "output.held"  # quality gate held an output back
    DISPATCH_ATTEMPTED = "dispatch.attempted"
    DISPATCH_SUCCEEDED = "dispatch.succeeded"
    DISPATCH_FAILED = "dispatch.failed"
    MODEL_APPROVED = "model.approved"
    MODEL_REVOKED = "model.revoked"
    MODEL_REFUSED = "model.refused"
    MODEL_LOADED = "model.loaded"
    KEY_REVOKED = "key.revoked"
    CONFIG_LOADED = "config.loaded"
    CHECKPOINT_SIGNED = "checkpoint.signed"
    VERIFICATION_RUN = "verification.run"
    NODE_STARTED = "node.started"
    NODE_STOPPED = "node.stopped"


class Outcome(str, Enum):
    """PS3.15 A.5 EventOutcomeIndicator semantics."""

    SUCCESS = "success"  # 0
    MINOR_FAILURE = "minor_failure"  # 4
    SERIOUS_FAILURE = "serious_failure"  # 8
    MAJOR_FAILURE = "major_failure"  # 12


def phi_digest(value: str) -> str:
    """Reference a patient-identifying value by digest (never store it in a leaf)."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Event:
    """One ledger record.

    subject  UIDs the event is about: keys among study_uid, series_uid, sop_uid,
             sop_class_uid, job_id, model_id, destination ...
    payload  type-specific JSON-able data (ints, strings, bools, lists, dicts; no floats:
             give durations as integer milliseconds or decimal strings)
    """

    type: EventType
    actor: str  # "ae:STORESCU", "user:alice", "component:dispatch"
    outcome: Outcome = Outcome.SUCCESS
    subject: dict[str, Any] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)
    time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
