"""Ledger event vocabulary: the typed record every part of the node appends.

An event is canonicalised to JSON (sorted keys, UTF-8, no floats) to form a Merkle leaf.
No PHI beyond UIDs: a patient is referred to by keyed digests of Patient ID and Accession
Number (``subject.patient``, ``subject.accession``, ``payload.patients``; see
:mod:`audit.patient`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any


class EventType(str, Enum):
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCE_RECEIVED = "instance.received"
    INSTANCE_REJECTED = "instance.rejected"  # bad input: reason + status in payload
    INSTANCE_LEFT_OUT = "instance.left_out"  # stored, but not part of the series' volume
    # indexed, but its file never became durable (a flush failed, or a crash before the
    # success status was sent): removed again; the sender got no success and resends
    INSTANCE_ROLLED_BACK = "instance.rolled_back"
    # received instances removed by the retention period (storage.retention_days), per series
    INSTANCES_EXPIRED = "instance.expired"
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
    OUTPUT_DISCARDED = "output.discarded"  # partial output series of a dead attempt removed
    OUTPUT_RELEASED = "output.released"  # an administrator released a held output
    # the kept slices (pictures) of a held output no one decided on, removed by retention
    OUTPUT_PICTURES_EXPIRED = "output.pictures_expired"
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
    AUDIT_QUERIED = "audit.queried"  # an auditor searched the ledger for a patient
    NODE_STARTED = "node.started"
    NODE_STOPPED = "node.stopped"


class Outcome(str, Enum):
    """PS3.15 A.5 EventOutcomeIndicator semantics."""

    SUCCESS = "success"  # 0
    MINOR_FAILURE = "minor_failure"  # 4
    SERIOUS_FAILURE = "serious_failure"  # 8
    MAJOR_FAILURE = "major_failure"  # 12


@dataclass(frozen=True)
class Event:
    """One ledger record.

    subject  UIDs the event is about: keys among study_uid, series_uid, sop_uid,
             sop_class_uid, job_id, model_id, destination ...; an event that concerns a
             patient also has ``patient`` and ``accession``: keyed digests
             (:class:`audit.patient.PatientDigester`), never the values
    payload  type-specific JSON-able data (ints, strings, bools, lists, dicts; no floats:
             give durations as integer milliseconds or decimal strings)

    Keys the ledger indexes (``audit query`` / ``audit lineage`` follow them; see
    :data:`SUBJECT_REF_KEYS` and :data:`PAYLOAD_REF_KEYS`):

    ``instance.received``  subject study_uid, series_uid, sop_uid, sop_class_uid;
                           payload sha256 (of the stored file), calling_ae, called_ae,
                           transfer_syntax_uid
    every event about one study
                           subject patient, accession (digests, added by the node from
                           the index when the event names a study_uid)
    ``retrieve``           subject study_uid (one study), destination (C-MOVE); payload
                           service, level, keys (names only), study_uids, series_uids,
                           sop_uids, patients (digests), sub-operation counts, status
    ``query``              payload service, level, keys (names only), matches, study_uids
                           / patients of the matches (at most 1000 each), status
    ``study.completed``    subject study_uid; payload series_uids (list)
    ``job.*``              subject job_id, study_uid; payload kind ("engine" /
                           "dispatch"), task, rule (job.queued), seed, attempt / attempts;
                           job.failed adds error (a transient failure is a job.queued with
                           requeued true).
                           Engine job: subject model_id when known (the rule's model from
                           job.queued on; a task default only in job.finished, whose
                           payload also has model_id, model_version, weights_sha256 of the
                           model that ran); payload source_series_uids (list),
                           source_sop_uids (list, optional).
                           Dispatch job: subject series_uid (the series it sends); payload
                           destination, parent_id (the engine job; job.queued)
    ``output.created``     subject job_id, study_uid, series_uid (= the output series),
                           model_id; payload source_series_uids, output_series_uid,
                           output_sop_uids (list), sha256 (list parallel to
                           output_sop_uids, or one digest), watermark_payload (hex string),
                           watermark_max_delta (largest bound used, stored units),
                           watermark_verified (the mark was found in every instance at
                           build; both absent when unmarked), output_format, model_id,
                           model_version, weights_sha256, seed, quality (the gate's
                           statistics, decimal strings)
    ``output.held``        subject job_id, study_uid, model_id; payload
                           source_series_uids, output_index, reasons (list of strings),
                           checks (names of the failed checks, node/pipeline/quality.py), stats
                           (decimal strings); an output refused dispatch because its mark
                           did not verify: subject series_uid too, checks
                           ["watermark_unverified"], dispatch "refused"
    ``output.discarded``   subject job_id, study_uid, series_uid (= the partial output
                           series); payload source_series_uids, sop_uids (the removed
                           instances), attempt (that built it), planned_instances, reason;
                           an administrator's discard (actor user:<name>): reason, and
                           held_outputs or the removed series' sop_uids
    ``instance.rolled_back``  subject study_uid, series_uid, sop_uid; payload reason,
                           file, sha256 (the instance's ``instance.received`` entry stays)
    ``instance.left_out``  subject study_uid, series_uid, sop_uid; payload reason, job_id
                           (when an engine job left it out) or routing (at routing)
    ``output.released``    actor user:<name>; subject job_id (the held job), study_uid;
                           payload source_series_uids, reason, new_job_id, checks
    ``dispatch.*``         subject series_uid (the output series; a list when one send
                           covered several), study_uid, destination, job_id (the dispatch
                           job); payload sop_uids (list), attempt(s), state, acknowledged,
                           error
    ``model.*``            subject model_id; payload version, manifest_sha256, key_id,
                           approver, signature (model.approved), reason (revoked / refused)
    ``key.revoked``        subject key_id; payload approver, reason
    ``checkpoint.signed``  payload size, root_hash (hex)
    ``audit.queried``      subject patient or accession (the digest searched for); payload
                           query ("patient" / "accession"), entries (how many were shown)
    """

    type: EventType
    actor: str  # "ae:STORESCU", "user:alice", "component:dispatch"
    outcome: Outcome = Outcome.SUCCESS
    subject: dict[str, Any] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))


# -- canonical leaf form ----------------------------------------------------------------
#: Subject keys copied into the ledger's UID index.
SUBJECT_REF_KEYS: tuple[str, ...] = (
    "study_uid", "series_uid", "sop_uid", "job_id", "model_id", "destination", "key_id",
    "patient", "accession",
)
#: Payload keys (string or list of strings) copied into the ledger's UID index.
PAYLOAD_REF_KEYS: tuple[str, ...] = (
    "source_series_uids", "source_sop_uids", "source_study_uid", "output_series_uid",
    "output_sop_uids", "sop_uids", "series_uids", "manifest_sha256", "patients",
)

LEAF_VERSION = 1


class CanonicalError(TypeError):
    """A value cannot be put in a ledger leaf (float, bytes, non-string key, ...)."""


def _check(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        raise CanonicalError(f"{where}: floats are not allowed in ledger leaves "
                             "(use integer units or a decimal string)")
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalError(f"{where}: key {k!r} is not a string")
            out[k] = _check(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_check(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CanonicalError(f"{where}: {type(value).__name__} is not JSON-able")


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, no floats (RFC 8785 subset).

    Without floats, Python's ``json`` with sorted keys and compact separators gives the same
    bytes as RFC 8785 JCS except for non-ASCII escaping: we emit raw UTF-8.
    """
    return json.dumps(_check(value, "$"), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def format_time(t: datetime) -> str:
    """UTC time in the one textual form leaves use: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    if t.tzinfo is None:
        raise CanonicalError("event time must be timezone-aware (UTC)")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def event_to_leaf(event: Event) -> bytes:
    """The Merkle leaf data of ``event`` (canonical JSON)."""
    return canonical_json({
        "v": LEAF_VERSION,
        "type": EventType(event.type).value,
        "time": format_time(event.time),
        "actor": event.actor,
        "outcome": Outcome(event.outcome).value,
        "subject": event.subject,
        "payload": event.payload,
    })


def event_from_leaf(data: bytes) -> Event:
    """Parse leaf data back into an :class:`Event` (unknown event types raise ValueError)."""
    obj = json.loads(data.decode("utf-8"))
    return Event(type=EventType(obj["type"]), actor=obj["actor"], outcome=Outcome(obj["outcome"]),
                 subject=obj["subject"], payload=obj["payload"], time=parse_time(obj["time"]))


def event_refs(event: Event) -> list[tuple[str, str]]:
    """``(role, uid)`` pairs of an event for the ledger's UID index."""
    out: list[tuple[str, str]] = []
    for key in SUBJECT_REF_KEYS:
        v = event.subject.get(key)
        if isinstance(v, str) and v:
            out.append((key, v))
    for key in PAYLOAD_REF_KEYS:
        v = event.payload.get(key)
        if isinstance(v, str) and v:
            out.append((key, v))
        elif isinstance(v, list):
            out.extend((key, x) for x in v if isinstance(x, str) and x)
    return [(r, u[:128]) for r, u in dict.fromkeys(out)]
