"""Dispatch of output series to destinations (design section 1.6, 7 application tier).

* Destination types in a registry (:data:`SENDERS`): ``dimse`` (C-STORE SCU, PS3.4 B.2, with
  association reuse and transfer syntax fallback) and ``dicomweb`` (STOW-RS, PS3.18 10.5,
  through dicomweb-client with its own retries off; HTTP 202 partial success and the
  Failed SOP Sequence (0008,1198) are handled here, since dicomweb-client treats a 202 as
  success).
* :class:`Dispatcher` applies the destination policy before anything is sent (synthetic
  instances only to destinations with ``accepts_synthetic``; synthetic instances without a
  detectable watermark of ours refused), retries transient failures with exponential
  backoff, never re-sends an acknowledged instance, and ends in a terminal state after
  ``max_attempts``. Every attempt and outcome is a ledger event (dispatch.attempted /
  succeeded / failed).
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID

from audit.events import Event, EventType, Outcome
from config.sections.pipeline import Destination
from node import codes
from node.dimse.status import Category, General, Storage, category

logger = logging.getLogger(__name__)

ACTOR = "component:dispatch"
#: ceiling of one backoff wait
MAX_BACKOFF_S = 600.0
#: STOW-RS instances per request
STOW_BATCH = 50
#: uncompressed transfer syntaxes offered as fallback for every SOP class
FALLBACK_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


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


def _all_failed(datasets: Sequence[Dataset], reason: str, transient: bool, status: int | None = None) -> SendReport:
    return SendReport(
        failed={str(ds.SOPInstanceUID): Failure(reason, transient, status) for ds in datasets}
    )


# -- DIMSE ------------------------------------------------------------------------------


class DimseSender(Sender):
    """C-STORE SCU (PS3.4 B.2) with association reuse and transfer syntax fallback.

    For every SOP class two presentation contexts are proposed: the instances' own transfer
    syntax and the uncompressed ones. An instance whose syntax was not accepted is
    decompressed and sent uncompressed. Statuses: success and warning (Bxxx) acknowledge;
    Refused: Out of Resources (A7xx) and a lost association are transient; other failures
    are permanent.
    """

    def __init__(
        self,
        destination: Destination,
        calling_ae: str,
        *,
        acse_timeout: float = 15.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 30.0,
    ) -> None:
        super().__init__(destination, calling_ae)
        if not (destination.host and destination.port and destination.ae_title):
            raise ValueError(f"DIMSE destination {destination.name!r} needs host, port, ae_title")
        self._timeouts = (acse_timeout, dimse_timeout, network_timeout)
        self._assoc: Any = None
        self._contexts: set[tuple[str, str]] = set()  # accepted (SOP class, transfer syntax)
        self._proposed: set[tuple[str, str]] = set()
        self.associations_opened = 0

    def _wanted(self, datasets: Sequence[Dataset]) -> set[tuple[str, str]]:
        wanted: set[tuple[str, str]] = set()
        for ds in datasets:
            sop = str(ds.SOPClassUID)
            wanted.add((sop, str(ds.file_meta.TransferSyntaxUID)))
            for ts in FALLBACK_TRANSFER_SYNTAXES:
                wanted.add((sop, str(ts)))
        return wanted

    def _associate(self, datasets: Sequence[Dataset]) -> Any:
        from pynetdicom import AE

        wanted = self._wanted(datasets)
        if self._assoc is not None and self._assoc.is_established and wanted <= self._proposed:
            return self._assoc
        self.close()
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = self._timeouts
        by_class: dict[str, set[str]] = {}
        for sop, ts in wanted:
            by_class.setdefault(sop, set()).add(ts)
        for sop, syntaxes in sorted(by_class.items()):
            native = sorted(syntaxes - {str(t) for t in FALLBACK_TRANSFER_SYNTAXES})
            if native:
                ae.add_requested_context(sop, native)
            ae.add_requested_context(sop, [str(t) for t in FALLBACK_TRANSFER_SYNTAXES])
        d = self.destination
        assoc = ae.associate(d.host, int(d.port or 0), ae_title=d.ae_title or "ANY-SCP")
        if not assoc.is_established:
            return None
        self.associations_opened += 1
        self._assoc = assoc
        self._proposed = wanted
        self._contexts = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts
        }
        return assoc

    def _prepare(self, ds: Dataset) -> Dataset | None:
        sop = str(ds.SOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID)
        if (sop, ts) in self._contexts:
            return ds
        for fallback in FALLBACK_TRANSFER_SYNTAXES:
            if (sop, str(fallback)) in self._contexts:
                copy = Dataset(ds)
                copy.file_meta = Dataset(ds.file_meta)  # type: ignore[assignment]
                if UID(ts).is_compressed:
                    copy.decompress()
                copy.file_meta.TransferSyntaxUID = fallback
                return copy
        return None

    def send(self, datasets: Sequence[Dataset]) -> SendReport:
        report = SendReport()
        if not datasets:
            return report
        try:
            assoc = self._associate(datasets)
        except Exception as exc:  # socket errors, bad host names
            return _all_failed(datasets, f"association failed: {exc}", transient=True)
        if assoc is None:
            return _all_failed(datasets, "association rejected, aborted or peer unreachable", True)
        for i, ds in enumerate(datasets):
            uid = str(ds.SOPInstanceUID)
            to_send = self._prepare(ds)
            if to_send is None:
                report.failed[uid] = Failure(
                    f"no accepted presentation context for SOP class {ds.SOPClassUID}", False
                )
                continue
            try:
                status = assoc.send_c_store(to_send)
            except Exception as exc:
                status = None
                logger.warning("C-STORE to %s raised: %s", self.destination.name, exc)
            if status is None or "Status" not in status:
                # timeout / abort: this and the remaining instances are unknown -> retry
                for rest in datasets[i:]:
                    report.failed[str(rest.SOPInstanceUID)] = Failure(
                        "association lost or no response", True
                    )
                self.close()
                return report
            code = int(status.Status)
            cat = category(code)
            if cat is Category.SUCCESS:
                report.acknowledged.append(uid)
            elif cat is Category.WARNING:
                report.acknowledged.append(uid)
                report.warnings[uid] = f"status 0x{code:04X}"
            else:
                transient = (code & 0xFF00) == (Storage.OUT_OF_RESOURCES & 0xFF00)
                comment = str(status.get("ErrorComment", "") or "")
                report.failed[uid] = Failure(
                    f"C-STORE status 0x{code:04X} {comment}".strip(), transient, code
                )
        return report

    def close(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:  # pragma: no cover - best effort
                pass
        self._assoc = None
        self._contexts = set()
        self._proposed = set()


# -- DICOMweb STOW-RS ---------------------------------------------------------------------


def _failure_code(item: Dataset) -> int | None:
    try:
        return int(item.FailureReason)
    except (AttributeError, TypeError, ValueError):
        return None


def parse_stow_response(datasets: Sequence[Dataset], response: Dataset, http_status: int) -> SendReport:
    """Interpret a STOW-RS response (PS3.18 10.5.3, Table 10.5.3-1).

    Instances in Referenced SOP Sequence (0008,1199) are acknowledged (Warning Reason
    (0008,1196) kept); instances in Failed SOP Sequence (0008,1198) failed with their Failure
    Reason (0008,1197): A7xx (out of resources) and 0110 (processing failure) are transient,
    others permanent. An instance in neither list is unacknowledged (transient).
    """
    report = SendReport()
    offered = {str(ds.SOPInstanceUID) for ds in datasets}
    for item in response.get("ReferencedSOPSequence", []) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in offered:
            report.acknowledged.append(uid)
            if "WarningReason" in item:
                report.warnings[uid] = f"warning 0x{int(item.WarningReason):04X}"
    for item in response.get("FailedSOPSequence", []) or []:
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid not in offered:
            continue
        code = _failure_code(item)
        transient = code is not None and (
            (code & 0xFF00) == (Storage.OUT_OF_RESOURCES & 0xFF00)
            or code == General.PROCESSING_FAILURE
        )
        reason = f"STOW-RS HTTP {http_status} failure reason " + (
            f"0x{code:04X}" if code is not None else "unknown"
        )
        report.failed[uid] = Failure(reason, transient, code)
    done = set(report.acknowledged) | set(report.failed)
    for uid in offered - done:
        report.failed[uid] = Failure(f"STOW-RS HTTP {http_status}: not acknowledged", True)
    return report


class StowSender(Sender):
    """STOW-RS client (PS3.18 10.5) over dicomweb-client with its retry logic off."""

    def __init__(self, destination: Destination, calling_ae: str, *, timeout: float = 60.0) -> None:
        super().__init__(destination, calling_ae)
        if not destination.url:
            raise ValueError(f"DICOMweb destination {destination.name!r} needs url")
        import requests
        from dicomweb_client.api import DICOMwebClient

        self._statuses: list[int] = []
        self._session = requests.Session()
        self._session.hooks["response"].append(self._record)
        self._client = DICOMwebClient(destination.url, session=self._session, timeout=timeout)
        self._client.set_http_retry_params(retry=False)

    def _record(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self._statuses.append(int(response.status_code))

    def send(self, datasets: Sequence[Dataset]) -> SendReport:
        import requests

        report = SendReport()
        for start in range(0, len(datasets), STOW_BATCH):
            batch = list(datasets[start : start + STOW_BATCH])
            self._statuses.clear()
            try:
                response = self._client.store_instances(batch)
                status = self._statuses[-1] if self._statuses else 200
                part = parse_stow_response(batch, response, status)
            except requests.HTTPError as exc:
                part = self._from_http_error(batch, exc)
            except (requests.ConnectionError, requests.Timeout) as exc:
                part = _all_failed(batch, f"STOW-RS connection failed: {type(exc).__name__}", True)
            except Exception as exc:  # malformed response bodies
                part = _all_failed(batch, f"STOW-RS error: {exc}", True)
            report.acknowledged += part.acknowledged
            report.warnings.update(part.warnings)
            report.failed.update(part.failed)
        return report

    @staticmethod
    def _from_http_error(batch: Sequence[Dataset], exc: Any) -> SendReport:
        """An error status. A body with Referenced / Failed SOP Sequences is a per-instance
        answer and is parsed: 409 Conflict (PS3.18 10.5.3) and also 400, which Orthanc's
        DICOMweb plugin 1.x returns for a partially stored batch."""
        response = exc.response
        status = int(response.status_code) if response is not None else 0
        if response is not None and 400 <= status < 500:
            try:
                body = Dataset.from_json(response.json())
            except Exception:
                body = None
            if body is not None and ("FailedSOPSequence" in body or "ReferencedSOPSequence" in body):
                return parse_stow_response(batch, body, status)
        transient = status >= 500 or status in (408, 429) or status == 0
        return _all_failed(batch, f"STOW-RS HTTP {status}", transient)

    def close(self) -> None:
        self._session.close()


#: destination kind -> transport (registry, style.md 6)
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


# -- policy + retries -----------------------------------------------------------------------


def is_synthetic(ds: Dataset) -> bool:
    return str(ds.get("SyntheticData", "")).upper() == codes.SYNTHETIC_YES


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
    sleep
        injected wait (tests pass a recorder).
    """

    def __init__(
        self,
        destinations: Iterable[Destination],
        *,
        ledger: Any = None,
        watermark: WatermarkCheck | None = None,
        calling_ae: str = "SYNTHNODE",
        sleep: Callable[[float], None] = time.sleep,
        sender_factory: Callable[[Destination, str], Sender] = make_sender,
    ) -> None:
        self.destinations = {d.name: d for d in destinations}
        self.ledger = ledger
        self.watermark = watermark
        self.calling_ae = calling_ae
        self.sleep = sleep
        self.sender_factory = sender_factory
        self._senders: dict[str, Sender] = {}

    def backoff(self, destination: Destination, attempt: int) -> float:
        """Wait after failed attempt ``attempt`` (1-based): backoff_s * 2**(attempt-1), capped."""
        return float(min(MAX_BACKOFF_S, destination.backoff_s * (2 ** (attempt - 1))))

    def _event(self, type_: EventType, outcome: Outcome, subject: dict[str, Any], payload: dict[str, Any]) -> None:
        if self.ledger is not None:
            self.ledger.append(Event(type=type_, actor=ACTOR, outcome=outcome, subject=subject, payload=payload))

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
        max_attempts: int | None = None,
        first_attempt: int = 1,
        terminal: bool = True,
    ) -> DispatchResult:
        """Send ``datasets`` to ``destination`` until acknowledged or attempts run out.

        ``already_acknowledged`` SOP Instance UIDs (from a previous run) are not sent again.
        A caller that retries itself (the dispatch job: one attempt per job attempt) passes
        ``max_attempts=1``, its attempt number as ``first_attempt`` and ``terminal=False``
        while it has attempts left, so the ledger says "retry_scheduled", not "failed".
        Returns the result; never raises for peer errors or policy refusals.
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
        permanent: dict[str, Failure] = {}
        last: dict[str, Failure] = {}
        limit = max_attempts or dest.max_attempts
        attempt = 0
        while pending and attempt < limit:
            attempt += 1
            self._event(
                EventType.DISPATCH_ATTEMPTED,
                Outcome.SUCCESS,
                subject,
                {"attempt": first_attempt + attempt - 1, "instances": len(pending),
                 "kind": dest.kind, "sop_uids": [str(ds.SOPInstanceUID) for ds in pending]},
            )
            t0 = time.monotonic()
            report = self.sender(dest).send(pending)
            ms = int((time.monotonic() - t0) * 1000)
            acknowledged += report.acknowledged
            for uid, f in report.failed.items():
                if not f.transient:
                    permanent[uid] = f
            last = {u: f for u, f in report.failed.items() if f.transient}
            pending = [ds for ds in pending if str(ds.SOPInstanceUID) in last]
            logger.info(
                "dispatch %s attempt %d: %d acknowledged, %d transient, %d permanent (%d ms)",
                dest.name, attempt, len(report.acknowledged), len(last), len(permanent), ms,
            )
            if pending and attempt < limit:
                self.sleep(self.backoff(dest, attempt))
        failed = {**permanent, **{u: last[u] for u in (str(ds.SOPInstanceUID) for ds in pending)}}
        if failed:
            reasons = sorted({f.reason for f in failed.values()})
            final = terminal or bool(permanent)
            self._event(
                EventType.DISPATCH_FAILED,
                Outcome.MAJOR_FAILURE if not acknowledged else Outcome.SERIOUS_FAILURE,
                subject,
                {
                    "state": DispatchState.FAILED.value if final else "retry_scheduled",
                    "attempts": first_attempt + attempt - 1,
                    "acknowledged": len(acknowledged) + len(done),
                    "sop_uids": sorted(failed),
                    "failed": {u: f.reason for u, f in sorted(failed.items())},
                    "error": "; ".join(reasons),
                },
            )
            return DispatchResult(
                dest.name, DispatchState.FAILED, attempt, acknowledged, failed, "; ".join(reasons)
            )
        self._event(
            EventType.DISPATCH_SUCCEEDED,
            Outcome.SUCCESS,
            subject,
            {
                "attempts": first_attempt + attempt - 1,
                "acknowledged": len(acknowledged) + len(done),
                "sop_uids": sorted(acknowledged),
            },
        )
        return DispatchResult(dest.name, DispatchState.SUCCEEDED, attempt, acknowledged, {})

    def close(self) -> None:
        for s in self._senders.values():
            s.close()
        self._senders.clear()
