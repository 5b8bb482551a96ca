"""DICOM audit messages (PS3.15 A.5, IHE ATNA) for ledger entries.

One ``<AuditMessage>`` per ledger entry, valid against the Audit Message Schema of
PS3.15 A.5.1 (the test suite validates every event type against it), with the participants
PS3.15 A.5.3 requires of each message:

==========================  =========  ====================================================
ledger event                EventID    participants
==========================  =========  ====================================================
instance.received/rejected  110104 C   sender (110153 Source, requestor), this node (110152
                                       Destination); Study (SOP classes, instances), Patient
retrieve (C-GET)            110104 R   this node (Source), requestor (Destination); Studies,
                                       Patients
retrieve (C-MOVE)           110104 R   this node (Source), move destination (Destination),
                                       requestor; Studies, Patients
dispatch.*                  110104 R   this node (Source, requestor), destination
                                       (Destination); Study, Patient
storage.commitment          110104 R   requestor (Source), this node (Destination); Studies,
                                       Patients
query (C-FIND)              110112 E   requestor (Source), this node (Destination); the SOP
                                       class queried with the query keys (110181)
study/job/output/dicomweb   110103     the actor (requestor), this node; Study, Patient, job /
                                       model
model/key/config            110113 E   the actor (reporting), this node; the alert subject
checkpoint/verify/audit     110101     the actor, this node; the audit log (13 Security
                                       Resource)
node.started/stopped        110100 E   this node (110150 Application), launcher (110151)
association.*               110114 /   the calling AE (requestor), this node
                            110113
==========================  =========  ====================================================

The Patient participant (type 1, role 1, ID type (2, RFC-3881, "Patient Number")) is the
Patient ID in HL7 CX form (``ID^^^ISSUER``) and the patient's name, looked up by the node in
its index (``patients``: a callable study UID -> :class:`AuditPatient`); without a lookup,
or for a study no longer indexed, it is the ledger's keyed digest (the ledger holds no PHI).
Every message carries a ``ParticipantObjectDetail`` of type ``ledger-leaf`` (base64 of
``seq:leafhash:type``) that ties it to its ledger entry.
"""
from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

from audit.events import Event, EventType, Outcome, format_time
from audit.ledger import StoredEntry

__all__ = [
    "EVENT_MAP",
    "OUTCOME_CODE",
    "AuditPatient",
    "dicom_audit_message",
    "dicom_audit_xml",
    "write_dicom_audit",
]

DCM = "DCM"
RFC3881 = "RFC-3881"
OUTCOME_CODE = {Outcome.SUCCESS: "0", Outcome.MINOR_FAILURE: "4",
                Outcome.SERIOUS_FAILURE: "8", Outcome.MAJOR_FAILURE: "12"}

# DCID 400 Audit Event ID: (code, meaning)
APPLICATION_ACTIVITY = ("110100", "Application Activity")
AUDIT_LOG_USED = ("110101", "Audit Log Used")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
EXPORT = ("110106", "Export")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")

# DCID 402 Audit Active Participant Role ID
SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")
APPLICATION_ROLE = ("110150", "Application")
LAUNCHER_ROLE = ("110151", "Application Launcher")

# ParticipantObjectIDTypeCode
STUDY_UID = ("110180", "Study Instance UID", DCM)
SOP_CLASS_UID = ("110181", "SOP Class UID", DCM)
PATIENT_NUMBER = ("2", "Patient Number", RFC3881)
URI = ("12", "URI", RFC3881)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

