"""DICOM TLS on the SCP (BCP 195 profile): DCMTK echoscu with a client certificate gets
in; a certificate of another Common Name than the peer's ``tls_subject`` is refused; a
plain-TCP client and a silent client fail their handshake without stopping the node."""
from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.dimse import dcmtk, ledger_events
from tests.support.tls import Pki


def _tls_node(start_node: Any, pki: Pki) -> Any:
    crt, key = pki.server
    return start_node(dimse={
        "tls": {"cert_file": str(crt), "key_file": str(key), "ca_file": str(pki.ca_file),
                "handshake_timeout_s": 3},
        "allowed_peers": [{"ae_title": "ECHOSCU", "tls_subject": "modality-1"},
                          {"ae_title": "TESTSCU"}]})


def _echoscu(node: Any, pki: Pki, cn: str) -> subprocess.CompletedProcess[str]:
    crt, key = pki.client(cn)
    host, port = node.address
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "SYNTHNODE", "+tls", str(key), str(crt),
         "+cf", str(pki.ca_file), host, str(port)],
        capture_output=True, text=True, timeout=60)


def test_dcmtk_echo_over_tls_with_client_certificate(start_node: Any, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    node = _tls_node(start_node, pki)
    r = _echoscu(node, pki, "modality-1")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _echoscu(node, pki, "someone-else")  # valid certificate, wrong subject for ECHOSCU
    assert r.returncode != 0
    reasons = [e.payload.get("reason") for e in ledger_events(node, "association.rejected")]
    assert "calling_ae_not_recognized" in reasons


def test_plain_and_silent_clients_fail_handshake(start_node: Any, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    node = _tls_node(start_node, pki)
    silent = socket.create_connection(node.address)  # never sends a ClientHello
    try:
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(Verification)
        plain = ae.associate(*node.address, ae_title="SYNTHNODE")  # no TLS
        assert not plain.is_established
        crt, key = pki.client("anything")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_file))
        ctx.load_cert_chain(str(crt), str(key))
        good = ae.associate(*node.address, ae_title="SYNTHNODE", tls_args=(ctx, "localhost"))
        assert good.is_established  # while the silent client still holds its connection
        assert good.send_c_echo().Status == 0
        good.release()
    finally:
        silent.close()
    assert "tls_handshake_failed" in [e.payload.get("reason")
                                      for e in ledger_events(node, "association.rejected")]


def test_cstore_dispatch_over_tls(start_node: Any, tmp_path: Path) -> None:
    """The node's C-STORE sender to a destination with tls_ca_file (mutual TLS) delivers
    to a TLS-only SCP (another node)."""
    import pydicom
    from pydicom.data import get_testdata_file

    from config.sections.pipeline import Destination
    from node.dispatch.dimse import DimseSender

    pki = Pki(tmp_path / "pki")
    crt, key = pki.server
    target = start_node(dimse={
        "tls": {"cert_file": str(crt), "key_file": str(key), "ca_file": str(pki.ca_file)},
        "allowed_peers": [{"ae_title": "SYNTHNODE", "tls_subject": "sender-node"}]})
    ccrt, ckey = pki.client("sender-node")
    _host, port = target.address
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    plain = DimseSender(Destination(name="plain", kind="dimse", ae_title="SYNTHNODE",
                                    host="localhost", port=port), "SYNTHNODE")
    assert not plain.send([ds]).acknowledged
    plain.close()
    sender = DimseSender(Destination(
        name="tls", kind="dimse", ae_title="SYNTHNODE", host="localhost", port=port,
        tls_ca_file=pki.ca_file, tls_cert_file=ccrt, tls_key_file=ckey), "SYNTHNODE")
    try:
        report = sender.send([ds])
    finally:
        sender.close()
    assert report.acknowledged == [str(ds.SOPInstanceUID)]
    assert target.ctx.index.get_instance(str(ds.SOPInstanceUID)) is not None
