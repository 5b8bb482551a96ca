"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality asks, with N-ACTION (Action Type 1, PS3.4 J.3.2), whether the node has taken
responsibility for a list of SOP instances; the node answers the N-ACTION at once and then
reports, with N-EVENT-REPORT (PS3.4 J.3.3), which instances it holds (Referenced SOP
Sequence) and which it does not (Failed SOP Sequence with a Failure Reason). The answer
comes from the index and the file store: an instance is committed when its index row
exists with the same SOP Class, and its file is in the store with the SHA-256 the index
recorded at ingest (so a damaged copy is never confirmed).

Where the report goes (``settings.dimse.commitment_report``, PS3.4 J.3.3):

* ``same_association``: on the N-ACTION's association (the requester must keep it open);
* ``new_association``: on a new association to the requester, its AE title looked up in
  ``settings.dimse.move_destinations``, proposing the SCP role for this SOP class
  (SCP/SCU Role Selection, PS3.7 D.3.3.4);
* ``auto`` (default): on the same association while it is open, else a new one.

Each transaction writes one STORAGE_COMMITMENT ledger event (transaction UID, counts,
failure reasons, how and whether the report was delivered, the SOP Instance UIDs).
Pending transactions live in memory: a node restart between N-ACTION and report loses the
report, and the requester retries per PS3.4 J.3.3 (it must not assume commitment).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    StorageCommitmentPushModel,
)

from audit.events import Event, EventType, Outcome
from node.context import NodeContext
from node.dimse.status import (
    Commitment,
    CommitmentFailureReason,
    General,
    status_dataset,
)
from storage.query import instances_by_uid

log = logging.getLogger(__name__)

__all__ = [
    "STORAGE_COMMITMENT_INSTANCE",
    "CommitmentResult",
    "CommitmentService",
    "contexts",
    "evaluate",
    "handlers",
]

#: Well-known SOP Instance UID of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

_TS: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_REPORT_WAIT_S = 10.0  # wait for the N-ACTION response to leave before reporting
_NEW_ASSOC_ATTEMPTS = 3


def contexts(ctx: NodeContext) -> list[PresentationContext]:
    return [build_context(StorageCommitmentPushModel, _TS)]


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Callable[..., Any]]]:
    service = CommitmentService(ctx)
    return [(evt.EVT_N_ACTION, service.handle_action)]


