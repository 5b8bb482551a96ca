"""One log line per DIMSE association: who (peer address, calling and called AE titles),
what (accepted presentation contexts, requests by type), how it ended (released, aborted,
rejected, connection closed) and how long it took. No PHI: AE titles, addresses, SOP class
names and counts only.

The level is ``[logging] associations`` (INFO by default; DEBUG keeps the lines out of an
INFO log). The per-instance line is written by :mod:`node.dimse.store`.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt

from node.context import NodeContext

logger = logging.getLogger("node.dimse.associations")

__all__ = ["handlers"]

_STATE = "_synthnode_log"
#: Abstract syntaxes named in the line; the rest are counted.
MAX_CONTEXTS_NAMED = 4


def _state(assoc: Any) -> dict[str, Any]:
    st = getattr(assoc, _STATE, None)
    if st is None:
        st = {"start": time.monotonic(), "requests": Counter(), "used": Counter(),
              "done": False}
        setattr(assoc, _STATE, st)
    return st


def _ae(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip() or "?"


def _name(uid: Any) -> str:
    u = UID(str(uid))
    return u.name or str(u)


def _contexts(assoc: Any, used: Counter[str]) -> str:
    """Accepted contexts: how many, and the SOP classes the requests used (by count)."""
    accepted = len(getattr(assoc, "accepted_contexts", []) or [])
    if not accepted:
        return "no context accepted"
    names = [f"{n} x{k}" for n, k in used.most_common(MAX_CONTEXTS_NAMED)]
    more = len(used) - MAX_CONTEXTS_NAMED
    shown = ", ".join(names) + (f" (+{more} more)" if more > 0 else "")
    return f"{accepted} context(s) accepted" + (f", used: {shown}" if shown else "")


def _calling(assoc: Any) -> str:
    req = assoc.requestor
    name = _ae(req.ae_title)
    if name == "?" and getattr(req, "primitive", None) is not None:  # refused before set
        name = _ae(req.primitive.calling_ae_title)
    return name


def line(assoc: Any, outcome: str) -> str:
    """The association's log line (also used by tests)."""
    st = _state(assoc)
    req = assoc.requestor
    requests = st["requests"]
    asked = ", ".join(f"{k} {n}" for k, n in sorted(requests.items())) or "no requests"
    return (f"association {_calling(assoc)} -> {_ae(assoc.acceptor.ae_title)} from "
            f"{req.address}:{req.port}: {outcome} after {time.monotonic() - st['start']:.1f} s; "
            f"{asked}; {_contexts(assoc, st['used'])}")


def handlers(ctx: NodeContext) -> list[tuple[evt.EventType, Callable[..., Any]]]:
    """EVT_CONN_OPEN starts the clock; DIMSE requests are counted; the first of released /
    aborted / rejected / connection closed writes the line."""
    level = getattr(logging, ctx.settings.logging.associations, logging.INFO)

    def opened(event: Any) -> None:
        _state(event.assoc)

    def received(event: Any) -> None:
        name = type(event.message).__name__  # C_STORE_RQ, C_FIND_RQ, ...
        if name.endswith("_RQ"):
            st = _state(event.assoc)
            st["requests"][name[:-3].replace("_", "-")] += 1
            sop = event.message.command_set.get("AffectedSOPClassUID") or \
                event.message.command_set.get("RequestedSOPClassUID")
            if sop:
                st["used"][_name(sop)] += 1

    def ended(how: str) -> Callable[[Any], None]:
        def handler(event: Any) -> None:
            st = _state(event.assoc)
            if st["done"]:
                return
            st["done"] = True
            a = event.assoc
            outcome = how
            if how == "closed":  # the flags say how, when a notification came late
                outcome = next((o for o, flag in (("rejected", a.is_rejected),
                                                  ("released", a.is_released),
                                                  ("aborted", a.is_aborted)) if flag), how)
            try:
                logger.log(level, "%s", line(event.assoc, outcome))
            except Exception:  # a log line must never break the association
                logger.debug("association log line failed", exc_info=True)
        return handler

    return [(evt.EVT_CONN_OPEN, opened), (evt.EVT_DIMSE_RECV, received),
            (evt.EVT_RELEASED, ended("released")), (evt.EVT_ABORTED, ended("aborted")),
            (evt.EVT_REJECTED, ended("rejected")), (evt.EVT_CONN_CLOSE, ended("closed"))]
