"""The directly encoded C-STORE-RSP equals pynetdicom's encoding of the same response."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node.dimse import server as server_module
from node.dimse.server import store_rsp_command
from tests.support.dimse import dcmtk


@pytest.mark.parametrize(("sop_class", "sop_inst", "msg_id", "status"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1", 1, 0x0000),  # odd UID
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", 65535, 0xB000),  # even UID, warning
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5", 7, 0xA700),
])
def test_store_rsp_command_matches_pynetdicom(sop_class: str, sop_inst: str, msg_id: int,
                                              status: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_inst
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 0))
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"
    assert store_rsp_command(sop_class, msg_id, status, sop_inst) == pdv[1:]


@pytest.mark.dcmtk
def test_storescu_is_answered_by_the_direct_encoder(start_node: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real association (DCMTK storescu) a plain success is encoded by
    :func:`store_rsp_command`, and DCMTK accepts it; with pynetdicom's logger at INFO its
    own handlers stay bound and its encoder answers (the fallback)."""
    calls: list[tuple[Any, ...]] = []

    def counted(*args: Any) -> bytes:
        calls.append(args)
        return store_rsp_command(*args)

    monkeypatch.setattr(server_module, "store_rsp_command", counted)
    logger = logging.getLogger("pynetdicom")
    original = logger.level
    try:
        for level, expected in ((logging.WARNING, 1), (logging.INFO, 0)):
            logger.setLevel(level)  # setLevel also clears logging's isEnabledFor cache
            node = start_node()
            calls.clear()
            src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            src.SOPInstanceUID = generate_uid()
            src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
            path = tmp_path / f"ct-{level}.dcm"
            src.save_as(path, enforce_file_format=True)
            host, port = node.address
            r = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", host,
                                str(port), str(path)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert node.ctx.index.get_instance(str(src.SOPInstanceUID)) is not None
            assert len(calls) == expected
            if expected:
                assert calls[0][1:3] == (1, 0x0000)  # message ID 1, success
    finally:
        logger.setLevel(original)


@pytest.mark.dcmtk
def test_acceptor_loop_serves_without_sleeping(start_node: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's acceptor loop sleeps 1 ms at the top of every turn, so each request of
    an association waited up to a millisecond before it was served; the node's loop waits
    on the message queue instead. Ten C-STOREs and the release over one real association
    (DCMTK storescu): stored, released, and no 1 ms sleep in the association's thread."""
    import threading
    import time

    sleeps: list[str] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        name = threading.current_thread().name
        if seconds == 0.001 and name.startswith("AcceptorThread"):
            sleeps.append(name)
        real_sleep(seconds)

    node = start_node()
    paths, uids = [], []
    for i in range(10):
        src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        uids.append(str(src.SOPInstanceUID))
        paths.append(tmp_path / f"ct{i}.dcm")
        src.save_as(paths[-1], enforce_file_format=True)
    monkeypatch.setattr(time, "sleep", sleep)
    host, port = node.address
    r = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", host,
                        str(port), *map(str, paths)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(node.ctx.index.get_instance(u) is not None for u in uids)
    assert sleeps == []