# ledger event type -> (EventID, EventActionCode, EventTypeCode or None)
EVENT_MAP: dict[EventType, tuple[tuple[str, str], str, tuple[str, str] | None]] = {
    EventType.ASSOCIATION_ACCEPTED: (USER_AUTHENTICATION, "E", ("110122", "Login")),
    EventType.ASSOCIATION_REJECTED: (SECURITY_ALERT, "E", ("110126", "Node Authentication")),
    EventType.INSTANCE_RECEIVED: (INSTANCES_TRANSFERRED, "C", None),
    EventType.INSTANCE_REJECTED: (INSTANCES_TRANSFERRED, "C", None),
    EventType.INSTANCE_ROLLED_BACK: (INSTANCES_TRANSFERRED, "D", None),
    EventType.INSTANCES_EXPIRED: (INSTANCES_ACCESSED, "D", None),
    EventType.QUERY: (QUERY, "E", None),
    EventType.RETRIEVE: (INSTANCES_TRANSFERRED, "R", None),
    EventType.STORAGE_COMMITMENT: (INSTANCES_TRANSFERRED, "R", None),
    EventType.DICOMWEB_ACCESS: (INSTANCES_ACCESSED, "R", None),
    EventType.STUDY_COMPLETED: (INSTANCES_ACCESSED, "R", None),
    EventType.STUDY_REOPENED: (INSTANCES_ACCESSED, "U", None),
    EventType.JOB_QUEUED: (INSTANCES_ACCESSED, "R", None),
    EventType.JOB_STARTED: (INSTANCES_ACCESSED, "R", None),
    EventType.JOB_FINISHED: (INSTANCES_ACCESSED, "R", None),
    EventType.JOB_FAILED: (INSTANCES_ACCESSED, "R", None),
    EventType.JOB_CANCELLED: (INSTANCES_ACCESSED, "R", None),
    EventType.OUTPUT_CREATED: (INSTANCES_ACCESSED, "C", None),
    EventType.OUTPUT_HELD: (INSTANCES_ACCESSED, "R", None),
    EventType.OUTPUT_DISCARDED: (INSTANCES_ACCESSED, "D", None),
    EventType.OUTPUT_RELEASED: (INSTANCES_ACCESSED, "U", None),
    EventType.INSTANCE_LEFT_OUT: (INSTANCES_ACCESSED, "R", None),
    EventType.DISPATCH_ATTEMPTED: (INSTANCES_TRANSFERRED, "R", None),
    EventType.DISPATCH_SUCCEEDED: (INSTANCES_TRANSFERRED, "R", None),
    EventType.DISPATCH_FAILED: (INSTANCES_TRANSFERRED, "R", None),
    EventType.MODEL_APPROVED: (SECURITY_ALERT, "E", ("110129", "Security Configuration")),
    EventType.MODEL_REVOKED: (SECURITY_ALERT, "E", ("110129", "Security Configuration")),
    EventType.MODEL_REFUSED: (SECURITY_ALERT, "E", ("110132", "Use of Restricted Function")),
    EventType.MODEL_LOADED: (SECURITY_ALERT, "E", ("110129", "Security Configuration")),
    EventType.KEY_REVOKED: (SECURITY_ALERT, "E", ("110137", "User security Attributes Changed")),
    EventType.CONFIG_LOADED: (SECURITY_ALERT, "E", ("110128", "Network Configuration")),
    EventType.CHECKPOINT_SIGNED: (AUDIT_LOG_USED, "C", None),
    EventType.VERIFICATION_RUN: (AUDIT_LOG_USED, "R", None),
    EventType.AUDIT_QUERIED: (AUDIT_LOG_USED, "R", None),
    EventType.NODE_STARTED: (APPLICATION_ACTIVITY, "E", ("110120", "Application Start")),
    EventType.NODE_STOPPED: (APPLICATION_ACTIVITY, "E", ("110121", "Application Stop")),
}

TRANSFERRED_IN = {EventType.INSTANCE_RECEIVED, EventType.INSTANCE_REJECTED}
DISPATCHES = {EventType.DISPATCH_ATTEMPTED, EventType.DISPATCH_SUCCEEDED,
              EventType.DISPATCH_FAILED}
AUDIT_LOG = {EventType.CHECKPOINT_SIGNED, EventType.VERIFICATION_RUN, EventType.AUDIT_QUERIED}


@dataclass(frozen=True)
class AuditPatient:
    """A patient as the Patient participant shows it (from the node's index)."""

    patient_id: str
    issuer: str = ""
    name: str | None = None

    @property
    def cx(self) -> str:
        """HL7 v2 CX form: ``ID^^^ISSUER`` (the issuer as assigning authority)."""
        return f"{self.patient_id}^^^{self.issuer}" if self.issuer else self.patient_id


PatientLookup = Callable[[str], AuditPatient | None]


# -- building blocks ---------------------------------------------------------------------
def _code(parent: ET.Element, tag: str, code: tuple[str, ...], system: str = DCM) -> ET.Element:
    """A CodedValueType element: csd-code, codeSystemName, originalText (PS3.15 A.5.1)."""
    system = code[2] if len(code) > 2 else system
    return ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": system, "originalText": code[1]}
    )


def _participant(msg: ET.Element, user: str, *, requestor: bool, alt: str | None = None,
                 name: str | None = None, role: tuple[str, str] | None = None,
                 address: str | None = None) -> ET.Element:
    attrs = {"UserID": user or "-", "UserIsRequestor": "true" if requestor else "false"}
    if alt:
        attrs["AlternativeUserID"] = alt
    if name:
        attrs["UserName"] = name
    if address:
        attrs["NetworkAccessPointID"] = address
        attrs["NetworkAccessPointTypeCode"] = "2" if address[:1].isdigit() or ":" in address \
            else "1"
    ap = ET.SubElement(msg, "ActiveParticipant", attrs)
    if role:
        _code(ap, "RoleIDCode", role)
    return ap


def _actor(ev: Event) -> tuple[str, str | None]:
    """UserID and AlternativeUserID of the event's actor (``ae:X`` -> ``AETITLE=X``)."""
    kind, _, name = ev.actor.partition(":")
    if kind == "ae":
        return name, f"AETITLE={name}"
    return ev.actor, None


def _object(msg: ET.Element, oid: str, id_type: tuple[str, ...], name: str, *,
            type_code: str, role: str | None = None, life_cycle: str | None = None,
            query: bytes | None = None) -> ET.Element:
    attrs = {"ParticipantObjectID": oid or "-", "ParticipantObjectTypeCode": type_code}
    if role:
        attrs["ParticipantObjectTypeCodeRole"] = role
    if life_cycle:
        attrs["ParticipantObjectDataLifeCycle"] = life_cycle
    po = ET.SubElement(msg, "ParticipantObjectIdentification", attrs)
    _code(po, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(po, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    else:
        ET.SubElement(po, "ParticipantObjectName").text = name
    return po


def _detail(po: ET.Element, kind: str, value: str) -> None:
    # ParticipantObjectDetail follows the Name / Query and precedes the Description
    el = ET.Element("ParticipantObjectDetail",
                    {"type": kind, "value": base64.b64encode(value.encode()).decode()})
    children = list(po)
    at = next((i for i, c in enumerate(children) if c.tag == "ParticipantObjectDescription"),
              len(children))
    po.insert(at, el)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str) and v]
    return []


