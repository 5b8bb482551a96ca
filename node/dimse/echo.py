"""Verification Service Class SCP: C-ECHO (PS3.4 Annex A; PS3.7 9.1.5)."""
from __future__ import annotations

from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.context import NodeContext
from node.dimse.status import General

__all__ = ["contexts", "handlers"]


def contexts(ctx: NodeContext) -> list[PresentationContext]:
    """Verification SOP Class with the uncompressed transfer syntaxes (PS3.4 A.4)."""
    return [build_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]


def _handle_echo(event: evt.Event) -> int:
    """C-ECHO-RSP status: Success (PS3.4 A.4 lists only Success; PS3.7 9.1.5.1.4)."""
    return General.SUCCESS


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Any]]:
    return [(evt.EVT_C_ECHO, _handle_echo)]
