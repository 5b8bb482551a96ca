"""Keyed patient digests (audit.patient) and the patient report over a ledger: studies and
their lineage, and retrievals found by digest or by study UID only (as a DICOMweb access
records them)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from tests.support.ledger import OUT, SRC, STUDY, LedgerEnv, pipeline_events

from audit.events import Event, EventType
from audit.patient import PatientDigester, load_or_create_patient_key, patient_report, read_patient_key


def test_key_file_created_private_and_digests_keyed(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "patient.key"
    key = load_or_create_patient_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_patient_key(path) == key  # read back, never replaced
    d = PatientDigester(key)
    assert d.patient("PID1 ", "HOSP") == d.patient("PID1", "HOSP")  # DICOM padding
    assert d.patient("PID1", "HOSP") != d.patient("PID1", "")  # the issuer counts
    assert d.patient("PID1", "") != PatientDigester(os.urandom(32)).patient("PID1", "")
    assert d.accession("A1") != d.patient("A1", "")  # domain separated
    assert d.patient("", "HOSP") is None and d.subject("", None, None) == {}
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="0600"):
        read_patient_key(path)
    with pytest.raises(FileNotFoundError, match="needs a copy"):
        read_patient_key(tmp_path / "missing.key")


def test_report_follows_digest_then_study(ledger_env: LedgerEnv) -> None:
    d = PatientDigester(b"x" * 32)
    me = d.patient("PID1", "")
    evs = []
    for e in pipeline_events():  # the received instances of STUDY carry the digest
        if e.type == EventType.INSTANCE_RECEIVED and e.subject.get("study_uid") == STUDY:
            e = Event(e.type, e.actor, e.outcome, {**e.subject, "patient": me}, e.payload)
        evs.append(e)
    evs += [
        # a viewer reading the synthetic series and the whole study over DICOMweb: the
        # entries name UIDs only (no digest), as the DICOMweb server records them
        Event(EventType.DICOMWEB_ACCESS, "token:viewer",
              subject={"study_uid": STUDY, "series_uid": OUT}, payload={"method": "GET"}),
        Event(EventType.DICOMWEB_ACCESS, "token:viewer", subject={"study_uid": STUDY}),
        Event(EventType.QUERY, "ae:FINDSCU", payload={"service": "C-FIND", "patients": [me],
                                                      "matches": 1}),
    ]
    ledger = ledger_env.service.ledger
    ledger.append_many(evs)
    rep = patient_report(ledger, [me])
    (study,) = rep["studies"]
    assert study["study_uid"] == STUDY
    tree = study["lineage"]
    assert [s["series_uid"] for s in tree["sources"]] == [SRC]
    (out,) = tree["jobs"][0]["outputs"]
    assert [(r["service"], r["actor"]) for r in out["retrievals"]] == [("DICOMweb", "token:viewer")]
    assert [r["actor"] for r in tree["other_retrievals"]] == ["token:viewer"]  # the study read
    assert [a["service"] for a in rep["accesses"]] == ["C-FIND"]
    assert patient_report(ledger, [d.patient("SOMEONE_ELSE", "")])["entries"] == []
