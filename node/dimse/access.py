"""Association access control: calling-AE allow-list with optional host binding, called-AE
check, association limit, refusal while stopping.

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

An association takes a slot only once its calling AE is accepted: connections that
have not (yet) sent an A-ASSOCIATE-RQ do not count against ``max_associations``; they are
bounded by ``max_connections`` and by the PDU read deadline (:mod:`node.dimse.guard`).
``max_associations_per_host`` caps the open associations of one peer IP address.

Every accepted association is recorded in the ledger. Refusals are recorded per peer host
and reason by :class:`RefusalSummary`: the first in each window at once (with its AE
titles), the others counted and written as one summary entry when the window ends, so a
flood of refused connections costs a bounded number of ledger entries.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pynetdicom import evt

from audit.events import Event, EventType, Outcome
from config.sections.dimse import DimseSettings
from node.context import NodeContext
from node.dimse.tls import peer_common_name

logger = logging.getLogger(__name__)

__all__ = ["AccessPolicy", "Refusal", "RefusalSummary", "contexts", "handlers"]


class Refusal(Enum):
    """A-ASSOCIATE-RJ (result, source, reason/diag.) of PS3.8 Table 9-21."""

    CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
    CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
    TEMPORARY_CONGESTION = (0x02, 0x03, 0x01)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


ALL_ROLES = frozenset({"store", "query", "retrieve"})


class RefusalSummary:
    """Bounded ledger entries for refused associations and connections.

    :meth:`record` returns True for the first refusal of a (peer host, reason) pair in the
    current window (the caller records that one in full) and counts the others; at the end
    of the window one ``association.rejected`` entry per pair with repeats carries their
    count. At most ``max_keys`` pairs are tracked per window; beyond that refusals are
    counted under host ``*``.
    """

    def __init__(self, ledger: Any, window_s: float, max_keys: int = 256):
        self.ledger = ledger
        self.window_s = window_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[Any]] = {}
        self._window_start = time.time()
        self._timer: threading.Timer | None = None

    def record(self, host: str, reason: str) -> bool:
        now = time.time()
        with self._lock:
            key = (host, reason)
            if key not in self._counts and len(self._counts) >= self.max_keys:
                key = ("*", reason)
            if key in self._counts:
                c = self._counts[key]
                c[0] += 1
                c[2] = now
                return False
            if not self._counts:
                self._window_start = now
                self._timer = threading.Timer(self.window_s, self.flush)
                self._timer.daemon = True
                self._timer.start()
            self._counts[key] = [0, now, now]  # repeats after the first, first, last
            return key[0] != "*"

    def flush(self) -> None:
        """Write the summary entries of the current window (also called at stop)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            start = self._window_start
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for (host, reason), (n, first, last) in counts.items():
            if n == 0:
                continue
            try:
                self.ledger.append(Event(
                    type=EventType.ASSOCIATION_REJECTED, actor=f"host:{host}",
                    outcome=Outcome.MINOR_FAILURE,
                    payload={"peer_host": host, "reason": reason, "summary": True,
                             "count": n, "window_start": _iso(start),
                             "first_repeat": _iso(first), "last": _iso(last)}))
            except Exception:
                logger.exception("could not record the refusal summary in the ledger")


