"""IHE ATNA for the node: DICOM audit messages with the Patient resolved from the index,
and the continuous syslog feed to the audit record repository (``[audit.syslog]``).

The ledger refers to patients by keyed digest only (:mod:`audit.patient`); an audit record
repository expects the Patient ID (PS3.15 A.5.3: Patient participant, ID type "Patient
Number"). :class:`AuditRenderer` looks each study up in the index when a message is built
(``patient_ids = "resolve"``, the default) and falls back to the digest for a study the
index no longer holds, or always uses the digest (``"digest"``).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from audit.atna import AuditPatient, dicom_audit_xml
from audit.ledger import StoredEntry
from audit.syslog import FeedTarget, SyslogFeed
from storage.query import study_patients

if TYPE_CHECKING:
    from node.context import NodeContext

logger = logging.getLogger(__name__)

__all__ = ["AuditRenderer", "start_feed"]


class AuditRenderer:
    """Ledger entry -> PS3.15 A.5 XML, Patient participants from the index.

    Parameters
    ----------
    node_ae, site, origin
        AuditSourceID, AuditEnterpriseSiteID and the audit log's id (the ledger origin).
    engine
        The index database; None: Patient participants carry the ledger's digest.
    """

    def __init__(self, node_ae: str, site: str, origin: str, engine: Engine | None,
                 cache_size: int = 4096) -> None:
        self.node_ae = node_ae
        self.site = site
        self.origin = origin
        self.engine = engine
        self._cache: OrderedDict[str, AuditPatient | None] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, engine: Engine | None, *,
                      resolve: bool | None = None) -> AuditRenderer:
        if resolve is None:
            resolve = settings.audit.syslog.patient_ids == "resolve"
        origin = settings.audit.origin
        return cls(settings.dimse.ae_title, origin.split("/", 1)[0] or "synthnode", origin,
                   engine if resolve else None)

    def patient(self, study_uid: str) -> AuditPatient | None:
        """The patient of a stored study (None when the index does not hold it)."""
        if self.engine is None:
            return None
        with self._lock:
            if study_uid in self._cache:
                self._cache.move_to_end(study_uid)
                return self._cache[study_uid]
        with self.engine.connect() as conn:
            p = study_patients(conn, [study_uid]).get(study_uid)
        found = (AuditPatient(p.patient_id, p.issuer_of_patient_id or "", p.patient_name)
                 if p is not None and p.patient_id else None)
        with self._lock:
            self._cache[study_uid] = found
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found

    def xml(self, entry: StoredEntry) -> str:
        """The message for ``entry``, on one line."""
        return dicom_audit_xml(entry, node_ae=self.node_ae, site=self.site, origin=self.origin,
                               patients=self.patient if self.engine is not None else None)


def start_feed(ctx: NodeContext) -> SyslogFeed | None:
    """Start the syslog feed when ``[audit.syslog] host`` is set (None otherwise)."""
    s = ctx.settings
    cfg = s.audit.syslog
    if not cfg.host:
        return None
    target = FeedTarget(cfg.host, cfg.port, cfg.transport, cfg.ca_file, cfg.cert_file,
                        cfg.key_file, cfg.server_name)
    renderer = AuditRenderer.from_settings(s, ctx.engine)
    feed = SyslogFeed(ctx.ledger, renderer.xml, target, s.syslog_cursor_file, start=cfg.start,
                      app_name=cfg.app_name, batch=cfg.batch, poll_s=cfg.poll_s,
                      retry_max_s=cfg.retry_max_s)
    feed.start()
    return feed
