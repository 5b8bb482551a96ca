"""Query/Retrieve SCP: C-FIND, C-GET and C-MOVE, Patient Root and Study Root (PS3.4 C).

A DIMSE service module (see :mod:`node.dimse.server`): :func:`contexts` declares the
Query/Retrieve information models and SCP/SCU role selection on the storage SOP classes
(C-GET sends its C-STORE sub-operations on the requesting association, PS3.4 C.4.3.3),
:func:`handlers` binds the event handlers.

Matching is :mod:`storage.matching` (PS3.4 C.2.2.2), shared with QIDO-RS. Behaviour:

* C-FIND: one Pending response per match (``FF01`` when a requested optional key is not
  supported by the index, ``FF00`` otherwise), then Success; Cancel answers ``FE00`` and
  stops. Matching on keys of the query level and the levels above it is accepted.
  ``PATIENT`` level is valid only for Patient Root (``A900`` otherwise).
* C-GET / C-MOVE: the identifier must carry the query level's unique key (``A900``
  otherwise). Each matched instance is one C-STORE sub-operation; an instance whose file
  cannot be read is counted as a failed sub-operation (its UID goes to Failed SOP Instance
  UID List). C-MOVE destinations come from ``settings.dimse.move_destinations``; an
  unknown one answers ``A801``.
* After any failure the handler yields nothing more (PS3.4 C.4.1.3.1: a failure response is
  the last response).

Every operation writes one ledger event (QUERY / RETRIEVE) with the query keys (names
only, never values: they carry PHI), the level, match / sub-operation counts and status; a
retrieve also lists the study, series and SOP Instance UIDs it returned (so lineage finds
the retrievals of a synthetic series) and, through the ledger's patient hook, the keyed
digests of their patients; a C-FIND lists the patient digests of its first matches.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from audit.events import Event, EventType, Outcome
from node.context import NodeContext
from node.dimse.status import Category, General, QueryRetrieve, category, status_dataset
from storage.matching import InvalidQuery, QueryLevel, build_query, run
from storage.query import InstanceRef, patient_studies, retrieve_set

log = logging.getLogger(__name__)

__all__ = ["QueryRoot", "contexts", "handle_find", "handle_get", "handle_move", "handlers"]


class QueryRoot(str, Enum):
    """Query/Retrieve information model (PS3.4 C.6.1 Patient Root, C.6.2 Study Root)."""

    PATIENT = "patient"
    STUDY = "study"


FIND_MODELS: dict[str, QueryRoot] = {
    PatientRootQueryRetrieveInformationModelFind: QueryRoot.PATIENT,
    StudyRootQueryRetrieveInformationModelFind: QueryRoot.STUDY,
}
GET_MODELS: dict[str, QueryRoot] = {
    PatientRootQueryRetrieveInformationModelGet: QueryRoot.PATIENT,
    StudyRootQueryRetrieveInformationModelGet: QueryRoot.STUDY,
}
MOVE_MODELS: dict[str, QueryRoot] = {
    PatientRootQueryRetrieveInformationModelMove: QueryRoot.PATIENT,
    StudyRootQueryRetrieveInformationModelMove: QueryRoot.STUDY,
}

#: Levels each information model allows (PS3.4 C.6.1.1.1, C.6.2.1.1).
LEVELS: dict[QueryRoot, tuple[QueryLevel, ...]] = {
    QueryRoot.PATIENT: (QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE),
    QueryRoot.STUDY: (QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE),
}

#: Identifier elements that are not matching keys.
_NON_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
#: Return keys the SCP answers itself (PS3.4 C.4.1.1.3.2, C.6.1.1.x).
_SCP_ANSWERED = {"RetrieveAETitle", "InstanceAvailability"}

# Transfer syntaxes of the Q/R information models themselves.
_QR_TRANSFER_SYNTAXES: list[str | UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
]


def contexts(ctx: NodeContext) -> list[PresentationContext]:
    """Q/R models as SCP, and role selection on storage SOP classes for C-GET."""
    out = [
        build_context(uid, _QR_TRANSFER_SYNTAXES)
        for uid in (*FIND_MODELS, *GET_MODELS, *MOVE_MODELS)
    ]
    for cx in AllStoragePresentationContexts:
        # The requestor of a C-GET proposes SCP role on storage SOP classes; we accept both
        # roles (PS3.7 D.3.3.4). Transfer syntaxes are merged with the C-STORE SCP's.
        assert cx.abstract_syntax is not None  # each of pynetdicom's storage contexts has one
        role = build_context(cx.abstract_syntax, list(cx.transfer_syntax))
        role.scu_role = True
        role.scp_role = True
        out.append(role)
    return out


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Callable[..., Any]]]:
    return [
        (evt.EVT_C_FIND, partial(handle_find, ctx)),
        (evt.EVT_C_GET, partial(handle_get, ctx)),
        (evt.EVT_C_MOVE, partial(handle_move, ctx)),
    ]


# --------------------------------------------------------------------------------------------
# Identifier <-> keys
# --------------------------------------------------------------------------------------------
class BadIdentifier(ValueError):
    """The identifier does not fit the SOP class (answered 0xA900)."""


@dataclass
class ParsedIdentifier:
    level: QueryLevel
    keys: dict[str, Any]
    # requested elements the matcher cannot name: (tag, VR) answered zero-length
    opaque: list[tuple[int, str]] = field(default_factory=list)
    scp_answered: list[str] = field(default_factory=list)


def _value(elem: Any) -> Any:
    if elem.VR == "SQ":
        return None
    v = elem.value
    if v is None:
        return ""
    if isinstance(v, (list, MultiValue)):
        return [str(x) for x in v]
    if isinstance(v, bytes):
        return None
    return str(v) if not isinstance(v, int) else v


def parse_identifier(identifier: Dataset, root: QueryRoot) -> ParsedIdentifier:
    """Query level and ``{keyword: value}`` from a C-FIND/C-GET/C-MOVE identifier."""
    raw_level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = QueryLevel(raw_level)
    except ValueError:
        raise BadIdentifier(f"Query/Retrieve Level {raw_level!r} is not valid") from None
    if level not in LEVELS[root]:
        raise BadIdentifier(f"level {level.value} is not in the {root.value} root model")
    out = ParsedIdentifier(level, {})
    for elem in identifier:
        kw = elem.keyword
        if kw in _NON_KEYS or elem.tag.group == 0x0002:
            continue
        if kw in _SCP_ANSWERED:
            out.scp_answered.append(kw)
            continue
        if not kw or elem.VR == "SQ" or elem.tag.is_private:
            out.opaque.append((int(elem.tag), elem.VR))
            continue
        out.keys[kw] = _value(elem)
    return out


def _response(ctx: NodeContext, parsed: ParsedIdentifier, match: dict[str, Any]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = parsed.level.value
    non_ascii = False
    for kw, value in match.items():
        tag = tag_for_keyword(kw)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        if value is None or value == []:
            ds.add_new(tag, vr, [] if vr == "SQ" else None)
            continue
        if isinstance(value, list):
            value = [str(v) for v in value]
            non_ascii |= any(not v.isascii() for v in value)
        elif isinstance(value, str):
            non_ascii |= not value.isascii()
        elif vr == "IS":
            value = str(value)
        ds.add_new(tag, vr, value)
    for kw in parsed.scp_answered:
        if kw == "RetrieveAETitle":
            ds.RetrieveAETitle = ctx.settings.dimse.ae_title
        elif kw == "InstanceAvailability":
            ds.InstanceAvailability = "ONLINE"
    for tag, vr in parsed.opaque:
        ds.add_new(tag, vr, [] if vr == "SQ" else None)
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


# --------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------
def _calling_ae(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:  # pragma: no cover - defensive: event without association
        return "?"


def _outcome(code: int) -> Outcome:
    cat = category(code)
    if cat in (Category.SUCCESS, Category.PENDING, Category.CANCEL):
        return Outcome.SUCCESS
    if cat is Category.WARNING:
        return Outcome.MINOR_FAILURE
    return Outcome.SERIOUS_FAILURE


def _ledger_reason(exc: Exception) -> str:
    """A failure reason for the ledger without the offending value (it may be PHI)."""
    if isinstance(exc, InvalidQuery):
        return f"{exc.keyword}: invalid value" if exc.keyword else "invalid query"
    return str(exc)


def _record(ctx: NodeContext, ev: Event) -> None:
    try:
        ctx.ledger.append(ev)
    except Exception:
        log.exception("ledger append failed for %s", ev.type.value)


@dataclass
class _Matched:
    """Whose records a C-FIND returned: the studies (or, at PATIENT level, the Patient IDs)
    of its first :data:`MAX_AUDITED` matches, for the ledger's keyed patient digests (so an
    auditor can ask who was shown patient X in a query result)."""

    studies: set[str] = field(default_factory=set)
    patient_ids: set[str] = field(default_factory=set)

    def note(self, match: dict[str, Any]) -> None:
        if len(self.studies) + len(self.patient_ids) >= MAX_AUDITED:
            return
        study = match.get("StudyInstanceUID")
        if isinstance(study, str) and study:
            self.studies.add(study)
        elif isinstance(match.get("PatientID"), str):
            self.patient_ids.add(match["PatientID"])

    def patients(self, ctx: NodeContext) -> dict[str, Any]:
        """``{"patients": [digests]}`` (empty when nothing matched or no digests are kept)."""
        refs = ctx.patients
        if refs is None or not (self.studies or self.patient_ids):
            return {}
        try:
            digests = {d["patient"] for d in refs.for_studies(sorted(self.studies)).values()
                       if d.get("patient")}
            if self.patient_ids:
                with ctx.engine.connect() as conn:
                    for pid in sorted(self.patient_ids):
                        issuers = {i for i, _ in patient_studies(conn, pid)} or {""}
                        digests.update(d for i in issuers if (d := refs.digester.patient(pid, i)))
        except Exception:
            log.exception("could not digest the patients of a C-FIND")
            return {}
        return {"patients": sorted(digests)} if digests else {}


#: Most matches of one C-FIND whose patients the ledger records.
MAX_AUDITED = 1000


# --------------------------------------------------------------------------------------------
# C-FIND
# --------------------------------------------------------------------------------------------
def handle_find(
    ctx: NodeContext, event: Any
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND handler (PS3.4 C.4.1.3.1). Yields ``(status, identifier)`` pairs (a status
    is a code or, with a comment, a status Dataset)."""
    started = time.monotonic()
    model = str(event.request.AffectedSOPClassUID)
    root = FIND_MODELS.get(model)
    status: int = General.SUCCESS
    matches = 0
    seen = _Matched()
    reason = ""
    parsed: ParsedIdentifier | None = None
    try:
        if root is None:
            status, reason = QueryRetrieve.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "not a C-FIND model"
            yield status_dataset(status, reason), None
            return
        try:
            parsed = parse_identifier(event.identifier, root)
            query = build_query(parsed.level, parsed.keys)
        except (BadIdentifier, InvalidQuery) as exc:
            status = QueryRetrieve.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
            reason = _ledger_reason(exc)
            yield status_dataset(status, str(exc)), None  # the peer sees its own value
            return
        except Exception as exc:  # undecodable identifier
            log.warning("C-FIND identifier not understood: %s", type(exc).__name__)
            status, reason = QueryRetrieve.UNABLE_TO_PROCESS, "identifier not understood"
            yield status_dataset(status, reason), None
            return
        pending = (
            QueryRetrieve.PENDING_WARNING
            if (query.unsupported or parsed.opaque) else QueryRetrieve.PENDING
        )
        try:
            with ctx.engine.connect() as conn:
                for match in run(conn, query):
                    if event.is_cancelled:
                        status = General.CANCEL
                        yield status, None
                        return
                    matches += 1
                    seen.note(match)
                    yield pending, _response(ctx, parsed, match)
        except GeneratorExit:
            raise
        except Exception:
            log.exception("C-FIND failed after %d matches", matches)
            status, reason = QueryRetrieve.UNABLE_TO_PROCESS, "index query failed"
            yield status_dataset(status, reason), None
            return
        status = General.SUCCESS
        yield status, None
    finally:
        _record(ctx, Event(
            type=EventType.QUERY,
            actor=f"ae:{_calling_ae(event)}",
            outcome=_outcome(int(status)),
            subject={"sop_class_uid": model},
            payload={
                "service": "C-FIND",
                "level": parsed.level.value if parsed else None,
                "keys": sorted(parsed.keys) if parsed else [],
                "matches": matches,
                "status": int(status),
                "reason": reason,
                "duration_ms": int((time.monotonic() - started) * 1000),
                **seen.patients(ctx),
            },
        ))


