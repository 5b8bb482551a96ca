"""The DIMSE server: one pynetdicom AE assembled from service modules.

A *service module* is any object (usually a Python module) with two functions::

    def contexts(ctx: NodeContext) -> list[PresentationContext]: ...
    def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Callable]]: ...

``contexts`` lists the abstract syntaxes (SOP classes) and transfer syntaxes the service
accepts as SCP; ``handlers`` returns the pynetdicom event handlers to bind. Contexts that
several modules declare are merged (union of transfer syntaxes, roles OR-ed), so e.g. the
C-GET SCP can declare SCP/SCU role selection on the storage SOP classes that the C-STORE
SCP also accepts. :func:`default_services` is the registration point: access control,
verification, storage, query / retrieve and storage commitment.

The server sets TCP_NODELAY on every accepted socket (DIMSE is request/response: Nagle's
algorithm would add a delayed-ACK round trip per message), can share its port with other
acceptor processes (SO_REUSEPORT; the kernel spreads connections over the processes),
and stops gracefully: stop accepting, let in-flight stores finish, then release.

References: PS3.7 (DIMSE), PS3.8 (upper layer: association, PDU size, ARTIM), pynetdicom
``transport.py`` / ``ae.py``.
"""
from __future__ import annotations

import copy
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, Protocol, cast

from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from audit.events import Event, EventType, Outcome
from node.context import NodeContext
from node.dimse import access, commitment, echo, logs, qr, store
from node.dimse.guard import GuardedDUL, PduLimits
from node.dimse.status import General
from node.dimse.tls import server_context

logger = logging.getLogger(__name__)
# pynetdicom's association logger: the reactor loop below writes its lines there, as before
_ASSOC_LOG = logging.getLogger("pynetdicom.association")

__all__ = [
    "DimseServer",
    "NodeAssociationServer",
    "ServiceModule",
    "default_services",
    "merge_contexts",
]

Handler = tuple[evt.EventType, Callable[..., Any]]



class ServiceModule(Protocol):
    """What a DIMSE service module provides (see the module docstring)."""

    def contexts(self, ctx: NodeContext) -> list[PresentationContext]: ...

    def handlers(self, ctx: NodeContext) -> list[Handler]: ...


def default_services() -> list[ModuleType]:
    """The service modules of a standard node, in order: access control (association
    requests), verification, storage, query / retrieve, storage commitment."""
    return [access, echo, store, qr, commitment]


def merge_contexts(groups: Iterable[Sequence[PresentationContext]]) -> list[PresentationContext]:
    """Merge presentation contexts by abstract syntax.

    Transfer syntaxes are united keeping first-seen order (order = SCP preference,
    PS3.8 9.3.3.2: the acceptor picks one of the proposed transfer syntaxes); an explicit
    SCU/SCP role (True) wins over the default (None).
    """
    merged: dict[str, PresentationContext] = {}
    for group in groups:
        for cx in group:
            syntax = cx.abstract_syntax
            assert syntax is not None  # build_context requires one
            have = merged.get(syntax)
            if have is None:
                new = PresentationContext()
                new.abstract_syntax = syntax
                new.transfer_syntax = list(cx.transfer_syntax)
                new.scu_role = cx.scu_role
                new.scp_role = cx.scp_role
                merged[syntax] = new
                continue
            for ts in cx.transfer_syntax:
                if ts not in have.transfer_syntax:
                    have.add_transfer_syntax(ts)
            if cx.scu_role is not None or cx.scp_role is not None:
                have.scu_role = bool(have.scu_role) or bool(cx.scu_role)
                have.scp_role = bool(have.scp_role) or bool(cx.scp_role)
    return list(merged.values())


def prefer_requestor_order(event: evt.Event) -> None:
    """EVT_REQUESTED: reorder this association's supported transfer syntaxes so that, per
    abstract syntax, the ones the requestor proposed come first in the requestor's order.

    pynetdicom accepts the first of the *acceptor's* transfer syntaxes that the requestor
    proposed; a sender lists its preferred syntax first (DCMTK: the file's own), so
    honouring that order stores objects as they were encoded, with no conversion by the
    sender (PS3.8 9.3.3.2 leaves the choice to the acceptor).
    """
    try:
        proposed: dict[str, list[str]] = {}
        request = event.assoc.requestor.primitive
        assert request is not None  # the A-ASSOCIATE-RQ, received before EVT_REQUESTED
        for cx in request.presentation_context_definition_list:
            order = proposed.setdefault(str(cx.abstract_syntax), [])
            order.extend(str(ts) for ts in cx.transfer_syntax if str(ts) not in order)
        for ac in event.assoc.acceptor.supported_contexts:
            rq = proposed.get(str(ac.abstract_syntax))
            if not rq:
                continue
            ours = [str(ts) for ts in ac.transfer_syntax]
            first = [ts for ts in rq if ts in ours]
            if first and ours[:len(first)] != first:
                ac.transfer_syntax = [*first, *(ts for ts in ours if ts not in first)]
    except Exception:  # a preference must never break negotiation
        logger.exception("could not apply the requestor's transfer syntax order")


