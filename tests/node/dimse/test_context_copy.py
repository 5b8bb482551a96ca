"""The server's presentation contexts are copied per association cheaply
(node.dimse.server._ContextList) but as independently as pynetdicom's deep copy: what
negotiation changes on one association's copy (the transfer syntax order) never reaches
the server's list or another association."""
from __future__ import annotations

import copy

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context

from node.dimse.server import _ContextList


def test_copies_are_independent() -> None:
    server = _ContextList([build_context("1.2.840.10008.5.1.4.1.1.2",
                                         [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
    a, b = copy.deepcopy(server), copy.deepcopy(server)
    assert a[0] is not server[0] and a[0] is not b[0]
    a[0].transfer_syntax = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]  # as negotiation
    a[0]._transfer_syntax.append("1.2.840.10008.1.2.5")
    assert server[0].transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert b[0].transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert a[0].abstract_syntax == server[0].abstract_syntax