# --------------------------------------------------------------------------------------------
# C-GET / C-MOVE
# --------------------------------------------------------------------------------------------
def _unreadable(ref: InstanceRef) -> Dataset:
    """A stand-in whose C-STORE sub-operation fails before anything is sent.

    pynetdicom counts a sub-operation as failed when ``send_c_store`` raises, and lists the
    yielded dataset's SOP Instance UID in Failed SOP Instance UID List (PS3.4 C.4.2.1.4.2);
    a dataset without SOP Class UID makes it raise without touching the network.
    """
    ds = Dataset()
    ds.SOPInstanceUID = ref.sop_instance_uid
    return ds


def _load(ctx: NodeContext, ref: InstanceRef) -> Dataset:
    try:
        return dcmread(ctx.store.path(ref.file_path))
    except Exception as exc:
        log.error("stored file for a retrieve cannot be read (%s): %s",
                  type(exc).__name__, ref.file_path)
        return _unreadable(ref)


@dataclass
class _RetrieveLog:
    """Writes the RETRIEVE ledger event when the final C-GET/C-MOVE response is sent.

    Bound to EVT_DIMSE_SENT on the requesting association for the duration of one
    request: the final response (with the sub-operation counts pynetdicom computed) is
    sent after the handler's generator is exhausted, so only this hook sees it.
    """

    ctx: NodeContext
    service: str
    msg_id: int
    actor: str
    subject: dict[str, Any]
    payload: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    done: bool = False

    def __call__(self, event: Any) -> None:
        if self.done:
            return
        msg = event.message  # a pynetdicom.dimse_messages.DIMSEMessage
        if type(msg).__name__ not in ("C_GET_RSP", "C_MOVE_RSP"):
            return
        cmd = msg.command_set
        if cmd.get("MessageIDBeingRespondedTo") != self.msg_id:
            return
        status = cmd.get("Status")
        if status is None or category(int(status)) is Category.PENDING:
            return
        self.done = True
        self.payload.update(
            status=int(status),
            completed=int(cmd.get("NumberOfCompletedSuboperations") or 0),
            failed=int(cmd.get("NumberOfFailedSuboperations") or 0),
            warning=int(cmd.get("NumberOfWarningSuboperations") or 0),
            duration_ms=int((time.monotonic() - self.started) * 1000),
        )
        _record(self.ctx, Event(
            type=EventType.RETRIEVE, actor=self.actor, outcome=_outcome(int(status)),
            subject=self.subject, payload=self.payload,
        ))

    def record_now(self, status: int, reason: str) -> None:
        """For responses the hook cannot see coming (no association any more)."""
        if self.done:
            return
        self.done = True
        self.payload.update(status=int(status), reason=reason,
                            duration_ms=int((time.monotonic() - self.started) * 1000))
        _record(self.ctx, Event(
            type=EventType.RETRIEVE, actor=self.actor, outcome=_outcome(int(status)),
            subject=self.subject, payload=self.payload,
        ))


