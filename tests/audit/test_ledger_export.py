"""Exports (verifiable JSON lines, PS3.15 A.5 DICOM audit XML, FHIR R4 AuditEvent /
Provenance validated by fhir.resources) and lineage across a received -> job -> output ->
dispatch chain."""
from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

import pytest
from audit_helpers import LedgerEnv

from audit.events import Event, EventType, Outcome
from audit.export import (
    dicom_audit_message,
    export_ledger,
    fhir_audit_event,
    fhir_provenance,
    lineage,
    write_dicom_audit,
    write_fhir_bundle,
)
from audit.verify import verify_export

STUDY = "1.2.826.0.1.3680043.8.498.1"
SRC = "1.2.826.0.1.3680043.8.498.1.1"
OUT = "1.2.826.0.1.3680043.8.498.1.99"
OTHER = "1.2.826.0.1.3680043.8.498.2"


def pipeline_events() -> list[Event]:
    evs = [Event(EventType.ASSOCIATION_ACCEPTED, "ae:CT01", payload={"peer_address": "127.0.0.1"})]
    for i in range(3):
        evs.append(Event(EventType.INSTANCE_RECEIVED, "ae:CT01",
                         subject={"study_uid": STUDY, "series_uid": SRC, "sop_uid": f"{SRC}.{i}",
                                  "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"},
                         payload={"sha256": f"{i:064x}", "calling_ae": "CT01"}))
    evs.append(Event(EventType.INSTANCE_RECEIVED, "ae:CT01",
                     subject={"study_uid": OTHER, "series_uid": OTHER + ".1", "sop_uid": OTHER + ".1.1"}))
    evs.append(Event(EventType.STUDY_COMPLETED, "component:pipeline", subject={"study_uid": STUDY},
                     payload={"series_uids": [SRC]}))
    job = {"job_id": "job-7", "model_id": "ct-restore", "study_uid": STUDY}
    params = {"source_series_uids": [SRC], "weights_sha256": "ab" * 32, "seed": 1234, "device": "cpu",
              "parameters": {"steps": 8}}
    evs += [Event(EventType.JOB_QUEUED, "component:pipeline", subject=job, payload=params),
            Event(EventType.JOB_STARTED, "component:worker", subject=job, payload=params),
            Event(EventType.JOB_FINISHED, "component:worker", subject=job, payload=params),
            Event(EventType.OUTPUT_CREATED, "component:worker",
                  subject={**job, "series_uid": OUT},
                  payload={"source_series_uids": [SRC], "output_series_uid": OUT,
                           "output_sop_uids": [f"{OUT}.{i}" for i in range(3)], "sha256": ["cd" * 32] * 3,
                           "watermark_payload": "00ff00ff00ff"}),
            Event(EventType.DISPATCH_ATTEMPTED, "component:dispatch",
                  subject={"series_uid": OUT, "destination": "PACS", "study_uid": STUDY}),
            Event(EventType.DISPATCH_FAILED, "component:dispatch", Outcome.MINOR_FAILURE,
                  subject={"series_uid": OUT, "destination": "PACS", "study_uid": STUDY},
                  payload={"error": "association rejected"}),
            Event(EventType.DISPATCH_SUCCEEDED, "component:dispatch",
                  subject={"series_uid": OUT, "destination": "PACS", "job_id": "job-7"},
                  payload={"sop_uids": [f"{OUT}.{i}" for i in range(3)]}),
            Event(EventType.MODEL_REFUSED, "component:modelgate", Outcome.SERIOUS_FAILURE,
                  subject={"model_id": "evil"}, payload={"reason": "unsigned"})]
    return evs


@pytest.fixture
def pipeline(ledger_env: LedgerEnv) -> LedgerEnv:
    ledger_env.service.ledger.append_many(pipeline_events())
    ledger_env.service.checkpoint()
    return ledger_env


