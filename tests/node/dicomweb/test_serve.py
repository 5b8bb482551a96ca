"""``synthnode serve`` runs the DICOMweb server beside the DIMSE SCP, in one process on
one context: an instance sent with C-STORE is found with QIDO-RS, one sent with STOW-RS
is found with C-FIND; SIGTERM stops both."""
from __future__ import annotations

import re
from typing import Any

import httpx

from tests.support.dicomweb import auth, multipart, web_overrides
from tests.support.dimse import SPECS, dcmtk, make_dataset, part10, run_tool, scu_store
from tests.support.net import wait_for


def test_serve_runs_dicomweb_beside_dimse(node_process: Any, tmp_path: Any) -> None:
    proc = node_process(dicomweb=web_overrides(access_flush_s=1.0))
    line = wait_for(lambda: re.search(r"DICOMweb (\S+)/studies", proc.output()), 30,
                    "the DICOMweb line")
    url = line.group(1)
    # C-STORE in, QIDO-RS out
    ds = make_dataset(SPECS[0])
    f = tmp_path / "a.dcm"
    f.write_bytes(part10(ds))
    assert scu_store(("127.0.0.1", proc.port), [f]) == [0]
    r = httpx.get(url + "/instances", headers=auth("reader"))
    assert [x["00080018"]["Value"][0] for x in r.json()] == [SPECS[0].sop_uid]
    # STOW-RS in, C-FIND out (findscu)
    body = multipart([part10(make_dataset(SPECS[5]))])
    r = httpx.post(url + "/studies", content=body, headers={
        **auth("rw"), "Content-Type": 'multipart/related; type="application/dicom"; '
                                      'boundary=b0undary'})
    assert r.status_code == 200
    out = run_tool([dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-aec", "SYNTHNODE",
                    "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={SPECS[5].study_uid}",
                    "127.0.0.1", str(proc.port)])
    assert SPECS[5].study_uid in out.stdout
    assert proc.terminate() == 0


def test_taken_http_port_stops_the_node_cleanly(tmp_path: Any) -> None:
    """The HTTP port is taken: start fails with OSError and the DIMSE SCP is not left
    running (no half-started node)."""
    import socket

    import pytest

    from config.settings import load_settings
    from node.app import create_node
    from tests.support.dimse import node_settings_dict
    from tests.support.net import get_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        dimse_port = get_port()
        settings = load_settings(None, **node_settings_dict(
            tmp_path, dimse_port, dicomweb=web_overrides(port=s.getsockname()[1])))
        node = create_node(settings)
        with pytest.raises(OSError):
            node.start()
    with socket.socket() as c, pytest.raises(ConnectionRefusedError):
        c.connect(("127.0.0.1", dimse_port))
