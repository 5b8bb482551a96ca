"""Per-peer roles with host binding, and the secure bundled defaults (empty allow-list,
loopback bind): a peer allowed to store cannot query, a query-only peer cannot store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from config.settings import DEFAULT_CONFIG, load_settings
from node.dimse.status import General
from tests.support.dimse import ledger_events, scu_store

CT = get_testdata_file("CT_small.dcm")


def _find(node: Any, calling: str) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(*node.address, ae_title="SYNTHNODE")
    if not assoc.is_established:  # no presentation context accepted: pynetdicom aborts
        return None
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.PatientName = ""
        return [ds for st, ds in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                if st and st.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()


def test_roles_limit_services(start_node: Any, tmp_path: Path) -> None:
    node = start_node(dimse={"allowed_peers": [
        {"ae_title": "STORESCU", "host": "127.0.0.1", "roles": ["store"]},
        {"ae_title": "FINDSCU", "roles": ["query"]},
        {"ae_title": "ELSEWHERE", "host": "10.9.9.9"}]})
    assert scu_store(node.address, [Path(CT)], calling="STORESCU") == [0]
    assert _find(node, "STORESCU") is None  # no C-FIND context for a store-only peer
    found = _find(node, "FINDSCU")
    assert found is not None and len(found) == 1
    f = tmp_path / "x.dcm"
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1137.20.99"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(f, enforce_file_format=True)
    assert scu_store(node.address, [f], calling="FINDSCU") == [int(General.NOT_AUTHORIZED)]
    assert node.ctx.index.get_instance(ds.SOPInstanceUID) is None
    assert any(e.payload.get("reason") == "not_authorized"
               for e in ledger_events(node, "instance.rejected"))


def test_bundled_defaults_are_closed() -> None:
    s = load_settings(DEFAULT_CONFIG)
    assert s.dimse.allowed_peers == []
    assert s.dimse.bind_address == "127.0.0.1"
    assert not s.dimse.accept_any_calling_ae
    assert s.dimse.duplicate_policy.value == "reject"