@pytest.mark.parametrize("start", [STUDY, SRC, f"{SRC}.1", "job-7", OUT, f"{OUT}.2"])
def test_lineage_from_any_uid(pipeline: LedgerEnv, start: str) -> None:
    tree = lineage(pipeline.service.ledger, start)
    assert [j["job_id"] for j in tree["jobs"]] == ["job-7"]
    job = tree["jobs"][0]
    assert [e["type"] for e in job["events"]] == ["job.queued", "job.started", "job.finished"]
    assert job["events"][0]["weights_sha256"] == "ab" * 32 and job["events"][0]["seed"] == 1234
    assert job["model_id"] == "ct-restore" and job["weights_sha256"] == "ab" * 32
    assert [o["series_uid"] for o in job["outputs"]] == [OUT]
    # dispatches hang under the output series they sent (with or without a job id)
    (out,) = job["outputs"]
    assert [d["type"] for d in out["dispatches"]] == ["dispatch.attempted", "dispatch.failed",
                                                      "dispatch.succeeded"]
    assert {d["destination"] for d in out["dispatches"]} == {"PACS"}
    assert out["dispatches"][1]["error"] == "association rejected"
    assert tree["unattached_dispatches"] == []
    src = {s["series_uid"]: s for s in tree["sources"]}
    assert list(src) == [SRC] and len(src[SRC]["instances"]) == 3
    assert OTHER not in json.dumps(tree)  # an unrelated study is not pulled in


def test_verifiable_export_roundtrip(pipeline: LedgerEnv, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ledger.jsonl"
    with path.open("w") as fh:
        n = export_ledger(pipeline.service.ledger, fh, origin="test.example/ledger")
    assert n == pipeline.service.ledger.size()
    rep = verify_export(path, pipeline.service.verifier, pipeline.checkpoint_file)
    assert rep.ok, rep.problems
    assert rep.checkpoints == 1 and rep.file_checkpoints == 1
    lines = path.read_text().splitlines()
    row = json.loads(lines[3])
    data = bytearray(base64.b64decode(row["data"]))
    data[5] ^= 1
    row["data"] = base64.b64encode(bytes(data)).decode()
    lines[3] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    rep = verify_export(path, pipeline.service.verifier, pipeline.checkpoint_file)
    assert not rep.ok and rep.first_bad_entry == 2


def test_dicom_audit_messages(pipeline: LedgerEnv) -> None:
    ledger = pipeline.service.ledger
    buf = io.StringIO()
    assert write_dicom_audit(ledger.entries(), buf) == ledger.size()
    msgs = [ET.fromstring(line) for line in buf.getvalue().splitlines()]
    for m in msgs:
        assert m.tag == "AuditMessage"
        ei = m.find("EventIdentification")
        assert ei is not None and ei.get("EventActionCode") in "CRUDE"
        assert ei.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
        eid = ei.find("EventID")
        assert eid is not None and eid.get("codeSystemName") == "DCM" and eid.get("csd-code", "").startswith("110")
        assert len(m.findall("ActiveParticipant")) >= 2
        assert m.find("AuditSourceIdentification") is not None
        assert m.find("ParticipantObjectIdentification/ParticipantObjectDetail") is not None
    received = msgs[1]
    assert received.find("EventIdentification/EventID").get("csd-code") == "110104"
    roles = [ap.find("RoleIDCode").get("csd-code") for ap in received.findall("ActiveParticipant")]
    assert roles == ["110153", "110152"]
    assert received.find("ActiveParticipant").get("AlternativeUserID") == "AETITLE=CT01"
    po = received.find("ParticipantObjectIdentification")
    assert po.get("ParticipantObjectID") == STUDY
    assert po.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert po.find("SOPClass/Instance").get("UID") == f"{SRC}.0"
    failed = dicom_audit_message(ledger.entry(11))
    assert failed.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert failed.find("EventIdentification/EventOutcomeDescription").text == "association rejected"
    refused = dicom_audit_message(ledger.entry(13))
    assert refused.find("EventIdentification/EventID").get("csd-code") == "110113"


def test_fhir_auditevent_and_provenance_validate(pipeline: LedgerEnv) -> None:
    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.provenance import Provenance

    ledger = pipeline.service.ledger
    for e in ledger.entries():
        res = fhir_audit_event(e)
        AuditEvent.model_validate(res)
        assert res["resourceType"] == "AuditEvent" and res["type"]["code"].startswith("110")
    out = ledger.entry(9)
    prov = fhir_provenance(out)
    Provenance.model_validate(prov)
    assert prov["target"][0]["identifier"]["value"] == f"urn:oid:{OUT}"
    assert prov["entity"][0]["role"] == "source"
    assert prov["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{SRC}"
    with pytest.raises(ValueError):
        fhir_provenance(ledger.entry(0))
    buf = io.StringIO()
    assert write_fhir_bundle(ledger.entries(), buf) == ledger.size() + 1
    bundle = json.loads(buf.getvalue())
    assert bundle["resourceType"] == "Bundle"
    with pytest.raises(ValueError):  # the validator is real: a malformed instant is refused
        AuditEvent.model_validate({**fhir_audit_event(out), "recorded": "yesterday"})