@dataclass
class CommitmentResult:
    """Outcome of one transaction: committed and failed references (PS3.4 J.3.3.1)."""

    transaction_uid: str
    committed: list[tuple[str, str]] = field(default_factory=list)  # (class, instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (+ Failure Reason)

    @property
    def event_type(self) -> int:
        return int(Commitment.EVENT_FAILURES if self.failed else Commitment.EVENT_SUCCESS)

    def report(self, retrieve_ae: str) -> Dataset:
        """Event Information of the N-EVENT-REPORT (PS3.4 Table J.3-2)."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        ds.RetrieveAETitle = retrieve_ae
        if self.committed:
            items = []
            for cls, inst in self.committed:
                it = Dataset()
                it.ReferencedSOPClassUID = cls
                it.ReferencedSOPInstanceUID = inst
                items.append(it)
            ds.ReferencedSOPSequence = DicomSequence(items)
        if self.failed:
            items = []
            for cls, inst, reason in self.failed:
                it = Dataset()
                it.ReferencedSOPClassUID = cls
                it.ReferencedSOPInstanceUID = inst
                it.FailureReason = int(reason)
                items.append(it)
            ds.FailedSOPSequence = DicomSequence(items)
        return ds


def evaluate(ctx: NodeContext, transaction_uid: str,
             references: list[tuple[str, str]]) -> CommitmentResult:
    """Check each (SOP Class UID, SOP Instance UID) against the index and the file store.

    Failure Reasons (PS3.3 C.14.1.1 / PS3.4 J.3.3.1.1): 0112 not held, 0119 held under
    another SOP class, 0110 file missing or its digest differs from the index, 0213 the
    index could not be read.
    """
    result = CommitmentResult(transaction_uid)
    try:
        with ctx.engine.connect() as conn:
            held = instances_by_uid(conn, [inst for _cls, inst in references])
    except Exception:
        log.exception("storage commitment: index lookup failed")
        result.failed = [(c, i, CommitmentFailureReason.RESOURCE_LIMITATION) for c, i in references]
        return result
    for cls, inst in references:
        ref = held.get(inst)
        if ref is None:
            result.failed.append((cls, inst, CommitmentFailureReason.NO_SUCH_OBJECT_INSTANCE))
        elif ref.sop_class_uid != cls:
            result.failed.append((cls, inst, CommitmentFailureReason.CLASS_INSTANCE_CONFLICT))
        else:
            try:
                ok = ctx.store.sha256(ref.file_path) == ref.sha256
            except Exception:
                ok = False
            if ok:
                result.committed.append((cls, inst))
            else:
                log.error("storage commitment: stored file missing or damaged: %s", ref.file_path)
                result.failed.append((cls, inst, CommitmentFailureReason.PROCESSING_FAILURE))
    return result


class _BadRequest(ValueError):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _parse_request(event: Any) -> tuple[str, list[tuple[str, str]]]:
    req = event.request
    if str(req.RequestedSOPClassUID) != StorageCommitmentPushModel:
        raise _BadRequest(General.SOP_CLASS_NOT_SUPPORTED, "not Storage Commitment Push Model")
    if str(req.RequestedSOPInstanceUID) != STORAGE_COMMITMENT_INSTANCE:
        raise _BadRequest(General.NO_SUCH_SOP_INSTANCE,
                          "Requested SOP Instance must be 1.2.840.10008.1.20.1.1")
    if req.ActionTypeID != Commitment.ACTION_REQUEST:
        raise _BadRequest(Commitment.NO_SUCH_ACTION, f"Action Type ID {req.ActionTypeID} unknown")
    try:
        info = event.action_information
    except Exception:
        raise _BadRequest(
            Commitment.INVALID_ARGUMENT_VALUE, "Action Information unreadable"
        ) from None
    tx = str(info.get("TransactionUID", "") or "").strip()
    seq = info.get("ReferencedSOPSequence")
    if not tx or not seq:
        raise _BadRequest(Commitment.MISSING_ATTRIBUTE,
                          "Transaction UID and Referenced SOP Sequence are required")
    refs: list[tuple[str, str]] = []
    for item in seq:
        cls = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        inst = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not cls or not inst:
            raise _BadRequest(Commitment.INVALID_ARGUMENT_VALUE,
                              "each item needs Referenced SOP Class and Instance UIDs")
        refs.append((cls, inst))
    return tx, refs


class CommitmentService:
    """N-ACTION handler plus the report sender for one node (holds in-flight transactions)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._active: set[str] = set()

    # -- N-ACTION --------------------------------------------------------------------
    def handle_action(self, event: Any) -> tuple[Dataset, Dataset | None]:
        """EVT_N_ACTION: validate, answer at once, report from a worker thread."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            tx, refs = _parse_request(event)
        except _BadRequest as exc:
            self._record(calling, "", [], None, status=int(exc.status), reason=exc.comment)
            return status_dataset(exc.status, exc.comment), None
        except Exception:
            log.exception("N-ACTION could not be read")
            status = Commitment.INVALID_ARGUMENT_VALUE
            self._record(calling, "", [], None, status=int(status), reason="unreadable request")
            return status_dataset(status, "request not understood"), None
        with self._lock:
            duplicate = tx in self._active
            self._active.add(tx)
        sent = threading.Event()
        msg_id = int(event.request.MessageID)

        def _on_sent(e: Any) -> None:
            m = e.message
            if type(m).__name__ == "N_ACTION_RSP" and \
                    m.command_set.get("MessageIDBeingRespondedTo") == msg_id:
                sent.set()

        event.assoc.bind(evt.EVT_DIMSE_SENT, _on_sent)
        worker = threading.Thread(
            target=self._report, args=(event.assoc, calling, tx, refs, duplicate, sent, _on_sent),
            name=f"commitment-{tx[-12:]}", daemon=True,
        )
        worker.start()
        return status_dataset(General.SUCCESS), None

    # -- N-EVENT-REPORT ---------------------------------------------------------------
    def _report(self, assoc: Any, calling: str, tx: str, refs: list[tuple[str, str]],
                duplicate: bool, sent: threading.Event, hook: Callable[..., Any]) -> None:
        with self.ctx.inflight.track():
            try:
                if duplicate:
                    result = CommitmentResult(tx, failed=[
                        (c, i, CommitmentFailureReason.DUPLICATE_TRANSACTION_UID) for c, i in refs])
                else:
                    result = evaluate(self.ctx, tx, refs)
                sent.wait(_REPORT_WAIT_S)
                try:
                    assoc.unbind(evt.EVT_DIMSE_SENT, hook)
                except Exception:
                    pass
                how, status = self._deliver(assoc, calling, result)
                self._record(calling, tx, refs, result, status=status, delivered=how)
            except Exception:
                log.exception("storage commitment report failed")
            finally:
                if not duplicate:
                    with self._lock:
                        self._active.discard(tx)

    def _deliver(
        self, assoc: Any, calling: str, result: CommitmentResult
    ) -> tuple[str, int | None]:
        mode = self.ctx.settings.dimse.commitment_report
        ds = result.report(self.ctx.settings.dimse.ae_title)
        if mode in ("auto", "same_association") and assoc.is_established:
            try:
                rsp, _reply = assoc.send_n_event_report(
                    ds, result.event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
                status = getattr(rsp, "Status", None)
                if status is not None:
                    return "same_association", int(status)
                log.warning("no N-EVENT-REPORT response on the same association")
            except Exception as exc:
                log.warning("N-EVENT-REPORT on the same association failed: %s", exc)
            if mode == "same_association":
                return "undelivered", None
        elif mode == "same_association":
            log.error("storage commitment report undeliverable: the requester released the "
                      "association and commitment_report = same_association")
            return "undelivered", None
        return self._deliver_new(calling, result.event_type, ds)

    def _deliver_new(self, calling: str, event_type: int, ds: Dataset) -> tuple[str, int | None]:
        dest = next((d for d in self.ctx.settings.dimse.move_destinations
                     if d.ae_title == calling), None)
        if dest is None:
            log.error("storage commitment report undeliverable: requester AE not in "
                      "move_destinations")
            return "undelivered", None
        ae = AE(ae_title=self.ctx.settings.dimse.ae_title)
        ae.acse_timeout = self.ctx.settings.dimse.acse_timeout_s
        ae.dimse_timeout = self.ctx.settings.dimse.dimse_timeout_s
        ae.network_timeout = self.ctx.settings.dimse.network_timeout_s
        ae.add_requested_context(StorageCommitmentPushModel, _TS)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        for attempt in range(1, _NEW_ASSOC_ATTEMPTS + 1):
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, ext_neg=[role])
            if assoc.is_established:
                try:
                    rsp, _reply = assoc.send_n_event_report(
                        ds, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
                    status = getattr(rsp, "Status", None)
                finally:
                    assoc.release()
                if status is not None:
                    return "new_association", int(status)
            log.warning(
                "storage commitment report: attempt %d to %s failed", attempt, dest.ae_title
            )
            if self.ctx.stopping.is_set():
                break
            time.sleep(attempt)
        return "undelivered", None

    # -- ledger ----------------------------------------------------------------------
    def _record(self, calling: str, tx: str, refs: list[tuple[str, str]],
                result: CommitmentResult | None, *, status: int | None,
                delivered: str | None = None, reason: str = "") -> None:
        payload: dict[str, Any] = {
            "transaction_uid": tx, "requested": len(refs), "sop_uids": [i for _c, i in refs],
        }
        if result is None:  # N-ACTION refused
            outcome = Outcome.SERIOUS_FAILURE
            payload.update(n_action_status=status, reason=reason)
        else:
            reasons: dict[str, int] = {}
            for _c, _i, r in result.failed:
                key = f"0x{int(r):04X}"
                reasons[key] = reasons.get(key, 0) + 1
            payload.update(committed=len(result.committed), failed=len(result.failed),
                           failure_reasons=reasons, event_type_id=result.event_type,
                           delivered=delivered, report_status=status)
            if delivered == "undelivered" or (status is not None and status != 0):
                outcome = Outcome.SERIOUS_FAILURE
            elif result.failed:
                outcome = Outcome.MINOR_FAILURE
            else:
                outcome = Outcome.SUCCESS
        try:
            self.ctx.ledger.append(Event(
                type=EventType.STORAGE_COMMITMENT, actor=f"ae:{calling}", outcome=outcome,
                subject={}, payload=payload,
            ))
        except Exception:
            log.exception("ledger append failed for storage commitment")

