"""Resource limits on the DICOM upper layer, enforced before any work (PS3.8 9.3, D.1).

pynetdicom's DUL reads a PDU's 6-byte header and then ``recv(length)`` whatever length the
peer declared, with a per-``recv`` timeout only: a 256 MiB A-ASSOCIATE-RQ is read into
memory before anything looks at it, and a peer trickling one byte per 25 s holds the
thread (and an association slot) forever. :class:`GuardedDUL` replaces that read:

* the declared length is checked first, per PDU type: an A-ASSOCIATE-RQ up to
  ``dimse.max_associate_rq_bytes``; a P-DATA-TF up to the Maximum Length the node
  announced (``dimse.max_pdu``, PS3.8 D.1; a hard ceiling when that is 0 = unlimited);
  release and abort PDUs are tiny. Larger: the connection is aborted, nothing is read;
* the whole PDU must arrive within ``dimse.pdu_read_deadline_s`` (a deadline on the PDU,
  not on each ``recv``), else the connection is aborted.

Each refusal is counted per peer host in :class:`RefusalSummary` (bounded ledger entries).

It also waits instead of polling: pynetdicom's DUL loop sleeps 1 ms whenever it finds no
work, so every received PDU and every response waits for the next tick and an idle
association wakes 1,000 times a second. :class:`GuardedDUL` blocks in ``select`` on the
socket and a wake-up pipe that :meth:`GuardedDUL.send_pdu` writes to, so a PDU is read
as it arrives and a response leaves as soon as it is queued.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom.dul import DULServiceProvider

logger = logging.getLogger(__name__)

__all__ = ["GuardedDUL", "PduLimits"]

_A_ASSOCIATE_RQ, _P_DATA_TF = 0x01, 0x04
_SMALL_PDU = 64 * 1024  # release / abort / unexpected AC, RJ: a few bytes in practice
_UNLIMITED_PDATA = 64 * 1024 * 1024  # ceiling when max_pdu = 0 ("unlimited", PS3.8 D.1)


@dataclass(frozen=True)
class PduLimits:
    max_associate_rq: int
    max_pdata: int
    deadline_s: float

    @classmethod
    def from_settings(cls, s: Any) -> PduLimits:
        return cls(max_associate_rq=s.max_associate_rq_bytes,
                   max_pdata=s.max_pdu if s.max_pdu > 0 else _UNLIMITED_PDATA,
                   deadline_s=s.pdu_read_deadline_s)

    def allowed(self, pdu_type: int) -> int:
        if pdu_type == _A_ASSOCIATE_RQ:
            return self.max_associate_rq
        if pdu_type == _P_DATA_TF:
            return self.max_pdata
        return _SMALL_PDU


class PduRefused(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with the PDU read bounded in size and time (see module doc).
    Installed on each acceptor association by :class:`node.dimse.server.NodeRequestHandler`
    (``limits`` and ``on_refused`` set there)."""

    limits: PduLimits
    on_refused: Any = None  # callable(host, reason) -> None
    #: longest idle wait; the loop's timers (ARTIM, idle) are checked at least this often
    IDLE_WAIT_S = 0.05
    _wake_r = _wake_w = -1

    def enable_waiting(self) -> None:
        """Wait in ``select`` instead of polling (call before the DUL thread starts)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._run_loop_delay = 0  # the wait happens in _is_transport_event

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # pipe full (already awake) or closed
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _is_transport_event(self) -> bool:
        if (self._wake_r >= 0 and not self._kill_thread and self.to_provider_queue.empty()
                and self.event_queue.empty()
                and self.state_machine.current_state != "Sta13"):
            raw = getattr(self.socket, "socket", None)
            if raw is not None and not (isinstance(raw, ssl.SSLSocket) and raw.pending()):
                try:
                    select.select([raw, self._wake_r], [], [], self.IDLE_WAIT_S)
                    while os.read(self._wake_r, 4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
                except (OSError, ValueError):  # socket closed meanwhile: super() reports it
                    pass
        return bool(super()._is_transport_event())

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            r, w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)

    def _recv_exact(self, sock: socket.socket, n: int, deadline: float) -> bytearray:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PduRefused("pdu_read_deadline")
            sock.settimeout(left)
            try:
                chunk = sock.recv(min(n - len(buf), 1 << 16))
            except TimeoutError:
                raise PduRefused("pdu_read_deadline") from None
            if not chunk:
                break
            buf += chunk
        return buf

    def _read_pdu_data(self) -> None:
        assoc_sock = self.socket
        raw = getattr(assoc_sock, "socket", None)
        if raw is None or not hasattr(self, "limits"):
            super()._read_pdu_data()
            return
        old_timeout = raw.gettimeout()
        deadline = time.monotonic() + self.limits.deadline_s
        try:
            head = self._recv_exact(raw, 6, deadline)
            if len(head) < 6:
                self.event_queue.put("Evt17")  # transport closed
                return
            pdu_type, _, length = struct.unpack(">BBL", head)
            if pdu_type not in range(1, 8):
                self.event_queue.put("Evt19")  # unrecognised PDU: A-ABORT
                return
            if length > self.limits.allowed(pdu_type):
                raise PduRefused("pdu_too_large" if pdu_type != _A_ASSOCIATE_RQ
                                 else "associate_rq_too_large")
            body = self._recv_exact(raw, length, deadline)
            if len(body) < length:
                self.event_queue.put("Evt17")
                return
        except PduRefused as exc:
            self._refuse(exc.reason)
            return
        except OSError:
            self.event_queue.put("Evt17")
            return
        finally:
            try:
                raw.settimeout(old_timeout)
            except OSError:
                pass
        try:
            pdu, event = self._decode_pdu(head + body)
        except Exception:
            logger.warning("undecodable PDU from %s", self._peer())
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address)
        except Exception:
            return "?"

    def _refuse(self, reason: str) -> None:
        host = self._peer()
        logger.warning("connection from %s aborted: %s", host, reason)
        if self.on_refused is not None:
            try:
                self.on_refused(host, reason)
            except Exception:
                logger.exception("could not count the refused connection")
        # close now: nothing more is read from this peer (Evt17 ends the association)
        raw = getattr(self.socket, "socket", None)
        try:
            if raw is not None:
                raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.event_queue.put("Evt17")
