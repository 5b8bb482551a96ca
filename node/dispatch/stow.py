"""Destination kind ``dicomweb``: STOW-RS (PS3.18 10.5) through dicomweb-client with its own
retries off. HTTP 202 partial success and the Failed SOP Sequence (0008,1198) are handled
here, since dicomweb-client treats a 202 as success."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset

from config.sections.pipeline import Destination
from node.dimse.status import General, is_transient
from node.dispatch.base import Failure, Sender, SendReport, all_failed

__all__ = ["STOW_BATCH", "StowSender", "parse_stow_response"]

#: STOW-RS instances per request
STOW_BATCH = 50


def _failure_code(item: Dataset) -> int | None:
    try:
        return int(item.FailureReason)
    except (AttributeError, TypeError, ValueError):
        return None


def parse_stow_response(
    datasets: Sequence[Dataset], response: Dataset, http_status: int
) -> SendReport:
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
        # a STOW-RS server's Processing Failure (0110) usually means its own back end
        # failed for a moment: retried, unlike the same status from a C-STORE SCP
        transient = code is not None and (is_transient(code) or code == General.PROCESSING_FAILURE)
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
                part = all_failed(batch, f"STOW-RS connection failed: {type(exc).__name__}", True)
            except Exception as exc:  # malformed response bodies
                part = all_failed(batch, f"STOW-RS error: {exc}", True)
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
            if body is not None and (
                "FailedSOPSequence" in body or "ReferencedSOPSequence" in body
            ):
                return parse_stow_response(batch, body, status)
        transient = status >= 500 or status in (408, 429) or status == 0
        return all_failed(batch, f"STOW-RS HTTP {status}", transient)

    def close(self) -> None:
        self._session.close()
