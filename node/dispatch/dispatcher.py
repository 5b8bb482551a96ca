"""Dispatch of output series to destinations (design section 1.6, 7 application tier).

* Destination kinds in a registry (:data:`node.dispatch.registry.SENDERS`): ``dimse``
  (C-STORE SCU, PS3.4 B.2, with association reuse and transfer syntax fallback) and
  ``dicomweb`` (STOW-RS, PS3.18 10.5, through dicomweb-client with its own retries off; HTTP
  202 partial success and the Failed SOP Sequence (0008,1198) are handled in
  :mod:`node.dispatch.stow`, since dicomweb-client treats a 202 as success).
* :class:`Dispatcher` applies the destination policy before anything is sent (synthetic
  instances only to destinations with ``accepts_synthetic``; synthetic instances without a
  detectable watermark of ours refused), makes one attempt per call and never re-sends an
  acknowledged instance. Retries are the dispatch job's: the job state machine requeues it
  with the destination's exponential backoff until ``max_attempts``. Every attempt and
  outcome is a ledger event (dispatch.attempted / succeeded / failed).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from audit.events import Event, EventType, Outcome
from config.sections.pipeline import Destination
from node.dispatch.base import DispatchState, Failure, PolicyRefused, Sender
from node.dispatch.registry import make_sender
from storage.synthetic import is_synthetic

logger = logging.getLogger(__name__)

__all__ = ["DispatchResult", "Dispatcher", "WatermarkCheck", "watermark_check"]

ACTOR = "component:dispatch"
#: ceiling of one backoff wait
MAX_BACKOFF_S = 600.0


#: verify(ds) -> True when a watermark of ours is detected in the instance's pixel data
WatermarkCheck = Callable[[Dataset], bool]


def watermark_check(keys: Sequence[Any], *, max_frames: int | None = None) -> WatermarkCheck:
    """A :data:`WatermarkCheck` running ``audit.watermark.detect`` with ``keys`` on the
    stored pixel values. Every frame carries the same mark, so a multi-frame instance is
    judged on up to ``max_frames`` evenly spaced frames (pooled by the detector; default
    ``audit.watermark.core.VERIFY_MAX_FRAMES``, the sample the pipeline verifies at build)."""
    from audit.watermark import detect, sample_frames
    from audit.watermark.core import VERIFY_MAX_FRAMES

    frames = max_frames or VERIFY_MAX_FRAMES

    def check(ds: Dataset) -> bool:
        if not keys or ("PixelData" not in ds):
            return False
        try:
            arr = np.asarray(ds.pixel_array)
        except Exception:
            return False
        if arr.ndim == 3:
            arr = arr[sample_frames(arr.shape[0], frames)]
        return bool(detect(arr, list(keys)).marked)

    return check


@dataclass
class DispatchResult:
    destination: str
    state: DispatchState
    attempts: int
    acknowledged: list[str]
    failed: dict[str, Failure]
    reason: str = ""


class Dispatcher:
    """Send instances to named destinations under policy, with retries and ledger events.

    Parameters
    ----------
    destinations
        configured destinations (``pipeline.destinations``).
    ledger
        the ledger's append API (``audit.ledger.Ledger``); None = no events (tests only).
    watermark
        :data:`WatermarkCheck` for synthetic instances; None refuses every synthetic one.
    calling_ae
        our AE title for C-STORE.
    sender_factory
        destination -> transport (default :func:`node.dispatch.registry.make_sender`).
    """

    def __init__(
        self,
        destinations: Iterable[Destination],
        *,
        ledger: Any = None,
        watermark: WatermarkCheck | None = None,
        calling_ae: str = "SYNTHNODE",
        sender_factory: Callable[[Destination, str], Sender] = make_sender,
    ) -> None:
        self.destinations = {d.name: d for d in destinations}
        self.ledger = ledger
        self.watermark = watermark
        self.calling_ae = calling_ae
        self.sender_factory = sender_factory
        self._senders: dict[str, Sender] = {}

    def backoff(self, destination: Destination, attempt: int) -> float:
        """Wait after failed attempt ``attempt`` (1-based): backoff_s * 2**(attempt-1), capped."""
        return float(min(MAX_BACKOFF_S, destination.backoff_s * (2 ** (attempt - 1))))

    def _event(
        self, type_: EventType, outcome: Outcome, subject: dict[str, Any], payload: dict[str, Any]
    ) -> None:
        if self.ledger is not None:
            self.ledger.append(
                Event(type=type_, actor=ACTOR, outcome=outcome, subject=subject, payload=payload)
            )

    def check_policy(self, datasets: Sequence[Dataset], destination: Destination) -> None:
        """Raise :class:`PolicyRefused` unless every instance may go to ``destination``."""
        synthetic = [ds for ds in datasets if is_synthetic(ds)]
        if synthetic and not destination.accepts_synthetic:
            raise PolicyRefused(
                f"destination {destination.name!r} does not accept synthetic data "
                f"({len(synthetic)} synthetic instance(s))"
            )
        for ds in synthetic:
            if self.watermark is None or not self.watermark(ds):
                raise PolicyRefused(
                    f"synthetic instance {ds.SOPInstanceUID} has no detectable watermark"
                )

    def sender(self, destination: Destination) -> Sender:
        s = self._senders.get(destination.name)
        if s is None:
            s = self.sender_factory(destination, self.calling_ae)
            self._senders[destination.name] = s
        return s

    def send(
        self,
        datasets: Sequence[Dataset],
        destination: str,
        *,
        job_id: str | None = None,
        already_acknowledged: Collection[str] = (),
        attempt: int = 1,
        terminal: bool = True,
    ) -> DispatchResult:
        """One send attempt of ``datasets`` to ``destination`` under policy.

        Retries belong to the job state machine (a dispatch job makes one attempt per job
        attempt and is requeued with the destination's backoff, :meth:`backoff`), so this
        never loops or sleeps. ``already_acknowledged`` SOP Instance UIDs (from earlier
        attempts) are not sent again. ``attempt`` is the job's attempt number for the ledger;
        ``terminal=False`` while the job has attempts left, so a transient failure is recorded
        as "retry_scheduled", not "failed". Never raises for peer errors or policy refusals.
        """
        try:
            dest = self.destinations[destination]
        except KeyError:
            raise ValueError(f"unknown destination {destination!r}") from None
        subject: dict[str, Any] = {"destination": dest.name}
        if datasets:
            subject["study_uid"] = str(datasets[0].StudyInstanceUID)
            series = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
            subject["series_uid"] = series[0] if len(series) == 1 else series
        if job_id is not None:
            subject["job_id"] = job_id
        try:
            self.check_policy(datasets, dest)
        except PolicyRefused as exc:
            logger.warning("dispatch to %s refused: %s", dest.name, exc)
            self._event(
                EventType.DISPATCH_FAILED,
                Outcome.SERIOUS_FAILURE,
                subject,
                {"state": DispatchState.REFUSED.value, "error": str(exc), "attempts": 0},
            )
            return DispatchResult(dest.name, DispatchState.REFUSED, 0, [], {}, str(exc))

        done = set(already_acknowledged)
        pending = [ds for ds in datasets if str(ds.SOPInstanceUID) not in done]
        acknowledged: list[str] = []
        failed: dict[str, Failure] = {}
        attempts = 0
        if pending:
            attempts = 1
            self._event(
                EventType.DISPATCH_ATTEMPTED,
                Outcome.SUCCESS,
                subject,
                {"attempt": attempt, "instances": len(pending), "kind": dest.kind,
                 "sop_uids": [str(ds.SOPInstanceUID) for ds in pending]},
            )
            t0 = time.monotonic()
            report = self.sender(dest).send(pending)
            ms = int((time.monotonic() - t0) * 1000)
            acknowledged = list(report.acknowledged)
            failed = dict(report.failed)
            logger.info(
                "dispatch %s attempt %d: %d acknowledged, %d transient, %d permanent (%d ms)",
                dest.name, attempt, len(acknowledged),
                sum(f.transient for f in failed.values()),
                sum(not f.transient for f in failed.values()), ms,
            )
        if failed:
            reasons = sorted({f.reason for f in failed.values()})
            final = terminal or any(not f.transient for f in failed.values())
            self._event(
                EventType.DISPATCH_FAILED,
                Outcome.MAJOR_FAILURE if not acknowledged else Outcome.SERIOUS_FAILURE,
                subject,
                {
                    "state": DispatchState.FAILED.value if final else "retry_scheduled",
                    "attempts": attempt,
                    "acknowledged": len(acknowledged) + len(done),
                    "sop_uids": sorted(failed),
                    "failed": {u: f.reason for u, f in sorted(failed.items())},
                    "error": "; ".join(reasons),
                },
            )
            return DispatchResult(
                dest.name, DispatchState.FAILED, attempts, acknowledged, failed, "; ".join(reasons)
            )
        self._event(
            EventType.DISPATCH_SUCCEEDED,
            Outcome.SUCCESS,
            subject,
            {
                "attempts": attempt,
                "acknowledged": len(acknowledged) + len(done),
                "sop_uids": sorted(acknowledged),
            },
        )
        return DispatchResult(dest.name, DispatchState.SUCCEEDED, attempts, acknowledged, {})

    def close(self) -> None:
        for s in self._senders.values():
            s.close()
        self._senders.clear()
