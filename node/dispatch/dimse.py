"""Destination kind ``dimse``: C-STORE SCU (PS3.4 B.2) with association reuse and
transfer syntax fallback."""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from config.sections.pipeline import Destination
from node.dimse.status import Category, category, is_transient
from node.dispatch.base import Failure, Sender, SendReport, all_failed

logger = logging.getLogger(__name__)

__all__ = ["FALLBACK_TRANSFER_SYNTAXES", "DimseSender"]

#: uncompressed transfer syntaxes offered as fallback for every SOP class
FALLBACK_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class DimseSender(Sender):
    """C-STORE SCU (PS3.4 B.2) with association reuse and transfer syntax fallback.

    For every SOP class two presentation contexts are proposed: the instances' own transfer
    syntax and the uncompressed ones. An instance whose syntax was not accepted is
    decompressed and sent uncompressed. Statuses: success and warning (Bxxx) acknowledge;
    Refused: Out of Resources (A7xx) and a lost association are transient; other failures
    are permanent.

    The association stays open for the next send and is released (A-RELEASE, logged at
    INFO) after ``network_timeout`` seconds without one: an expected idle close, not
    pynetdicom's "Network timeout reached" error and abort.
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
        self.idle_release_s = network_timeout
        self._lock = threading.RLock()
        self._idle: threading.Timer | None = None
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
        ae.acse_timeout, ae.dimse_timeout, _idle = self._timeouts
        ae.network_timeout = None  # idle associations are released by _release_idle
        by_class: dict[str, set[str]] = {}
        for sop, ts in wanted:
            by_class.setdefault(sop, set()).add(ts)
        for sop, syntaxes in sorted(by_class.items()):
            native = sorted(syntaxes - {str(t) for t in FALLBACK_TRANSFER_SYNTAXES})
            if native:
                ae.add_requested_context(sop, native)
            ae.add_requested_context(sop, [str(t) for t in FALLBACK_TRANSFER_SYNTAXES])
        d = self.destination
        assert d.host is not None  # checked in __init__
        tls_args = None
        if d.tls_ca_file is not None:
            from node.dimse.tls import client_context

            tls_args = (client_context(d.tls_ca_file, d.tls_cert_file, d.tls_key_file), d.host)
        assoc = ae.associate(d.host, int(d.port or 0), ae_title=d.ae_title or "ANY-SCP",
                             tls_args=tls_args)
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
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            try:
                return self._send(datasets)
            finally:
                self._arm_idle()

    def _arm_idle(self) -> None:
        if self._assoc is None:
            return
        timer = threading.Timer(self.idle_release_s, self._release_idle)
        timer.args = (timer,)
        timer.daemon = True
        self._idle = timer
        timer.start()

    def _release_idle(self, timer: threading.Timer) -> None:
        with self._lock:
            if self._assoc is None or self._idle is not timer:  # a send came in meanwhile
                return
            self._idle = None
            if self._assoc.is_established:
                logger.info("released the idle association to %s after %.0f s without a "
                            "send", self.destination.name, self.idle_release_s)
            self.close()

    def _send(self, datasets: Sequence[Dataset]) -> SendReport:
        report = SendReport()
        if not datasets:
            return report
        try:
            assoc = self._associate(datasets)
        except Exception as exc:  # socket errors, bad host names
            return all_failed(datasets, f"association failed: {exc}", transient=True)
        if assoc is None:
            return all_failed(datasets, "association rejected, aborted or peer unreachable", True)
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
                transient = is_transient(code)
                comment = str(status.get("ErrorComment", "") or "")
                report.failed[uid] = Failure(
                    f"C-STORE status 0x{code:04X} {comment}".strip(), transient, code
                )
        return report

    def close(self) -> None:
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            self._close()

    def _close(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:  # pragma: no cover - best effort
                pass
        self._assoc = None
        self._contexts = set()
        self._proposed = set()