def _resolve(
    ctx: NodeContext, event: Any, models: dict[str, QueryRoot], service: str,
    extra: dict[str, Any],
) -> tuple[list[InstanceRef] | None, int, str, _RetrieveLog]:
    """Common start of C-GET / C-MOVE: parse, match; (refs, status, reason, log hook)."""
    model = str(event.request.AffectedSOPClassUID)
    hook = _RetrieveLog(
        ctx, service, int(event.request.MessageID), f"ae:{_calling_ae(event)}",
        {"sop_class_uid": model}, {"service": service, **extra},
    )
    event.assoc.bind(evt.EVT_DIMSE_SENT, hook)
    root = models.get(model)
    if root is None:
        return (
            None,
            QueryRetrieve.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            f"not a {service} model",
            hook,
        )
    try:
        parsed = parse_identifier(event.identifier, root)
        hook.payload["level"] = parsed.level.value
        hook.payload["keys"] = sorted(parsed.keys)
        with ctx.engine.connect() as conn:
            refs = retrieve_set(conn, parsed.level, parsed.keys)
    except (BadIdentifier, InvalidQuery) as exc:
        hook.payload["reason"] = _ledger_reason(exc)
        return None, QueryRetrieve.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc), hook
    except Exception:
        log.exception("%s matching failed", service)
        return None, QueryRetrieve.UNABLE_TO_PROCESS, "index query failed", hook
    studies = sorted({r.study_instance_uid for r in refs})
    if len(studies) == 1:
        hook.subject["study_uid"] = studies[0]  # indexed by the ledger
    hook.payload["study_uids"] = studies
    # indexed: which series (lineage finds retrievals of a synthetic series) and instances
    hook.payload["series_uids"] = sorted({r.series_instance_uid for r in refs})
    hook.payload["sop_uids"] = [r.sop_instance_uid for r in refs]
    hook.payload["sub_operations"] = len(refs)
    return refs, General.SUCCESS, "", hook


