"""The directly encoded C-STORE-RSP equals pynetdicom's encoding of the same response."""
from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node.dimse.server import store_rsp_command


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
