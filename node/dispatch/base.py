"""What every destination transport shares: the send report, failures and the
:class:`Sender` interface (one implementation per destination kind, see
:mod:`node.dispatch.registry`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from pydicom.dataset import Dataset

from config.sections.pipeline import Destination

__all__ = ["DispatchState", "Failure", "PolicyRefused", "SendReport", "Sender", "all_failed"]


class DispatchState(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # terminal: attempts exhausted or a permanent failure
    REFUSED = "refused"  # policy: nothing was sent


@dataclass(frozen=True)
class Failure:
    reason: str
    transient: bool
    status: int | None = None


@dataclass
class SendReport:
    """Outcome of one send attempt for the instances offered."""

    acknowledged: list[str] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)


class PolicyRefused(Exception):
    """The destination policy forbids sending these instances."""


class Sender(ABC):
    """One destination's transport; kept open between sends (association / session reuse)."""

    def __init__(self, destination: Destination, calling_ae: str) -> None:
        self.destination = destination
        self.calling_ae = calling_ae

    @abstractmethod
    def send(self, datasets: Sequence[Dataset]) -> SendReport:
        """Send ``datasets``; never raises for peer errors (they are in the report)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources."""


def all_failed(
    datasets: Sequence[Dataset], reason: str, transient: bool, status: int | None = None
) -> SendReport:
    return SendReport(
        failed={str(ds.SOPInstanceUID): Failure(reason, transient, status) for ds in datasets}
    )