class GuardedAssociation(Association):
    """An acceptor association that answers a C-STORE whose Affected SOP Class UID is not
    the abstract syntax of its presentation context (PS3.7 9.1.1.1.2, PS3.8 7.1.1.13) with
    a failure status instead of aborting (pynetdicom aborts when no service class matches
    the UID), so a malformed request costs the peer one object, not the association.

    Its reactor loop is pynetdicom's (3.0.x) without the 1 ms sleep at the top of every
    turn: with :class:`WaitingDIMSE` the turn already waits on the message queue, and the
    sleep only delayed every request (one association sends its next C-STORE only after
    the previous response, so each stored instance waited about a millisecond more)."""

    def _run_reactor(self) -> None:
        waits = isinstance(self.dimse, WaitingDIMSE)
        self._is_paused = False
        while not self._kill:
            if not waits:
                time.sleep(0.001)
            # pynetdicom's pause point (send_*() from a handler must not race the loop)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                _ASSOC_LOG.info("Association Aborted%s",
                                " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                _ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def _serve_request(self, msg: Any, context_id: int) -> None:
        if isinstance(msg, C_STORE):
            cx = self._accepted_cx.get(context_id)
            uid = str(msg.AffectedSOPClassUID or "")
            if cx is not None and uid != str(cx.abstract_syntax):
                rsp = C_STORE()
                rsp.MessageIDBeingRespondedTo = msg.MessageID
                rsp.AffectedSOPClassUID = cx.abstract_syntax
                rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
                rsp.Status = int(General.SOP_CLASS_NOT_SUPPORTED)
                # pynetdicom declares ErrorComment by assigning None, so its type is None
                rsp.ErrorComment = "Affected SOP Class UID is not the context's"  # type: ignore[assignment]
                ctx: NodeContext | None = getattr(self._server, "node_ctx", None)
                if ctx is not None:
                    try:
                        ctx.ledger.append(Event(
                            type=EventType.INSTANCE_REJECTED,
                            actor=f"ae:{str(self.requestor.ae_title).strip()}",
                            outcome=Outcome.MINOR_FAILURE,
                            subject={"sop_uid": str(msg.AffectedSOPInstanceUID or ""),
                                     "sop_class_uid": uid},
                            payload={"reason": "sop_class_not_context",
                                     "status": int(General.SOP_CLASS_NOT_SUPPORTED),
                                     "context_abstract_syntax": str(cx.abstract_syntax)},
                        ))
                    except Exception:
                        logger.exception("could not record the rejection in the ledger")
                logger.warning("C-STORE refused: Affected SOP Class UID differs from the "
                               "presentation context's abstract syntax")
                self.dimse.send_msg(rsp, context_id)
                return
        super()._serve_request(msg, context_id)


_PYNETDICOM_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def store_rsp_command(sop_class_uid: str, message_id: int, status: int,
                      sop_instance_uid: str) -> bytes:
    """The Command Set of a C-STORE-RSP without comment or offending element (PS3.7
    9.3.1.2, E.1), implicit VR little endian as every command set (PS3.7 6.3.1): the
    bytes pynetdicom's encoder produces for the same response."""
    def uid(value: str) -> bytes:
        b = value.encode("ascii")
        return b + b"\0" if len(b) % 2 else b

    def el(element: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, element, len(value)) + value

    body = b"".join((el(0x0002, uid(sop_class_uid)), el(0x0100, struct.pack("<H", 0x8001)),
                     el(0x0120, struct.pack("<H", message_id)),
                     el(0x0800, struct.pack("<H", 0x0101)),  # no data set follows
                     el(0x0900, struct.pack("<H", status)), el(0x1000, uid(sop_instance_uid))))
    return el(0x0000, struct.pack("<I", len(body))) + body