def _sub_operations(
    ctx: NodeContext, event: Any, refs: list[InstanceRef], hook: _RetrieveLog,
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """The pending yields shared by C-GET and C-MOVE; stops at cancel."""
    for ref in refs:
        if event.is_cancelled:
            yield General.CANCEL, None
            return
        if ctx.stopping.is_set():
            status = QueryRetrieve.UNABLE_TO_PERFORM_SUB_OPERATIONS
            yield status_dataset(status, "node shutting down"), None
            return
        yield QueryRetrieve.PENDING, _load(ctx, ref)


def handle_get(ctx: NodeContext, event: Any) -> Iterator[Any]:
    """EVT_C_GET handler (PS3.4 C.4.3.3): number of sub-operations, then datasets."""
    refs, status, reason, hook = _resolve(ctx, event, GET_MODELS, "C-GET", {})
    if refs is None:
        yield 1  # pynetdicom needs a count before the first status
        yield status_dataset(status, reason), None
        return
    yield len(refs)
    yield from _sub_operations(ctx, event, refs, hook)


def _move_contexts(refs: list[InstanceRef]) -> list[PresentationContext]:
    """Storage contexts to propose to the move destination: each stored SOP class with its
    stored transfer syntax(es), plus the uncompressed ones pynetdicom can convert to."""
    by_class: dict[str, list[str]] = {}
    for r in refs:
        tss = by_class.setdefault(r.sop_class_uid, [])
        if r.transfer_syntax_uid not in tss:
            tss.append(r.transfer_syntax_uid)
    out = []
    for sop_class, tss in by_class.items():
        if not any(UID(ts).is_compressed for ts in tss):
            for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if ts not in tss:
                    tss.append(ts)
        out.append(build_context(sop_class, tss))
    return out


def handle_move(ctx: NodeContext, event: Any) -> Iterator[Any]:
    """EVT_C_MOVE handler (PS3.4 C.4.2.3): destination, number of sub-operations, datasets."""
    dest_ae = str(event.move_destination or "").strip()
    refs, status, reason, hook = _resolve(
        ctx, event, MOVE_MODELS, "C-MOVE", {"destination": dest_ae}
    )
    hook.subject["destination"] = dest_ae
    dest = next((d for d in ctx.settings.dimse.move_destinations if d.ae_title == dest_ae), None)
    if dest is None:
        # pynetdicom answers 0xA801 (Move Destination unknown) for (None, None)
        hook.record_now(QueryRetrieve.MOVE_DESTINATION_UNKNOWN, "move destination unknown")
        yield None, None
        return
    if refs is not None and len(_move_contexts(refs)) > 128:
        refs, status = None, QueryRetrieve.UNABLE_TO_PERFORM_SUB_OPERATIONS
        reason = "more than 128 SOP class/syntax pairs"
    if refs is None:
        # pynetdicom associates with the destination before it takes a status from the
        # handler; propose Verification only, then answer the failure (nothing is sent).
        yield dest.host, dest.port, {"contexts": [build_context(Verification)]}
        yield 1
        yield status_dataset(status, reason), None
        return
    yield dest.host, dest.port, {"contexts": _move_contexts(refs) or [build_context(Verification)]}
    yield len(refs)
    yield from _sub_operations(ctx, event, refs, hook)
