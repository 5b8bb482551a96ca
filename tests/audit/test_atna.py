"""DICOM audit messages (PS3.15 A.5) against the Audit Message Schema of PS3.15 A.5.1
(tests/audit/vectors/dicom_audit/audit-message.rng, validated with lxml's RELAX NG), and
the participants PS3.15 A.5.3 requires of each message."""
from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from lxml import etree

from audit import merkle
from audit.atna import AuditPatient, dicom_audit_message
from audit.events import Event, EventType, Outcome, event_to_leaf
from audit.ledger import StoredEntry
from audit.patient import PatientDigester

SCHEMA = Path(__file__).parent / "vectors" / "dicom_audit" / "audit-message.rng"
STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = STUDY + ".1"
OUT = STUDY + ".99"
DIGESTER = PatientDigester(b"k" * 32)
PATIENT = DIGESTER.patient("PID-42", "HOSP")
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def entry(ev: Event, seq: int = 7) -> StoredEntry:
    data = event_to_leaf(ev)
    return StoredEntry(seq, merkle.leaf_hash(data), data)


def one_of_each() -> dict[EventType, Event]:
    """A realistic event of every type the ledger knows (subjects as the node writes them)."""
    study = {"study_uid": STUDY, "patient": PATIENT}
    job = {**study, "job_id": "job-1", "model_id": "ct-denoise-wreg"}
    special: dict[EventType, Event] = {
        EventType.INSTANCE_RECEIVED: Event(
            EventType.INSTANCE_RECEIVED, "ae:CT01",
            subject={**study, "series_uid": SERIES, "sop_uid": SERIES + ".1", "sop_class_uid": CT},
            payload={"sha256": "ab" * 32, "calling_ae": "CT01"}),
        EventType.INSTANCE_REJECTED: Event(
            EventType.INSTANCE_REJECTED, "ae:CT01", Outcome.MINOR_FAILURE,
            subject={"sop_uid": SERIES + ".2", "sop_class_uid": CT},
            payload={"reason": "unparseable", "detail": "bad tag", "peer": "127.0.0.1"}),
        EventType.QUERY: Event(
            EventType.QUERY, "ae:FINDSCU", subject={"sop_class_uid": "1.2.840.10008.5.1.4.1.2.2.1"},
            payload={"service": "C-FIND", "level": "STUDY", "keys": ["PatientID", "StudyDate"],
                     "matches": 1, "status": 0, "patients": [PATIENT]}),
        EventType.RETRIEVE: Event(
            EventType.RETRIEVE, "ae:MOVESCU",
            subject={**study, "sop_class_uid": "1.2.840.10008.5.1.4.1.2.2.2",
                     "destination": "STORESCP"},
            payload={"service": "C-MOVE", "destination": "STORESCP", "study_uids": [STUDY],
                     "series_uids": [OUT], "sop_uids": [OUT + ".1"], "status": 0}),
        EventType.DISPATCH_SUCCEEDED: Event(
            EventType.DISPATCH_SUCCEEDED, "component:dispatch",
            subject={**study, "series_uid": OUT, "destination": "PACS", "job_id": "d-1"},
            payload={"sop_uids": [OUT + ".1"]}),
        EventType.OUTPUT_CREATED: Event(
            EventType.OUTPUT_CREATED, "component:worker", subject={**job, "series_uid": OUT},
            payload={"output_series_uid": OUT, "output_sop_uids": [OUT + ".1"],
                     "weights_sha256": "cd" * 32, "version": "1.4.0"}),
        EventType.NODE_STARTED: Event(EventType.NODE_STARTED, "component:node"),
        EventType.MODEL_REFUSED: Event(EventType.MODEL_REFUSED, "component:modelgate",
                                       Outcome.SERIOUS_FAILURE, subject={"model_id": "evil"},
                                       payload={"reason": "unsigned"}),
        EventType.KEY_REVOKED: Event(EventType.KEY_REVOKED, "user:alice",
                                     subject={"key_id": "0123456789abcdef"}),
        EventType.AUDIT_QUERIED: Event(EventType.AUDIT_QUERIED, "user:alice",
                                       subject={"patient": PATIENT}, payload={"entries": 3}),
        EventType.ASSOCIATION_REJECTED: Event(EventType.ASSOCIATION_REJECTED, "ae:NOBODY",
                                              Outcome.MINOR_FAILURE,
                                              payload={"reason": "calling AE not allowed",
                                                       "peer_address": "10.0.0.7"}),
    }
    out: dict[EventType, Event] = {}
    for t in EventType:
        out[t] = special.get(t) or Event(t, "component:pipeline" if t.value.startswith(
            ("job", "study", "output")) else "user:cli",
            subject=job if t.value.startswith(("job", "output")) else
            (study if t.value.startswith(("study", "dicomweb", "dispatch", "storage"))
             else {}))
    return out


