"""Association access control: calling-AE allow-list with optional host binding, called-AE
check, association limit, refusal while stopping (design.md section 8).

Checked when the A-ASSOCIATE-RQ arrives (pynetdicom ``EVT_REQUESTED``), before any
presentation context is negotiated. A refusal is an A-ASSOCIATE-RJ with the PS3.8
9.3.4 / Table 9-21 result, source and reason:

=========================  ===================  ==============================================
refusal                    result               source / reason
=========================  ===================  ==============================================
unknown calling AE / host  rejected-permanent   service-user / calling-AE-title-not-recognized
wrong called AE            rejected-permanent   service-user / called-AE-title-not-recognized
too many associations      rejected-transient   service-provider (presentation) /
                                                local-limit-exceeded
node stopping              rejected-transient   service-provider (presentation) /
                                                temporary-congestion
=========================  ===================  ==============================================

Every refusal and every accepted association is recorded in the ledger.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pynetdicom import evt

from audit.events import Event, EventType, Outcome
from config.sections.dimse import DimseSettings
from node.context import NodeContext

logger = logging.getLogger(__name__)

__all__ = ["AccessPolicy", "Refusal", "contexts", "handlers"]


class Refusal(Enum):
    """A-ASSOCIATE-RJ (result, source, reason/diag.) of PS3.8 Table 9-21."""

    CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
    CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
    TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may associate. Built from :class:`config.sections.dimse.DimseSettings`."""

    ae_title: str
    allowed: tuple[tuple[str, str | None], ...]  # (calling AE, host or None)
    accept_any_calling_ae: bool
    check_called_ae: bool
    max_associations: int

    @classmethod
    def from_settings(cls, s: DimseSettings) -> AccessPolicy:
        return cls(
            ae_title=s.ae_title.strip(),
            allowed=tuple((p.ae_title.strip(), p.host) for p in s.allowed_peers),
            accept_any_calling_ae=s.accept_any_calling_ae,
            check_called_ae=s.check_called_ae,
            max_associations=s.max_associations,
        )

    def check(self, calling_ae: str, called_ae: str, host: str, n_active: int,
              stopping: bool = False) -> Refusal | None:
        """The refusal for this request, or None if it may associate.

        Parameters
        ----------
        calling_ae, called_ae : str
            From the A-ASSOCIATE-RQ (trailing spaces are not significant, PS3.8 9.3.2).
        host : str
            The peer's IP address.
        n_active : int
            Open acceptor associations, this one included.
        stopping : bool
            The node is shutting down.
        """
        calling, called = calling_ae.strip(), called_ae.strip()
        if stopping:
            return Refusal.TEMPORARY_CONGESTION
        if self.check_called_ae and called != self.ae_title:
            return Refusal.CALLED_AE_NOT_RECOGNIZED
        if not self.accept_any_calling_ae and not any(
            ae == calling and (h is None or h == host) for ae, h in self.allowed
        ):
            return Refusal.CALLING_AE_NOT_RECOGNIZED
        if n_active > self.max_associations:
            return Refusal.LOCAL_LIMIT_EXCEEDED
        return None


def _requestor(assoc: Any) -> tuple[str, str, str]:
    rq = assoc.requestor.primitive
    calling = rq.calling_ae_title
    called = rq.called_ae_title
    calling = calling.decode("ascii", "replace") if isinstance(calling, bytes) else calling
    called = called.decode("ascii", "replace") if isinstance(called, bytes) else called
    return calling.strip(), called.strip(), str(assoc.requestor.address)


def _handle_requested(event: evt.Event, ctx: NodeContext, policy: AccessPolicy) -> None:
    assoc = event.assoc
    try:
        calling, called, host = _requestor(assoc)
        server = getattr(assoc, "_server", None)
        n_active = len(list(server.active_associations)) if server is not None else 1
        refusal = policy.check(calling, called, host, n_active, ctx.stopping.is_set())
    except Exception:  # never let access control crash the acceptor thread
        logger.exception("access check failed; refusing association")
        calling, called, host = "?", "?", "?"
        refusal = Refusal.TEMPORARY_CONGESTION
    if refusal is None:
        return
    logger.warning("association refused: calling AE %r from %s to %r: %s",
                   calling, host, called, refusal.name.lower())
    try:  # recorded before the answer, so a refusal the peer saw is always in the ledger
        ctx.ledger.append(Event(
            type=EventType.ASSOCIATION_REJECTED, actor=f"ae:{calling}",
            outcome=Outcome.MINOR_FAILURE,
            payload={"calling_ae": calling, "called_ae": called, "peer_host": host,
                     "reason": refusal.name.lower(), "result_source_reason": list(refusal.value)},
        ))
    except Exception:
        logger.exception("could not record the refused association in the ledger")
    assoc.acse.send_reject(*refusal.value)
    # as pynetdicom's own refusal path does: wait until the DUL has sent the A-ASSOCIATE-RJ
    # and gone idle, so the socket is not closed under it (the peer would see an abort)
    assoc.kill()


def _handle_accepted(event: evt.Event, ctx: NodeContext) -> None:
    try:
        calling, called, host = _requestor(event.assoc)
        ctx.ledger.append(Event(
            type=EventType.ASSOCIATION_ACCEPTED, actor=f"ae:{calling}",
            payload={"calling_ae": calling, "called_ae": called, "peer_host": host,
                     "contexts": len(event.assoc.accepted_contexts)},
        ))
    except Exception:
        logger.exception("could not record the accepted association in the ledger")


def contexts(ctx: NodeContext) -> list[Any]:
    """Access control adds no presentation context."""
    return []


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Any]]:
    policy = AccessPolicy.from_settings(ctx.settings.dimse)
    return [
        (evt.EVT_REQUESTED, lambda e: _handle_requested(e, ctx, policy)),
        (evt.EVT_ACCEPTED, lambda e: _handle_accepted(e, ctx)),
    ]
