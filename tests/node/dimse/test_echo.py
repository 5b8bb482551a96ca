"""C-ECHO against the node with DCMTK echoscu and with ``synthnode echo``."""
from __future__ import annotations

import subprocess
from typing import Any

import pytest
from typer.testing import CliRunner

from audit.events import EventType
from node.cli import app
from tests.support.dimse import dcmtk

pytestmark = pytest.mark.dcmtk


def _types(node: Any) -> list[str]:
    return [e.event.type.value if hasattr(e.event.type, "value") else e.event.type
            for e in node.ctx.ledger.entries()]


def test_echoscu(start_node: Any) -> None:
    node = start_node()
    host, port = node.address
    out = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "SYNTHNODE", host,
                          str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    types = _types(node)
    assert types[:2] == ["config.loaded", "node.started"]
    assert "association.accepted" in types


def test_synthnode_echo_cli(start_node: Any) -> None:
    node = start_node(dimse={"allowed_peers": [{"ae_title": "SYNTHNODE-CLI"}]})
    host, port = node.address
    r = CliRunner().invoke(app, ["echo", host, str(port), "SYNTHNODE"])
    assert r.exit_code == 0, r.output
    assert "success" in r.output
    # a wrong called AE title is refused: the command fails
    r = CliRunner().invoke(app, ["echo", host, str(port), "OTHER"])
    assert r.exit_code == 1
    assert EventType.ASSOCIATION_REJECTED.value in _types(node)


def test_accepted_sockets_have_tcp_nodelay(start_node: Any) -> None:
    import socket
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    node = start_node()
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(*node.address, ae_title="SYNTHNODE")
    assert assoc.is_established
    try:
        deadline = time.monotonic() + 10
        while not node.dimse.active_associations() and time.monotonic() < deadline:
            time.sleep(0.01)
        (acceptor,) = node.dimse.active_associations()
        sock = acceptor.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