class WaitingDIMSE(DIMSEServiceProvider):
    """pynetdicom's acceptor loop sleeps 1 ms, then looks for a complete DIMSE message
    without waiting; this waits for one (up to ``WAIT_S``, so the loop still checks for a
    release or abort request that often), so a request is served as soon as it is whole.

    It also sends a plain C-STORE-RSP (status only) as its encoded command set directly:
    pynetdicom builds a pydicom data set for every response and encodes it element by
    element (about a millisecond of CPU per stored instance, bench/results/ingest.md).
    Any other message, a response with a comment, or one an ``EVT_DIMSE_SENT`` handler
    wants to see goes through pynetdicom's encoder as before."""

    WAIT_S = 0.02

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None and primitive.ErrorComment is None
                and primitive.OffendingElement is None and primitive.AffectedSOPClassUID
                and primitive.AffectedSOPInstanceUID
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            try:
                command = store_rsp_command(primitive.AffectedSOPClassUID,
                                            primitive.MessageIDBeingRespondedTo,
                                            primitive.Status, primitive.AffectedSOPInstanceUID)
            except (UnicodeEncodeError, struct.error):  # pynetdicom's encoder decides
                command = b""
            limit = self.maximum_pdu_size
            if command and (not limit or len(command) + 6 <= limit):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=self.WAIT_S)
        except queue.Empty:
            return None, None


class _ContextList(list):  # type: ignore[type-arg]
    """The server's presentation contexts: pynetdicom deep-copies them for every
    association (hundreds of SOP classes x transfer syntaxes: tenths of a second of CPU
    per association); a copy of each context object with its own transfer syntax list
    is what negotiation needs (UIDs are immutable strings)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        out = []
        for cx in self:
            c = copy.copy(cx)
            c._transfer_syntax = list(cx._transfer_syntax)
            out.append(c)
        return out


class NodeRequestHandler(RequestHandler):
    """Creates :class:`GuardedAssociation` acceptors whose DUL bounds every PDU read
    (:class:`node.dimse.guard.GuardedDUL`)."""

    def handle(self) -> None:
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            server = self.server
            try:
                sock.settimeout(getattr(server, "handshake_timeout_s", 10.0))
                sock.do_handshake()
                sock.settimeout(None)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                host = str(self.client_address[0])
                logger.warning("DICOM TLS handshake with %s failed: %s", host, exc)
                on_refused = getattr(server, "on_refused", None)
                if on_refused is not None:
                    on_refused(host, "tls_handshake_failed")
                try:
                    sock.close()
                except OSError:
                    pass
                return
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = GuardedAssociation
        assoc.dimse.__class__ = WaitingDIMSE
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom's own notification handlers only write its INFO / DEBUG lines,
            # yet format them (every PDU and DIMSE message) whatever the log level; the
            # association holds both its own and the server's binding of them
            for event, handler in _PYNETDICOM_LOG_HANDLERS:
                assoc.unbind(event, handler)
        server = self.server
        limits = getattr(server, "pdu_limits", None)
        if limits is not None:
            assoc.dul.__class__ = GuardedDUL
            dul = cast(GuardedDUL, assoc.dul)
            dul.limits = limits
            dul.on_refused = getattr(server, "on_refused", None)
            dul.enable_waiting()
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on accepted sockets and optional
    SO_REUSEPORT on the listening socket."""

    reuse_port: bool = False
    daemon_threads = True
    #: the node's context, for GuardedAssociation's ledger entries (set by DimseServer.start)
    node_ctx: NodeContext | None = None
    #: PDU size / time limits for GuardedDUL (set by DimseServer.start)
    pdu_limits: PduLimits | None = None
    #: TCP connections held at once (associated or not); more are closed at accept
    max_connections: int = 1 << 30
    handshake_timeout_s: float = 10.0
    on_refused: Callable[[str, str], None] | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Close a new connection at once while ``max_connections`` are held."""
        if len(self.active_associations) >= self.max_connections:
            if self.on_refused is not None:
                self.on_refused(str(client_address[0]), "too_many_connections")
            return False
        return True

    def server_bind(self) -> None:
        if self.reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise OSError("SO_REUSEPORT is not available on this platform")
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; with DICOM TLS wrap the socket but leave the handshake to the
        connection's own thread (:meth:`NodeRequestHandler.handle`), so a silent client
        cannot stall the accept loop."""
        assert self.socket is not None
        client, address = self.socket.accept()
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (tests with socketpair) or already closed
            pass
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def _record_connection_refusal(ctx: NodeContext, summary: access.RefusalSummary, host: str,
                               reason: str) -> None:
    """A connection closed before association (PDU limit, deadline, connection cap)."""
    if not summary.record(host, reason):
        return
    try:
        ctx.ledger.append(Event(type=EventType.ASSOCIATION_REJECTED, actor=f"host:{host}",
                                outcome=Outcome.MINOR_FAILURE,
                                payload={"peer_host": host, "reason": reason}))
    except Exception:
        logger.exception("could not record the refused connection in the ledger")


def _reuse_port_server(reuse: bool) -> type[NodeAssociationServer]:
    if not reuse:
        return NodeAssociationServer
    return type("ReusePortAssociationServer", (NodeAssociationServer,), {"reuse_port": True})


