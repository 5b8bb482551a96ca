"""Association access control: calling-AE allow-list with host binding, called-AE check,
association limit; each refusal answered with the PS3.8 reason and recorded."""
from __future__ import annotations

import subprocess
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dimse.access import AccessPolicy, Refusal
from tests.support.dimse import dcmtk, ledger_events

pytestmark = pytest.mark.dcmtk


def _echoscu(node: Any, calling: str, called: str = "SYNTHNODE") -> subprocess.CompletedProcess[str]:
    host, port = node.address
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", called, host, str(port)],
                          capture_output=True, text=True, timeout=60)


def _associate(node: Any, calling: str, called: str = "SYNTHNODE") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate(*node.address, ae_title=called)


def test_unknown_calling_ae_refused_and_recorded(start_node: Any) -> None:
    node = start_node()
    r = _echoscu(node, "INTRUDER")
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in (r.stdout + r.stderr) or "rejected" in (
        r.stdout + r.stderr).lower()
    assoc = _associate(node, "INTRUDER")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == Refusal.CALLING_AE_NOT_RECOGNIZED.value
    rej = ledger_events(node, "association.rejected")
    # the first refusal per host and reason at once; the repeat is counted for the summary
    assert len(rej) == 1 and rej[0].payload["calling_ae"] == "INTRUDER"
    assert rej[0].payload["reason"] == "calling_ae_not_recognized"
    # an allowed AE still gets in afterwards
    assert _echoscu(node, "ECHOSCU").returncode == 0
    node.stop(grace_s=1)  # writes the window's summary
    (summ,) = [e for e in ledger_events(node, "association.rejected")
               if e.payload.get("summary")]
    assert summ.payload["count"] == 1 and summ.payload["peer_host"] == "127.0.0.1"


def test_called_ae_checked(start_node: Any) -> None:
    node = start_node()
    assoc = _associate(node, "ECHOSCU", called="NOT-US")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == Refusal.CALLED_AE_NOT_RECOGNIZED.value
    node2 = start_node(dimse={"check_called_ae": False})
    assoc = _associate(node2, "ECHOSCU", called="ANY-NAME")
    assert assoc.is_established
    assoc.release()


def test_host_binding(start_node: Any) -> None:
    node = start_node(dimse={"allowed_peers": [
        {"ae_title": "PINNED", "host": "10.1.2.3"}, {"ae_title": "LOCAL", "host": "127.0.0.1"}]})
    assoc = _associate(node, "PINNED")  # right AE, wrong host
    assert assoc.is_rejected
    assoc = _associate(node, "LOCAL")
    assert assoc.is_established
    assoc.release()
    (ev,) = ledger_events(node, "association.rejected")
    assert ev.payload["peer_host"] == "127.0.0.1" and ev.payload["calling_ae"] == "PINNED"


def test_association_limit(start_node: Any) -> None:
    node = start_node(dimse={"max_associations": 2})
    held = [_associate(node, "ECHOSCU") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = _associate(node, "ECHOSCU")
    assert third.is_rejected
    rsp = third.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == Refusal.LOCAL_LIMIT_EXCEEDED.value
    for a in held:
        a.release()
    fourth = _associate(node, "ECHOSCU")
    assert fourth.is_established
    fourth.release()


def test_policy_unit() -> None:
    p = AccessPolicy(ae_title="SN", allowed=(("A", None), ("B", "10.0.0.2")),
                     accept_any_calling_ae=False, check_called_ae=True, max_associations=1)
    assert p.check("A", "SN", "1.1.1.1", 1) is None
    assert p.check("A  ", "SN ", "1.1.1.1", 1) is None  # trailing spaces not significant
    assert p.check("B", "SN", "10.0.0.3", 1) is Refusal.CALLING_AE_NOT_RECOGNIZED
    assert p.check("B", "SN", "10.0.0.2", 1) is None
    assert p.check("A", "XX", "1.1.1.1", 1) is Refusal.CALLED_AE_NOT_RECOGNIZED
    assert p.check("A", "SN", "1.1.1.1", 2) is Refusal.LOCAL_LIMIT_EXCEEDED
    assert p.check("A", "SN", "1.1.1.1", 1, stopping=True) is Refusal.TEMPORARY_CONGESTION
    anyone = AccessPolicy("SN", (), True, False, 4)
    assert anyone.check("WHOEVER", "OTHER", "9.9.9.9", 1) is None
