"""The node's ATNA feed ([audit.syslog]): a node started with a TLS audit record repository
sends every ledger entry as a PS3.15 A.5 message, with the Patient participant resolved from
its index (the ledger itself keeps only the keyed digest)."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from tests.support.dimse import dcmtk, run_tool
from tests.support.net import wait_for
from tests.support.syslog import SyslogReceiver, make_pki


@pytest.mark.dcmtk
def test_node_feeds_its_ledger_to_a_tls_repository(start_node: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    receiver = SyslogReceiver(pki).start()
    try:
        node = start_node(audit={"syslog": {
            "host": "127.0.0.1", "port": receiver.port, "transport": "tls",
            "ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key), "server_name": "localhost", "poll_s": 0.1}})
        r = run_tool([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1",
                      str(node.address[1]), get_testdata_file("CT_small.dcm")])
        assert r.returncode == 0, r.stdout
        ledger = node.ctx.ledger
        wait_for(lambda: set(receiver.seqs()) >= set(range(ledger.size())), 20, "the feed")
        received = [m for m in receiver.messages if b"110104" in m]
        (msg,) = received  # the one instance.received
        xml = ET.fromstring(msg[msg.index(b"<AuditMessage>"):])
        patients = [po for po in xml.findall("ParticipantObjectIdentification")
                    if po.get("ParticipantObjectTypeCodeRole") == "1"]
        assert [p.get("ParticipantObjectID") for p in patients] == ["1CT1"]
        assert patients[0].find("ParticipantObjectName").text == "CompressedSamples^CT1"
        assert b"1CT1" not in b"".join(e.data for e in ledger.entries())  # not in the ledger
        cursor = node.ctx.settings.syslog_cursor_file
        wait_for(lambda: re.search(rb'"seq": (\d+)', cursor.read_bytes()), 10, "cursor")
    finally:
        receiver.close()
