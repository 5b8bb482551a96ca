"""Patient references in the ledger: keyed digests added to every event about a study.

The ingestor digests Patient ID, Issuer of Patient ID and Accession Number of each received
instance itself (its study may not be committed yet). Every other event that names a study
(``subject.study_uid``: jobs, outputs, dispatches, retrieves of one study, DICOMweb
accesses) or several (``payload.study_uids``: a retrieve across studies; storage commitment
by its SOP Instance UIDs) gets its digests here, looked up in the index through
:meth:`PatientRefs.annotate`, which the composition root installs as the ledger's
``annotate`` hook. So `synthnode audit patient` finds them without each service knowing
about patients, and the ledger still holds no PHI (:mod:`audit.patient`).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine

from audit.events import Event, EventType
from audit.patient import PatientDigester
from storage.query import StudyPatient, studies_of_instances, study_patients

logger = logging.getLogger(__name__)

__all__ = ["PatientRefs"]

#: Most patients listed in one event's ``payload.patients``.
MAX_PATIENTS = 1000


class PatientRefs:
    """Digests for datasets and index rows, and the ledger hook that adds them.

    Parameters
    ----------
    digester
        The ledger-local keyed digest (:class:`audit.patient.PatientDigester`).
    engine
        The index database (read-only here; a short connection per uncached lookup).
    cache_size
        Studies whose digests are kept in memory.
    """

    def __init__(self, digester: PatientDigester, engine: Engine, cache_size: int = 4096):
        self.digester = digester
        self.engine = engine
        self._cache: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def subject(self, patient_id: str | None, issuer: str | None,
                accession: str | None) -> dict[str, str]:
        """``patient`` / ``accession`` subject keys for these values."""
        return self.digester.subject(patient_id, issuer, accession)

    def of_patient(self, p: StudyPatient) -> dict[str, str]:
        return self.subject(p.patient_id, p.issuer_of_patient_id, p.accession_number)

    def for_studies(self, study_uids: Iterable[str]) -> dict[str, dict[str, str]]:
        """Subject keys per study (studies the index does not know are left out)."""
        uids = [u for u in dict.fromkeys(study_uids) if u]
        out: dict[str, dict[str, str]] = {}
        missing: list[str] = []
        with self._lock:
            for u in uids:
                hit = self._cache.get(u)
                if hit is None:
                    missing.append(u)
                else:
                    self._cache.move_to_end(u)
                    out[u] = hit
        if missing:
            with self.engine.connect() as conn:
                found = study_patients(conn, missing)
            with self._lock:
                for u, p in found.items():
                    out[u] = self._cache[u] = self.of_patient(p)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def annotate(self, event: Event) -> Event:
        """The ledger hook: ``event`` with the digests of the patient(s) it concerns."""
        try:
            return self._annotate(event)
        except Exception:  # a lookup must never cost an audit record
            logger.exception("could not add patient digests to a %s event", event.type.value)
            return event

    def _annotate(self, event: Event) -> Event:
        subj, pay = event.subject, event.payload
        if "patient" in subj or "patients" in pay:
            return event
        study = subj.get("study_uid")
        if isinstance(study, str) and study:
            refs = self.for_studies([study]).get(study)
            return replace(event, subject={**subj, **refs}) if refs else event
        studies = _strings(pay.get("study_uids"))
        if not studies and event.type == EventType.STORAGE_COMMITMENT:
            sops = _strings(pay.get("sop_uids"))
            if sops:
                with self.engine.connect() as conn:
                    studies = sorted(studies_of_instances(conn, sops[:MAX_PATIENTS]))
        if not studies:
            return event
        digests = sorted({d["patient"] for d in self.for_studies(studies).values()
                          if d.get("patient")})
        if not digests:
            return event
        if len(digests) == 1 and len(studies) == 1:
            refs = self.for_studies(studies)[studies[0]]
            return replace(event, subject={**subj, **refs})
        return replace(event, payload={**pay, "patients": digests[:MAX_PATIENTS]})


def _strings(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []
