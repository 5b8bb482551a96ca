"""A C-STORE whose Affected SOP Class UID is not its presentation context's abstract syntax
(PS3.7 9.1.1.1.2) is answered 0x0122 with a ledger entry; the association stays up
(pynetdicom alone would abort it)."""
from __future__ import annotations

import time
from io import BytesIO
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from node.dimse.status import General
from tests.support.dimse import ledger_events


def test_affected_sop_class_not_the_contexts(start_node: Any) -> None:
    node = start_node()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(*node.address, ae_title="SYNTHNODE")
    assert assoc.is_established
    try:
        (cx,) = assoc.accepted_contexts
        req = C_STORE()
        req.MessageID = 7
        req.AffectedSOPClassUID = MRImageStorage  # the CT context carries an MR request
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = BytesIO(fp.getvalue())
        # pause the requestor's reactor as pynetdicom's own send_* methods do
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == int(General.SOP_CLASS_NOT_SUPPORTED)
        assert rsp.MessageIDBeingRespondedTo == 7
        # the association is still usable: a proper CT object on it is stored
        assert assoc.is_established
        ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert assoc.send_c_store(ct).Status == 0
    finally:
        assoc.release()
    (ev,) = ledger_events(node, "instance.rejected")
    assert ev.payload["reason"] == "sop_class_not_context"
    assert ev.subject["sop_uid"] == ds.SOPInstanceUID
    assert [i.sop_class_uid for i in node.ctx.index.instances()] == [CTImageStorage]
