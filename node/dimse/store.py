"""Storage Service Class SCP: C-STORE (PS3.4 Annex B; PS3.7 9.1.1).

Accepts every storage SOP class pynetdicom knows (PS3.4 B.5) in every transfer syntax
pydicom knows: uncompressed (explicit VR little endian preferred, then implicit, deflated,
big endian), JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG/HEVC.
What was sent is stored unchanged (see :mod:`node.ingest.ingestor`); decoding happens later, off
the receive path (pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-rle and pyjpegls are installed
so every compressed syntax above can be decoded).

This module is the one boundary that maps ingest outcomes and errors to C-STORE statuses
(PS3.4 B.2.3); a handler exception never reaches pynetdicom.
"""
from __future__ import annotations

import logging
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (  # UID_dictionary: the registry, re-exported by the public module
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID_dictionary,
)
from pynetdicom import evt, register_uid
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from audit.events import Event, EventType, Outcome
from node.context import NodeContext
from node.dimse import access
from node.dimse.status import General, Storage, status_dataset
from node.ingest.ingestor import Ingestor
from node.ingest.results import IngestError, IngestOutcome, RejectReason

logger = logging.getLogger(__name__)
instance_log = logging.getLogger("node.dimse.instances")

__all__ = ["STATUS_FOR_REASON", "STORAGE_SOP_CLASSES", "STORAGE_TRANSFER_SYNTAXES",
           "contexts", "handlers"]

_COMPOSITE_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."  # PS3.6 Annex A: composite IOD storage


def _storage_sop_classes() -> list[str]:
    """pynetdicom's storage SOP classes plus the retired and trial composite storage SOP
    classes of PS3.6 Annex A (e.g. the retired Ultrasound Image Storage that old
    modalities and test corpora still send), registered with pynetdicom's storage
    service class so their C-STOREs reach our handler."""
    uids = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    known = set(uids)
    for uid, entry in sorted(UID_dictionary.items()):
        name, kind = entry[0], entry[1]
        if (uid.startswith(_COMPOSITE_STORAGE_ROOT) and kind == "SOP Class"
                and "Storage" in name and uid not in known):
            if uid_to_service_class(uid) is not StorageServiceClass:
                keyword = "SN_" + "".join(c if c.isalnum() else "_" for c in name)
                register_uid(uid, keyword, StorageServiceClass)
            uids.append(uid)
    return uids


#: Storage SOP classes the C-STORE SCP accepts (PS3.4 B.5 and retired ones).
STORAGE_SOP_CLASSES: list[str] = _storage_sop_classes()

#: Transfer syntaxes accepted for storage, in order of preference (the acceptor picks the
#: first of these that the requestor proposed, PS3.8 9.3.3.2): explicit VR little endian
#: keeps VRs, implicit next; compressed syntaxes are accepted as sent.
STORAGE_TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    *(ts for ts in AllTransferSyntaxes
      if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)),
]

#: C-STORE status per refusal reason (PS3.4 B.2.3; PS3.7 C.5 for the general ones).
STATUS_FOR_REASON: dict[RejectReason, int] = {
    RejectReason.UNPARSEABLE: Storage.CANNOT_UNDERSTAND,
    RejectReason.MISSING_ATTRIBUTE: Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.SOP_CLASS_MISMATCH: Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.DUPLICATE_CONFLICT: General.DUPLICATE_SOP_INSTANCE,
    RejectReason.INVALID_UID: Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.PIXEL_DATA_MISMATCH: Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.TRANSFER_SYNTAX_MISMATCH: Storage.CANNOT_UNDERSTAND,
    RejectReason.TOO_LARGE: Storage.OUT_OF_RESOURCES,
    RejectReason.PATIENT_CONFLICT: Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RejectReason.OUT_OF_SPACE: Storage.OUT_OF_RESOURCES,
    RejectReason.STORE_FAILED: General.PROCESSING_FAILURE,
}


def contexts(ctx: NodeContext) -> list[PresentationContext]:
    """Every storage SOP class with every transfer syntax."""
    return [build_context(uid, STORAGE_TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES]


def _ae(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip()


def handle_store(event: evt.Event, ctx: NodeContext, ingestor: Ingestor) -> int | Dataset:
    """EVT_C_STORE handler: store durably, then answer (never raises)."""
    with ctx.inflight.track():
        try:
            req = cast(C_STORE, event.request)  # the EVT_C_STORE event's request
            assoc = event.assoc
            calling, host = _ae(assoc.requestor.ae_title), str(assoc.requestor.address)
            if not access.may(ctx, calling, host, "store"):
                _refuse_unauthorised(ctx, calling, host, req)
                return status_dataset(General.NOT_AUTHORIZED,
                                      "calling AE has no store role on this node")
            result = ingestor.ingest_dataset(
                event.encoded_dataset(include_meta=False),
                event.context.transfer_syntax,
                sop_class_uid=str(req.AffectedSOPClassUID),
                sop_instance_uid=str(req.AffectedSOPInstanceUID),
                calling_ae=_ae(assoc.requestor.ae_title),
                called_ae=_ae(assoc.acceptor.ae_title),
                peer=str(assoc.requestor.address),
                source="dimse",
            )
        except IngestError as exc:
            return status_dataset(STATUS_FOR_REASON[exc.reason], exc.comment)
        except Exception:
            logger.exception("C-STORE handler failed")
            return status_dataset(General.PROCESSING_FAILURE, "internal error; see node log")
        if result.outcome == IngestOutcome.KEPT_FIRST:
            _log_instance(ctx, result, Storage.ELEMENTS_DISCARDED)
            return status_dataset(Storage.ELEMENTS_DISCARDED,
                                  "duplicate SOP Instance UID: stored copy kept")
        _log_instance(ctx, result, Storage.SUCCESS)
        return Storage.SUCCESS


def _refuse_unauthorised(ctx: NodeContext, calling: str, host: str, req: C_STORE) -> None:
    logger.warning("C-STORE from %s at %s refused: no store role", calling, host)
    try:
        ctx.ledger.append(Event(
            type=EventType.INSTANCE_REJECTED, actor=f"ae:{calling}",
            outcome=Outcome.MINOR_FAILURE,
            subject={"sop_uid": str(req.AffectedSOPInstanceUID or "")},
            payload={"reason": "not_authorized", "calling_ae": calling, "peer": host,
                     "status": int(General.NOT_AUTHORIZED)}))
    except Exception:
        logger.exception("could not record the refusal in the ledger")


def _log_instance(ctx: NodeContext, result: Any, status: int) -> None:
    """One line per stored instance at ``[logging] instances``: UIDs, SOP class, size,
    sender, status and what the ingest did (no PHI)."""
    level = getattr(logging, ctx.settings.logging.instances, logging.INFO)
    if not instance_log.isEnabledFor(level):
        return
    rec = result.record
    instance_log.log(
        level, "C-STORE %s from %s: SOP %s (%s) series %s study %s, %d bytes, status 0x%04X %s",
        rec.called_ae or "?", rec.calling_ae or "?", rec.sop_instance_uid,
        UID(rec.sop_class_uid).name, rec.series_instance_uid, rec.study_instance_uid,
        rec.file_size, status, result.outcome.value,
        extra={"study": rec.study_instance_uid})  # a field of JSON log lines


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Any]]:
    ingestor = Ingestor(ctx)
    return [(evt.EVT_C_STORE, lambda event: handle_store(event, ctx, ingestor))]