@dataclass(frozen=True)
class AccessPolicy:
    """Who may associate. Built from :class:`config.sections.dimse.DimseSettings`."""

    ae_title: str
    allowed: tuple[tuple[str, str | None], ...]  # (calling AE, host or None)
    accept_any_calling_ae: bool
    check_called_ae: bool
    max_associations: int
    max_per_host: int = 0  # 0: no per-host cap
    #: (calling AE, host or None) -> roles; a pair not listed has every role
    roles: tuple[tuple[tuple[str, str | None], frozenset[str]], ...] = ()
    #: (calling AE, host or None) -> required TLS client certificate CN (None: any)
    subjects: tuple[tuple[tuple[str, str | None], str | None], ...] = ()

    @classmethod
    def from_settings(cls, s: DimseSettings) -> AccessPolicy:
        return cls(
            ae_title=s.ae_title.strip(),
            allowed=tuple((p.ae_title.strip(), p.host) for p in s.allowed_peers),
            accept_any_calling_ae=s.accept_any_calling_ae,
            check_called_ae=s.check_called_ae,
            max_associations=s.max_associations,
            max_per_host=s.max_associations_per_host,
            roles=tuple(((p.ae_title.strip(), p.host), frozenset(p.roles))
                        for p in s.allowed_peers),
            subjects=tuple(((p.ae_title.strip(), p.host), p.tls_subject)
                           for p in s.allowed_peers),
        )

    def subject_ok(self, calling_ae: str, host: str, common_name: str | None) -> bool:
        """Whether a matching allow-list entry accepts this TLS client certificate CN
        (an entry without ``tls_subject`` accepts any, or none)."""
        if self.accept_any_calling_ae:
            return True
        calling = calling_ae.strip()
        return any(ae == calling and (h is None or h == host)
                   and (subj is None or subj == common_name)
                   for (ae, h), subj in self.subjects) or not self.subjects

    def roles_of(self, calling_ae: str, host: str) -> frozenset[str]:
        """The services the (allowed) peer may use; all of them in development's
        ``accept_any_calling_ae`` mode. Several matching entries: the union."""
        if self.accept_any_calling_ae:
            return ALL_ROLES
        calling = calling_ae.strip()
        out: set[str] = set()
        for (ae, h), roles in self.roles:
            if ae == calling and (h is None or h == host):
                out |= roles
        return frozenset(out) if self.roles else ALL_ROLES

    def check(self, calling_ae: str, called_ae: str, host: str, n_active: int,
              stopping: bool = False, n_host: int = 1) -> Refusal | None:
        """The refusal for this request, or None if it may associate.

        Parameters
        ----------
        calling_ae, called_ae : str
            From the A-ASSOCIATE-RQ (trailing spaces are not significant, PS3.8 9.3.2).
        host : str
            The peer's IP address.
        n_active : int
            Accepted (established) associations, this one included.
        n_host : int
            Accepted associations from ``host``, this one included.
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
        if n_active > self.max_associations or (self.max_per_host
                                                  and n_host > self.max_per_host):
            return Refusal.LOCAL_LIMIT_EXCEEDED
        return None


def _requestor(assoc: Any) -> tuple[str, str, str]:
    rq = assoc.requestor.primitive
    calling = rq.calling_ae_title
    called = rq.called_ae_title
    calling = calling.decode("ascii", "replace") if isinstance(calling, bytes) else calling
    called = called.decode("ascii", "replace") if isinstance(called, bytes) else called
    return calling.strip(), called.strip(), str(assoc.requestor.address)


def _counts(assoc: Any, host: str) -> tuple[int, int]:
    """Established acceptor associations (all, from ``host``), this one included."""
    server = getattr(assoc, "_server", None)
    if server is None:
        return 1, 1
    est = [a for a in list(server.active_associations)
           if a is not assoc and a.is_established]
    same = [a for a in est if str(a.requestor.address) == host]
    return len(est) + 1, len(same) + 1


def _restrict_contexts(assoc: Any, roles: frozenset[str]) -> None:
    """Offer this peer only the presentation contexts of its roles: without ``query`` no
    C-FIND model, without ``retrieve`` no C-GET / C-MOVE model, without ``store`` no
    Storage Commitment (its C-STOREs are refused by node.dimse.store)."""
    if roles >= ALL_ROLES:
        return
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    from node.dimse.qr import FIND_MODELS, GET_MODELS, MOVE_MODELS

    drop: set[str] = set()
    if "query" not in roles:
        drop |= {str(u) for u in FIND_MODELS}
    if "retrieve" not in roles:
        drop |= {str(u) for u in (*GET_MODELS, *MOVE_MODELS)}
    if "store" not in roles:
        drop.add(str(StorageCommitmentPushModel))
    contexts = assoc.acceptor._contexts
    contexts[:] = [cx for cx in contexts if str(cx.abstract_syntax) not in drop]


def _handle_requested(event: evt.Event, ctx: NodeContext, policy: AccessPolicy,
                      summary: RefusalSummary) -> None:
    assoc = event.assoc
    try:
        calling, called, host = _requestor(assoc)
        n_active, n_host = _counts(assoc, host)
        refusal = policy.check(calling, called, host, n_active, ctx.stopping.is_set(),
                               n_host=n_host)
        if refusal is None and not policy.subject_ok(
                calling, host, peer_common_name(getattr(assoc.dul.socket, "socket", None))):
            refusal = Refusal.CALLING_AE_NOT_RECOGNIZED  # certificate of another peer
    except Exception:  # never let access control crash the acceptor thread
        logger.exception("access check failed; refusing association")
        calling, called, host = "?", "?", "?"
        refusal = Refusal.TEMPORARY_CONGESTION
    if refusal is None:
        _restrict_contexts(assoc, policy.roles_of(calling, host))
        return
    reason = refusal.name.lower()
    if summary.record(host, reason):
        logger.warning("association refused: calling AE %r from %s to %r: %s",
                       calling, host, called, reason)
        try:  # recorded before the answer, so a refusal the peer saw is in the ledger
            ctx.ledger.append(Event(
                type=EventType.ASSOCIATION_REJECTED, actor=f"ae:{calling}",
                outcome=Outcome.MINOR_FAILURE,
                payload={"calling_ae": calling, "called_ae": called, "peer_host": host,
                         "reason": reason, "result_source_reason": list(refusal.value)},
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


def may(ctx: NodeContext, calling_ae: str, host: str, role: str) -> bool:
    """Whether the peer may use ``role`` (checked per C-STORE by node.dimse.store)."""
    policy = getattr(ctx, "_access_policy", None)
    if policy is None:
        policy = AccessPolicy.from_settings(ctx.settings.dimse)
        object.__setattr__(ctx, "_access_policy", policy)
    return role in policy.roles_of(calling_ae, host)


def summary_for(ctx: NodeContext) -> RefusalSummary:
    """The node's one refusal summary (shared by access control and the PDU guard)."""
    s = getattr(ctx, "_refusal_summary", None)
    if s is None:
        s = RefusalSummary(ctx.ledger, ctx.settings.dimse.refusal_window_s)
        object.__setattr__(ctx, "_refusal_summary", s)
    return s


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Any]]:
    policy = AccessPolicy.from_settings(ctx.settings.dimse)
    summary = summary_for(ctx)
    return [
        (evt.EVT_REQUESTED, lambda e: _handle_requested(e, ctx, policy, summary)),
        (evt.EVT_ACCEPTED, lambda e: _handle_accepted(e, ctx)),
    ]