# -- the message -------------------------------------------------------------------------
class _Builder:
    def __init__(self, entry: StoredEntry, node_ae: str, site: str, origin: str,
                 patients: PatientLookup | None) -> None:
        self.entry = entry
        self.ev = entry.event
        self.node_ae = node_ae
        self.site = site
        self.origin = origin
        self.patients = patients
        self.msg = ET.Element("AuditMessage")

    def node(self, *, requestor: bool = False, role: tuple[str, str] | None = None,
             name: str | None = None) -> None:
        _participant(self.msg, self.node_ae, requestor=requestor, role=role, name=name,
                     alt=f"AETITLE={self.node_ae}")

    def actor(self, *, requestor: bool = True, role: tuple[str, str] | None = None) -> None:
        user, alt = _actor(self.ev)
        address = self.ev.payload.get("peer_address") or self.ev.payload.get("peer")
        _participant(self.msg, user, requestor=requestor, alt=alt, role=role,
                     address=str(address).rsplit(":", 1)[0].strip("()'\" ") if address else None)

    def build(self) -> ET.Element:
        ev = self.ev
        event_id, action, type_code = EVENT_MAP.get(ev.type, (APPLICATION_ACTIVITY, "E", None))
        ei = ET.SubElement(self.msg, "EventIdentification", {
            "EventActionCode": action, "EventDateTime": format_time(ev.time),
            "EventOutcomeIndicator": OUTCOME_CODE[ev.outcome]})
        _code(ei, "EventID", event_id)
        if type_code:
            _code(ei, "EventTypeCode", type_code)
        reason = ev.payload.get("reason") or ev.payload.get("error") or ev.payload.get("detail")
        if ev.outcome != Outcome.SUCCESS and reason:
            ET.SubElement(ei, "EventOutcomeDescription").text = str(reason)[:1024]
        self.participants()
        asi = ET.SubElement(self.msg, "AuditSourceIdentification",
                            {"AuditSourceID": self.node_ae, "AuditEnterpriseSiteID": self.site})
        ET.SubElement(asi, "AuditSourceTypeCode", {"csd-code": "4"})  # application server
        self.objects()
        return self.msg

    def participants(self) -> None:
        ev = self.ev
        t = ev.type
        if t in TRANSFERRED_IN:
            self.actor(role=SOURCE_ROLE)
            self.node(role=DESTINATION_ROLE)
        elif t == EventType.RETRIEVE:
            dest = ev.subject.get("destination") or ev.payload.get("destination")
            if ev.payload.get("service") == "C-MOVE" and dest:
                self.node(role=SOURCE_ROLE)
                _participant(self.msg, str(dest), requestor=False, alt=f"AETITLE={dest}",
                             role=DESTINATION_ROLE)
                self.actor()
            else:
                self.node(role=SOURCE_ROLE)
                self.actor(role=DESTINATION_ROLE)
        elif t in DISPATCHES:
            self.node(requestor=True, role=SOURCE_ROLE, name=ev.actor)
            _participant(self.msg, str(ev.subject.get("destination") or "-"), requestor=False,
                         role=DESTINATION_ROLE)
        elif t in (EventType.STORAGE_COMMITMENT, EventType.QUERY):
            self.actor(role=SOURCE_ROLE)
            self.node(role=DESTINATION_ROLE)
        elif t in (EventType.NODE_STARTED, EventType.NODE_STOPPED):
            self.node(role=APPLICATION_ROLE)
            _participant(self.msg, ev.actor, requestor=True, role=LAUNCHER_ROLE)
        elif ev.actor.startswith("component:"):
            self.node(requestor=True, name=ev.actor)  # the node acted on its own
        else:
            self.actor()
            self.node()

    def objects(self) -> None:
        ev = self.ev
        first: ET.Element | None = None
        if ev.type == EventType.QUERY:
            first = self.query_object()
        studies = self.studies()
        for study in studies:
            po = self.study_object(study, len(studies) == 1)
            first = first if first is not None else po
        for po in self.patient_objects(studies):
            first = first if first is not None else po
        extra = self.other_object()
        first = first if first is not None else extra
        if first is None:  # every message names its ledger entry
            first = _object(self.msg, f"{self.origin}#{self.entry.seq}", URI, "audit ledger entry",
                            type_code="2", role="13")
        _detail(first, "ledger-leaf",
                f"{self.entry.seq}:{self.entry.leaf_hash.hex()}:{ev.type.value}")

    def studies(self) -> list[str]:
        one = self.ev.subject.get("study_uid")
        return [str(one)] if one else _strings(self.ev.payload.get("study_uids"))

    def study_object(self, study: str, only: bool) -> ET.Element:
        ev = self.ev
        life = "8" if ev.type == EventType.OUTPUT_CREATED else None  # derivation
        po = _object(self.msg, study, STUDY_UID, "Study", type_code="2", role="3",
                     life_cycle=life)
        sops = (_strings(ev.subject.get("sop_uid")) or _strings(ev.payload.get("output_sop_uids"))
                or _strings(ev.payload.get("sop_uids")))
        if sops and only:
            desc = ET.SubElement(po, "ParticipantObjectDescription")
            attrs = {"NumberOfInstances": str(len(sops))}
            if ev.subject.get("sop_class_uid"):
                attrs["UID"] = str(ev.subject["sop_class_uid"])
            sc = ET.SubElement(desc, "SOPClass", attrs)
            for uid in sops:
                ET.SubElement(sc, "Instance", {"UID": uid})
        return po

    def patient_objects(self, studies: list[str]) -> list[ET.Element]:
        ev = self.ev
        digests = _strings(ev.subject.get("patient")) or _strings(ev.payload.get("patients"))
        shown: dict[str, AuditPatient] = {}
        if self.patients is not None:
            for s in studies:
                p = self.patients(s)
                if p is not None:
                    shown[p.cx] = p
        out = [_object(self.msg, cx, PATIENT_NUMBER, p.name or p.patient_id, type_code="1",
                       role="1") for cx, p in shown.items()]
        if not shown:
            out += [_object(self.msg, d, PATIENT_NUMBER, "Patient ID digest (HMAC-SHA-256)",
                            type_code="1", role="1") for d in digests]
        return out

    def query_object(self) -> ET.Element:
        p = self.ev.payload
        po = _object(self.msg, str(self.ev.subject.get("sop_class_uid") or "-"), SOP_CLASS_UID,
                     "", type_code="2", role="3",
                     query=query_dataset(str(p.get("level") or ""), _strings(p.get("keys"))))
        _detail(po, "TransferSyntax", EXPLICIT_VR_LE)
        return po

    def other_object(self) -> ET.Element | None:
        ev = self.ev
        s, p = ev.subject, ev.payload
        if ev.type in AUDIT_LOG:
            return _object(self.msg, self.origin, URI, "Security Audit Log", type_code="2",
                           role="13")
        if s.get("job_id"):
            kind = str(p.get("kind") or "")
            return _object(self.msg, str(s["job_id"]), URI,
                           " ".join(x for x in (kind, "job", str(p.get("task") or "")) if x),
                           type_code="2", role="20")
        if s.get("model_id"):
            po = _object(self.msg, str(s["model_id"]), URI,
                         f"model {s['model_id']} {p.get('version') or ''}".strip(),
                         type_code="2", role="4")
            if p.get("weights_sha256"):
                _detail(po, "weights_sha256", str(p["weights_sha256"]))
            return po
        if s.get("key_id"):
            return _object(self.msg, str(s["key_id"]), URI, "model approver key",
                           type_code="2", role="13")
        return None


