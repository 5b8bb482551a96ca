"""What the node log says about DIMSE traffic: one line per association (peer, AE titles,
contexts, outcome) and per stored instance (UIDs, size, status), at the configured level,
without PHI; an idle association of a dispatch is released and logged at INFO, not ERROR."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from tests.support.dimse import dcmtk, dcmtk_storescp, run_tool

FILES = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


@pytest.mark.dcmtk
def test_one_line_per_association_and_per_instance(start_node: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    node = start_node()
    port = str(node.address[1])
    r = run_tool([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1", port,
                  *FILES])
    assert r.returncode == 0, r.stdout
    run_tool([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "SYNTHNODE", "127.0.0.1", port])
    deadline = time.monotonic() + 10
    while len(_lines(caplog, "node.dimse.associations")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stored, refused = _lines(caplog, "node.dimse.associations")
    assert stored.levelno == logging.INFO
    msg = stored.getMessage()
    assert msg.startswith("association STORESCU -> SYNTHNODE from 127.0.0.1:")
    assert ": released after" in msg and "C-STORE 2" in msg
    assert "used: CT Image Storage x1, MR Image Storage x1" in msg
    assert refused.getMessage().startswith("association INTRUDER -> SYNTHNODE")
    assert "rejected" in refused.getMessage()
    instances = _lines(caplog, "node.dimse.instances")
    assert len(instances) == 2 and all(x.levelno == logging.INFO for x in instances)
    ct = pydicom.dcmread(FILES[0], stop_before_pixels=True)
    first = instances[0].getMessage()
    for uid in (ct.SOPInstanceUID, ct.SeriesInstanceUID, ct.StudyInstanceUID):
        assert str(uid) in first
    assert "status 0x0000 stored" in first and "bytes" in first
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "CompressedSamples" not in text and "1CT1" not in text  # no names, no Patient IDs


@pytest.mark.dcmtk
def test_levels_are_configurable(start_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    node = start_node(logging={"associations": "DEBUG", "instances": "DEBUG"})
    r = run_tool([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1",
                  str(node.address[1]), FILES[0]])
    assert r.returncode == 0
    time.sleep(0.3)
    assert not _lines(caplog, "node.dimse.associations")
    assert not _lines(caplog, "node.dimse.instances")


@pytest.mark.dcmtk
def test_idle_dispatch_association_is_released_at_info(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from config.sections.pipeline import Destination
    from node.dispatch.dimse import DimseSender

    caplog.set_level(logging.INFO)
    with dcmtk_storescp(tmp_path / "scp") as port:
        sender = DimseSender(Destination(name="pacs", kind="dimse", ae_title="STORESCP",
                                         host="127.0.0.1", port=port), "SYNTHNODE",
                             network_timeout=1)
        report = sender.send([pydicom.dcmread(FILES[0])])
        assert len(report.acknowledged) == 1
        time.sleep(2.5)  # idle longer than the timeout
        assert sender.send([pydicom.dcmread(FILES[1])]).acknowledged  # a new association
        sender.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any("released the idle association to pacs" in r.getMessage()
               and r.levelno == logging.INFO for r in caplog.records)
    assert sender.associations_opened == 2
