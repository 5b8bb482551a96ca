"""Destination kinds -> transports (registry + interface, like mercure's
``dispatch/target_types``): a new kind is one module with a :class:`~node.dispatch.base.Sender`
and one line here."""
from __future__ import annotations

from collections.abc import Callable

from config.sections.pipeline import Destination
from node.dispatch.base import Sender
from node.dispatch.dimse import DimseSender
from node.dispatch.stow import StowSender

__all__ = ["SENDERS", "make_sender"]


#: destination kind -> transport
SENDERS: dict[str, Callable[[Destination, str], Sender]] = {
    "dimse": DimseSender,
    "dicomweb": StowSender,
}


def make_sender(destination: Destination, calling_ae: str) -> Sender:
    try:
        factory = SENDERS[destination.kind]
    except KeyError:
        raise ValueError(
            f"unknown destination kind {destination.kind!r}; known: {sorted(SENDERS)}"
        ) from None
    return factory(destination, calling_ae)
