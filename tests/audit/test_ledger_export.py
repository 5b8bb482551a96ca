"""Exports (verifiable JSON lines, PS3.15 A.5 DICOM audit XML, FHIR R4 AuditEvent /
Provenance validated by fhir.resources) and lineage across a received -> job -> output ->
dispatch chain."""
from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET

import pytest
from tests.support.ledger import OTHER, OUT, SRC, STUDY, LedgerEnv, pipeline_events

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
    # readable: every entry decoded (grep / jq work on it), the leaf bytes beside it
    row = json.loads(lines[3])
    assert row["type"] == "instance.received" and row["subject"]["series_uid"] == SRC
    assert f'"series_uid": "{SRC}"' in lines[3] and "leaf" in row and "data" not in row

    def verify_with(line: int, new: dict) -> object:  # type: ignore[type-arg]
        changed = list(lines)
        changed[line] = json.dumps(new)
        path.write_text("\n".join(changed) + "\n")
        return verify_export(path, pipeline.service.verifier, pipeline.checkpoint_file)

    leaf = bytearray(row["leaf"].encode())
    leaf[5] ^= 1  # one bit of the hashed bytes
    rep = verify_with(3, {**row, "leaf": leaf.decode()})
    assert not rep.ok and rep.first_bad_entry == 2
    # the readable fields must say what the leaf says
    rep = verify_with(3, {**row, "actor": "ae:SOMEONE_ELSE"})
    assert not rep.ok and rep.first_bad_entry == 2 and "readable fields" in str(rep.problems[0])
    # a version 1 export (base64 leaves) still verifies
    v1 = {"seq": row["seq"], "leaf_hash": row["leaf_hash"],
          "data": base64.b64encode(row["leaf"].encode()).decode()}
    assert verify_with(3, v1).ok


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
        assert len(m.findall("ActiveParticipant")) >= 1  # the schema: one or more
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
    assert po.find("ParticipantObjectDescription/SOPClass/Instance").get("UID") == f"{SRC}.0"
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