@pytest.mark.parametrize("kind", list(EventType), ids=lambda t: t.value)
def test_every_message_is_valid_against_the_ps3_15_schema(schema: etree.RelaxNG,
                                                          kind: EventType) -> None:
    ev = one_of_each()[kind]
    for patients in (None, lambda study: AuditPatient("PID-42", "HOSP", "Doe^Jane")):
        xml = ET.tostring(dicom_audit_message(entry(ev), patients=patients))
        doc = etree.fromstring(xml)
        assert schema.validate(doc), (kind.value, schema.error_log.last_error, xml)


def roles(msg: ET.Element) -> list[tuple[str, str, str]]:
    out = []
    for ap in msg.findall("ActiveParticipant"):
        role = ap.find("RoleIDCode")
        out.append((ap.get("UserID", ""), role.get("csd-code", "") if role is not None else "",
                    ap.get("UserIsRequestor", "")))
    return out


def objects(msg: ET.Element, type_code: str, role: str) -> list[ET.Element]:
    return [po for po in msg.findall("ParticipantObjectIdentification")
            if po.get("ParticipantObjectTypeCode") == type_code
            and po.get("ParticipantObjectTypeCodeRole") == role]


def test_instances_transferred_has_source_destination_study_and_patient() -> None:
    """PS3.15 A.5.3.5: the sending process (110153), the receiving process (110152), the
    studies transferred and the patient."""
    msg = dicom_audit_message(entry(one_of_each()[EventType.INSTANCE_RECEIVED]),
                              node_ae="SYNTHNODE")
    assert msg.find("EventIdentification/EventID").get("csd-code") == "110104"
    assert roles(msg) == [("CT01", "110153", "true"), ("SYNTHNODE", "110152", "false")]
    (study,) = objects(msg, "2", "3")
    assert study.get("ParticipantObjectID") == STUDY
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    sop = study.find("ParticipantObjectDescription/SOPClass")
    assert sop.get("UID") == CT and sop.get("NumberOfInstances") == "1"
    (patient,) = objects(msg, "1", "1")
    assert patient.get("ParticipantObjectID") == PATIENT  # no lookup: the ledger's digest
    detail = study.find("ParticipantObjectDetail")
    assert base64.b64decode(detail.get("value")).decode().startswith("7:")  # the ledger entry


def test_patient_participant_resolved_from_the_index() -> None:
    msg = dicom_audit_message(entry(one_of_each()[EventType.DISPATCH_SUCCEEDED]),
                              patients=lambda s: AuditPatient("PID-42", "HOSP", "Doe^Jane")
                              if s == STUDY else None)
    (patient,) = objects(msg, "1", "1")
    assert patient.get("ParticipantObjectID") == "PID-42^^^HOSP"  # HL7 CX
    assert patient.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
    assert patient.find("ParticipantObjectName").text == "Doe^Jane"
    assert roles(msg) == [("SYNTHNODE", "110153", "true"), ("PACS", "110152", "false")]


def test_retrievals_and_queries_name_who_asked_and_who_got_it() -> None:
    each = one_of_each()
    move = dicom_audit_message(entry(each[EventType.RETRIEVE]), node_ae="SYNTHNODE")
    assert roles(move) == [("SYNTHNODE", "110153", "false"), ("STORESCP", "110152", "false"),
                           ("MOVESCU", "", "true")]
    assert objects(move, "2", "3") and objects(move, "1", "1")
    get = Event(EventType.RETRIEVE, "ae:GETSCU", subject={"study_uid": STUDY, "patient": PATIENT},
                payload={"service": "C-GET", "sop_uids": [OUT + ".1"]})
    assert roles(dicom_audit_message(entry(get), node_ae="SYNTHNODE")) == [
        ("SYNTHNODE", "110153", "false"), ("GETSCU", "110152", "true")]
    query = dicom_audit_message(entry(each[EventType.QUERY]), node_ae="SYNTHNODE")
    assert roles(query) == [("FINDSCU", "110153", "true"), ("SYNTHNODE", "110152", "false")]
    (sop,) = objects(query, "2", "3")
    assert sop.find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"
    dataset = base64.b64decode(sop.find("ParticipantObjectQuery").text)
    assert b"STUDY" in dataset and b"\x10\x00\x20\x00" in dataset  # PatientID key, no value
    assert objects(query, "1", "1")  # whose records the query returned


def test_application_and_audit_log_messages() -> None:
    each = one_of_each()
    start = dicom_audit_message(entry(each[EventType.NODE_STARTED]), node_ae="SYNTHNODE")
    assert ("SYNTHNODE", "110150", "false") in roles(start)
    used = dicom_audit_message(entry(each[EventType.AUDIT_QUERIED]), origin="site/ledger")
    (log,) = objects(used, "2", "13")
    assert log.get("ParticipantObjectID") == "site/ledger"
    assert log.find("ParticipantObjectName").text == "Security Audit Log"