def query_dataset(level: str, keys: list[str]) -> bytes:
    """The C-FIND identifier as the ledger knows it (PS3.15 A.5.3.10 ParticipantObjectQuery):
    Query/Retrieve Level and the matching keys, encoded Explicit VR Little Endian with empty
    values: the ledger records key names, never the values (they carry PHI)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    if level:
        ds.QueryRetrieveLevel = level
    for kw in keys:
        tag = tag_for_keyword(kw)
        if tag is not None:
            vr = dictionary_VR(tag)
            ds.add_new(tag, vr, [] if vr == "SQ" else None)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def dicom_audit_message(entry: StoredEntry, node_ae: str = "SYNTHNODE", site: str = "synthnode",
                        *, origin: str = "synthnode.local/ledger",
                        patients: PatientLookup | None = None) -> ET.Element:
    """One PS3.15 A.5 ``AuditMessage`` element for a ledger entry (see the module docs).

    Parameters
    ----------
    entry
        The stored ledger entry.
    node_ae, site
        This node's AE title (AuditSourceID) and AuditEnterpriseSiteID.
    origin
        The ledger's origin (checkpoint key name): the audit log's ParticipantObjectID.
    patients
        Study Instance UID -> :class:`AuditPatient` (the node's index); None: Patient
        participants carry the ledger's keyed digest.
    """
    return _Builder(entry, node_ae, site, origin, patients).build()


def dicom_audit_xml(entry: StoredEntry, **kwargs: Any) -> str:
    """:func:`dicom_audit_message` serialised on one line (what syslog and files carry)."""
    return ET.tostring(dicom_audit_message(entry, **kwargs), encoding="unicode")


def write_dicom_audit(entries: Iterable[StoredEntry], out: IO[str], node_ae: str = "SYNTHNODE",
                      *, render: Callable[[StoredEntry], str] | None = None) -> int:
    """Write one ``<AuditMessage>`` XML document per line (syslog-ready); returns count.
    ``render`` (entry -> XML text) replaces the default rendering (no patient lookup)."""
    fn = render or (lambda e: dicom_audit_xml(e, node_ae=node_ae))
    n = 0
    for e in entries:
        out.write(fn(e) + "\n")
        n += 1
    return n