class DimseServer:
    """The node's DIMSE SCP.

    Parameters
    ----------
    ctx : NodeContext
        Shared runtime objects.
    services : sequence of ServiceModule, optional
        Defaults to :func:`default_services`.
    reuse_port : bool
        Bind with SO_REUSEPORT so several acceptor processes share the port.

    Examples
    --------
    >>> server = DimseServer(ctx)          # doctest: +SKIP
    >>> server.start()                     # non-blocking
    >>> server.stop(grace_s=30)
    """

    def __init__(self, ctx: NodeContext, services: Sequence[Any] | None = None, *,
                 reuse_port: bool = False):
        self.ctx = ctx
        self.services = list(services) if services is not None else default_services()
        if not self.services:
            raise ValueError("a DIMSE server needs at least one service module")
        self.reuse_port = reuse_port
        s = ctx.settings.dimse
        ae = AE(ae_title=s.ae_title)
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.maximum_pdu_size = s.max_pdu
        # slots are counted by node.dimse.access once the calling AE is accepted;
        # pynetdicom's own count (every connected acceptor) only caps connections
        ae.maximum_associations = s.max_connections
        # access control is done by node.dimse.access (with host binding and a ledger
        # entry per refusal); pynetdicom's own AE checks stay off
        ae.require_calling_aet = []
        ae.require_called_aet = False
        self.contexts = merge_contexts(m.contexts(ctx) for m in self.services)
        # not ``ae.supported_contexts = ...``: pynetdicom's setter drops the SCP/SCU roles
        for cx in self.contexts:
            assert cx.abstract_syntax is not None  # merge_contexts keeps each one's
            ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax,
                                     scu_role=cx.scu_role, scp_role=cx.scp_role)
        self.ae = ae
        self.handlers: list[Handler] = [(evt.EVT_REQUESTED, prefer_requestor_order),
                                        *logs.handlers(ctx)]  # one line per association
        for m in self.services:
            self.handlers.extend(m.handlers(ctx))
        self._server: NodeAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when settings said 0."""
        if self._server is None:
            raise RuntimeError("server not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound address."""
        if self._server is not None:
            raise RuntimeError("server already started")
        s = self.ctx.settings.dimse
        server = self.ae.make_server(
            (s.bind_address, s.port),
            evt_handlers=list(self.handlers),
            server_class=_reuse_port_server(self.reuse_port),
            request_handler=NodeRequestHandler,
            ssl_context=server_context(s.tls) if s.tls is not None else None,
        )
        assert isinstance(server, NodeAssociationServer)  # an instance of server_class
        server.contexts = _ContextList(server.contexts)
        server.node_ctx = self.ctx
        server.pdu_limits = PduLimits.from_settings(s)
        server.max_connections = s.max_connections
        if s.tls is not None:
            server.handshake_timeout_s = s.tls.handshake_timeout_s
        summary = access.summary_for(self.ctx)
        server.on_refused = lambda host, reason: _record_connection_refusal(
            self.ctx, summary, host, reason)
        self.ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2},
            name=f"DimseAcceptor:{s.port}", daemon=True,
        )
        self._thread.start()
        host, port = self.address
        logger.info("DIMSE SCP %s listening on %s:%d (%d presentation contexts)",
                    s.ae_title, host, port, len(self.contexts))
        return host, port

    def active_associations(self) -> list[Any]:
        return [] if self._server is None else list(self._server.active_associations)

    def stop(self, grace_s: float = 30.0) -> None:
        """Graceful stop: refuse new associations (listening socket closed), let open
        associations finish their work for up to ``grace_s`` seconds, then abort what is
        left. In-flight C-STORE operations always complete (commit or nothing)."""
        self.ctx.stopping.set()
        server = self._server
        if server is None:
            return
        server.shutdown()  # stop serve_forever, close the listening socket
        deadline = time.monotonic() + grace_s
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.active_associations()
        if left:
            logger.warning("aborting %d association(s) still open after %.0f s",
                           len(left), grace_s)
            self.ctx.inflight.wait_idle(timeout=max(1.0, deadline - time.monotonic() + 5))
            for assoc in left:
                assoc.abort()
        self.ctx.inflight.wait_idle(timeout=10.0)
        access.summary_for(self.ctx).flush()
        self._server = None
        logger.info("DIMSE SCP stopped")

    def serve_until(self, stop_event: threading.Event, grace_s: float = 30.0) -> None:
        """Start (if needed), block until ``stop_event`` is set, then :meth:`stop`."""
        if self._server is None:
            self.start()
        stop_event.wait()
        self.stop(grace_s)
