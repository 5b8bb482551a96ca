"""Denial of service without any AE credential: connections that never associate, an
A-ASSOCIATE-RQ declaring 256 MiB, an oversized P-DATA-TF PDU, a request trickled byte by
byte, refusal floods. Real sockets against a real node; a legitimate pynetdicom peer
must keep getting in."""
from __future__ import annotations

import socket
import struct
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.dimse import ledger_events


def _echo(node: Any, calling: str = "ECHOSCU") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate(*node.address, ae_title="SYNTHNODE")
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        return status.Status if status else None
    return assoc


def _closed_by_peer(sock: socket.socket, timeout: float = 20.0) -> bool:
    """True once the node has closed the connection (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _reasons(node: Any) -> list[str]:
    return [e.payload.get("reason") for e in ledger_events(node, "association.rejected")]


def test_idle_connections_take_no_association_slot(start_node: Any) -> None:
    node = start_node(dimse={"max_associations": 2, "acse_timeout_s": 30})
    idle = [socket.create_connection(node.address) for _ in range(20)]
    try:
        time.sleep(0.5)
        assert _echo(node) == 0  # pending connections do not count as associations
        assert _echo(node) == 0
    finally:
        for s in idle:
            s.close()


def test_oversized_associate_rq_is_not_read(start_node: Any) -> None:
    node = start_node(dimse={"max_associate_rq_bytes": 64 * 1024})
    s = socket.create_connection(node.address)
    s.sendall(struct.pack(">BBL", 0x01, 0, 256 * 1024 * 1024) + b"\0" * 1024)
    assert _closed_by_peer(s), "the node kept reading a 256 MiB A-ASSOCIATE-RQ"
    s.close()
    assert "associate_rq_too_large" in _reasons(node)
    assert _echo(node) == 0


def test_oversized_pdata_aborts_association(start_node: Any) -> None:
    node = start_node(dimse={"max_pdu": 16382})
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate(*node.address, ae_title="SYNTHNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    try:
        raw.sendall(struct.pack(">BBL", 0x04, 0, 64 * 1024 * 1024) + b"\0" * 4096)
    except OSError:
        pass
    for _ in range(200):
        if not assoc.is_established:
            break
        time.sleep(0.1)
    assert assoc.is_aborted or not assoc.is_established
    assert "pdu_too_large" in _reasons(node)
    assert _echo(node) == 0


def test_trickled_request_hits_the_pdu_deadline(start_node: Any) -> None:
    node = start_node(dimse={"pdu_read_deadline_s": 2, "acse_timeout_s": 60})
    s = socket.create_connection(node.address)
    s.settimeout(1)
    header = struct.pack(">BBL", 0x01, 0, 200)
    closed = False
    for i in range(40):  # one byte a second: never a whole PDU
        try:
            s.send(header[i:i + 1] if i < len(header) else b"\0")
        except OSError:
            closed = True
            break
        try:
            if s.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        except OSError:
            closed = True
            break
    s.close()
    assert closed, "the node held a trickled request for 40 s"
    assert "pdu_read_deadline" in _reasons(node)


def test_per_host_cap(start_node: Any) -> None:
    node = start_node(dimse={"max_associations": 10, "max_associations_per_host": 2})
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    held = [ae.associate(*node.address, ae_title="SYNTHNODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = ae.associate(*node.address, ae_title="SYNTHNODE")
    assert third.is_rejected
    for a in held:
        a.release()
    assert _echo(node) == 0


def test_refusal_flood_is_summarised(start_node: Any) -> None:
    node = start_node()
    for _ in range(30):
        r = _echo(node, calling="INTRUDER")
        assert getattr(r, "is_rejected", False)
    rej = [e for e in ledger_events(node, "association.rejected")
           if e.payload.get("reason") == "calling_ae_not_recognized"]
    assert len(rej) == 1  # the first, in full
    node.stop(grace_s=1)
    rej = [e for e in ledger_events(node, "association.rejected")
           if e.payload.get("reason") == "calling_ae_not_recognized"]
    assert len(rej) == 2 and rej[1].payload["count"] == 29


def test_connection_cap(start_node: Any) -> None:
    node = start_node(dimse={"max_connections": 4, "acse_timeout_s": 5})
    idle = [socket.create_connection(node.address) for _ in range(4)]
    try:
        for _ in range(100):  # every idle connection has its acceptor thread (loaded CI)
            if len(node.dimse.active_associations()) >= 4:
                break
            time.sleep(0.1)
        extra = socket.create_connection(node.address)
        assert _closed_by_peer(extra, 10), "a fifth connection was kept"
        extra.close()
    finally:
        for s in idle:
            s.close()
    assert "too_many_connections" in _reasons(node)
    for _ in range(100):  # idle connections are dropped after acse_timeout_s
        if _echo(node) == 0:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the node did not serve again after the idle connections left")
