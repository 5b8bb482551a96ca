"""Ledger exports: verifiable JSON lines, DICOM audit messages, FHIR R4 AuditEvent /
Provenance; and lineage (source instances -> jobs -> outputs -> dispatches).

DICOM audit messages follow PS3.15 A.5 (IHE ATNA, RFC 3881 heritage): one
``<AuditMessage>`` per ledger entry, EventID from DCID 400, EventActionCode C/R/U/D/E,
EventOutcomeIndicator 0/4/8/12, ActiveParticipant with RoleIDCode 110153 (Source) /
110152 (Destination), ParticipantObjectIdentification with 110180 (Study Instance UID),
and a ParticipantObjectDetail ``ledger-leaf`` carrying ``seq:leafhash`` that ties each
message to its ledger entry.

FHIR resources are R4 AuditEvent (IHE BALP style) and Provenance (``output.created``:
target = output series, entity role ``source`` = source series, agent = the model Device
with its weights digest); validated with ``fhir.resources`` R4B models (AuditEvent and
Provenance are unchanged between R4 and R4B).
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from audit.atna import (
    APPLICATION_ACTIVITY,
    EVENT_MAP,
    OUTCOME_CODE,
    dicom_audit_message,
    write_dicom_audit,
)
from audit.events import Event, EventType, Outcome, format_time
from audit.ledger import Ledger, StoredEntry

__all__ = [
    "EVENT_MAP", "dicom_audit_message", "event_json", "export_ledger", "fhir_audit_event",
    "fhir_provenance", "inclusion_proofs", "lineage", "retrieval_item", "write_dicom_audit",
    "write_fhir_bundle",
]

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID_SYSTEM = "urn:dicom:uid"
ACTION_SYSTEM = "http://hl7.org/fhir/audit-event-action"


# -- verifiable export -------------------------------------------------------------------
def export_ledger(ledger: Ledger, out: IO[str], origin: str = "", start: int = 0,
                  stop: int | None = None) -> int:
    """Write the whole ledger as JSON lines, readable and verifiable; returns the count.

    Line 1: ``{"format": "synthnode-ledger-export", "version": 2, "size": n, "origin": ...}``;
    then one line per entry: the decoded event (``seq``, ``type``, ``time``, ``actor``,
    ``outcome``, ``subject``, ``payload``: grep and jq work on it) with ``leaf_hash`` and
    ``leaf``, the exact leaf bytes as a JSON string (leaves are canonical UTF-8 JSON), which
    ``python -m audit.verify --export`` re-hashes; an entry whose bytes are not UTF-8 (a
    damaged database) carries ``data`` (base64) instead, and no decoded fields. Then one
    ``{"checkpoint": note}`` per stored checkpoint within the exported size.
    """
    from audit.verify import EXPORT_FORMAT

    size = ledger.size() if stop is None else stop
    if start != 0:
        raise ValueError("a verifiable export starts at entry 0")
    out.write(json.dumps({"format": EXPORT_FORMAT, "version": 2, "size": size,
                          "origin": origin}) + "\n")
    n = 0
    for e in ledger.entries(0, size):
        out.write(json.dumps(_export_line(e), ensure_ascii=False) + "\n")
        n += 1
    for s, _root, note in ledger.checkpoints():
        if s <= size:
            out.write(json.dumps({"checkpoint": note}) + "\n")
    return n


def _export_line(e: StoredEntry) -> dict[str, Any]:
    try:
        leaf = e.data.decode("utf-8")
        row = event_json(e)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return {"seq": e.seq, "leaf_hash": e.leaf_hash.hex(),
                "data": base64.b64encode(e.data).decode()}
    return {**row, "leaf": leaf}


# -- FHIR R4 ---------------------------------------------------------------------------------
def _ident(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def fhir_audit_event(entry: StoredEntry, node: str = "synthnode") -> dict[str, Any]:
    """A FHIR R4 AuditEvent (as a validated JSON dict) for a ledger entry."""
    from fhir.resources.R4B.auditevent import AuditEvent

    ev = entry.event
    event_id, action, type_code = EVENT_MAP.get(ev.type, (APPLICATION_ACTIVITY, "E", None))
    kind, _, name = ev.actor.partition(":")
    user, alt = (name, f"AETITLE={name}") if kind == "ae" else (ev.actor, None)
    agent: dict[str, Any] = {"who": {"display": user}, "requestor": True}
    if alt:
        agent["altId"] = alt
    entities: list[dict[str, Any]] = []
    for key, _code, label in (("study_uid", "110180", "Study Instance UID"),
                              ("series_uid", "112002", "Series Instance UID"),
                              ("sop_uid", "", "SOP Instance UID")):
        if ev.subject.get(key):
            entities.append({"what": {"identifier": _ident(str(ev.subject[key]))},
                             "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                                      "code": "2", "display": "System Object"},
                             "name": label})
    for key in ("job_id", "model_id", "destination", "key_id"):
        if ev.subject.get(key):
            entities.append(
                {
                    "what": {
                        "identifier": {
                            "system": f"urn:synthnode:{key}",
                            "value": str(ev.subject[key]),
                        }
                    }
                }
            )
    entities.append(
        {
            "what": {"identifier": {"system": "urn:synthnode:ledger", "value": str(entry.seq)}},
            "detail": [
                {
                    "type": "leaf_hash",
                    "valueBase64Binary": base64.b64encode(entry.leaf_hash).decode(),
                },
                {"type": "event", "valueString": ev.type.value},
            ],
        }
    )
    res: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"ledger-{entry.seq}",
        "type": {"system": DCM_SYSTEM, "code": event_id[0], "display": event_id[1]},
        "action": action,
        "recorded": format_time(ev.time),
        "outcome": OUTCOME_CODE[ev.outcome],
        "agent": [agent, {"who": {"display": node}, "requestor": False}],
        "source": {"site": node, "observer": {"display": node},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
        "entity": entities,
    }
    if type_code:
        res["subtype"] = [{"system": DCM_SYSTEM, "code": type_code[0], "display": type_code[1]}]
    if ev.outcome != Outcome.SUCCESS and (
        reason := ev.payload.get("reason") or ev.payload.get("error")
    ):
        res["outcomeDesc"] = str(reason)
    return json.loads(AuditEvent.model_validate(res).model_dump_json(exclude_none=True))


def fhir_provenance(
    entry: StoredEntry,
    model: dict[str, Any] | None = None,
    policy: str = "urn:synthnode:policy:governed-generative-imaging",
) -> dict[str, Any]:
    """FHIR R4 Provenance of an ``output.created`` entry: target = output series, source =
    the source series, agent = the model Device (id, version, weights digest)."""
    from fhir.resources.R4B.provenance import Provenance

    ev = entry.event
    if ev.type != EventType.OUTPUT_CREATED:
        raise ValueError(f"Provenance is for output.created entries, not {ev.type.value}")
    out_series = ev.payload.get("output_series_uid") or ev.subject.get("series_uid")
    targets = [{"identifier": _ident(str(out_series)), "display": "synthetic series"}]
    targets += [{"identifier": _ident(str(u))} for u in ev.payload.get("output_sop_uids") or []]
    model = model or {}
    device = " ".join(str(x) for x in (model.get("model_id") or ev.subject.get("model_id", "model"),
                                        model.get("version", "")) if x)
    digest = model.get("weights_sha256") or ev.payload.get("weights_sha256")
    res: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": f"ledger-{entry.seq}",
        "target": targets,
        "recorded": format_time(ev.time),
        "policy": [policy],
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                    "display": "create",
                }
            ],
            "text": "generative synthesis",
        },
        "agent": [
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "assembler",
                            "display": "Assembler",
                        }
                    ]
                },
                "who": {
                    "display": f"Device {device}" + (f" weights sha256:{digest}" if digest else ""),
                    "identifier": {
                        "system": "urn:synthnode:model",
                        "value": str(ev.subject.get("model_id", device)),
                    },
                },
            },
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                            "code": "custodian",
                            "display": "Custodian",
                        }
                    ]
                },
                "who": {"display": ev.actor},
            },
        ],
        "entity": [
            {"role": "source", "what": {"identifier": _ident(str(u))}}
            for u in ev.payload.get("source_series_uids") or []
        ]
        or [{"role": "source", "what": {"display": "unknown source"}}],
    }
    return json.loads(Provenance.model_validate(res).model_dump_json(exclude_none=True))


def write_fhir_bundle(
    entries: Iterable[StoredEntry], out: IO[str], models: dict[str, dict[str, Any]] | None = None
) -> int:
    """A FHIR R4 ``collection`` Bundle with one AuditEvent per entry plus a Provenance per
    ``output.created``; returns the number of resources."""
    from fhir.resources.R4B.bundle import Bundle

    resources: list[dict[str, Any]] = []
    for e in entries:
        resources.append(fhir_audit_event(e))
        if e.event.type == EventType.OUTPUT_CREATED:
            resources.append(
                fhir_provenance(e, (models or {}).get(str(e.event.subject.get("job_id"))))
            )
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:synthnode:{r['resourceType']}/{r['id']}", "resource": r}
            for r in resources
        ],
    }
    Bundle.model_validate(bundle)
    json.dump(bundle, out, indent=1)
    out.write("\n")
    return len(resources)


# -- lineage -----------------------------------------------------------------------------
JOB_TYPES = {
    EventType.JOB_QUEUED,
    EventType.JOB_STARTED,
    EventType.JOB_FINISHED,
    EventType.JOB_FAILED,
    EventType.JOB_CANCELLED,
}
OUTPUT_TYPES = {EventType.OUTPUT_CREATED, EventType.OUTPUT_HELD, EventType.OUTPUT_DISCARDED,
                EventType.OUTPUT_RELEASED}
DISPATCH_TYPES = {
    EventType.DISPATCH_ATTEMPTED,
    EventType.DISPATCH_SUCCEEDED,
    EventType.DISPATCH_FAILED,
}
#: job.* payload ``kind`` of the jobs that send a series (node/pipeline/jobs.py JobKind.DISPATCH)
DISPATCH_JOB_KIND = "dispatch"
#: the job state each job event records (node/pipeline/jobs.py JobState)
JOB_STATE_OF = {EventType.JOB_QUEUED: "queued", EventType.JOB_STARTED: "running",
                EventType.JOB_FINISHED: "succeeded", EventType.JOB_FAILED: "failed",
                EventType.JOB_CANCELLED: "cancelled"}


def _uids(value: Any) -> list[str]:
    """A subject / payload UID field as a list (the dispatcher writes a list when one send
    covered several series)."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str) and v]
    return []


def _links(ev: Event) -> set[str]:
    """UIDs / ids an entry points to that lineage follows (see :func:`lineage`)."""
    out: set[str] = set()
    if ev.type in JOB_TYPES or ev.type in OUTPUT_TYPES or ev.type in DISPATCH_TYPES:
        out.update(_uids(ev.subject.get("job_id")))
        out.update(_uids(ev.payload.get("source_series_uids")))
    if ev.type in JOB_TYPES:
        out.update(_uids(ev.payload.get("parent_id")))  # a dispatch job -> its engine job
        out.update(_uids(ev.subject.get("series_uid")))  # a dispatch job's output series
    if ev.type in OUTPUT_TYPES or ev.type in DISPATCH_TYPES:
        out.update(_uids(ev.subject.get("series_uid")))
        out.update(_uids(ev.payload.get("output_series_uid")))
    if ev.type == EventType.INSTANCE_RECEIVED:
        out.update(_uids(ev.subject.get("series_uid")))  # an instance -> its series -> jobs
    return out


def _dispatch_item(e: StoredEntry) -> dict[str, Any]:
    ev = e.event
    item: dict[str, Any] = {"seq": e.seq, "type": ev.type.value, "time": format_time(ev.time),
                            "destination": ev.subject.get("destination"),
                            "series_uid": ev.subject.get("series_uid"),
                            "job_id": ev.subject.get("job_id"), "outcome": ev.outcome.value}
    for k in ("attempt", "attempts", "state", "acknowledged", "error"):
        if k in ev.payload:
            item[k] = ev.payload[k]
    return item


def lineage(ledger: Ledger, uid: str, max_rounds: int = 8) -> dict[str, Any]:
    """Everything the ledger links to ``uid`` (study / series / SOP UID, job id), as a tree:
    source series -> engine jobs -> output series -> dispatches to destinations.

    Links followed (keys documented in :mod:`audit.events`): instance.received (study /
    series / sop) <- job.* payload ``source_series_uids`` and subject ``job_id`` ->
    output.created / output.held / output.discarded (subject ``job_id``; payload
    ``output_series_uid``) -> dispatch.* (subject ``series_uid`` = the output series,
    ``job_id`` = the dispatch job). A dispatch job (job.* payload ``kind`` "dispatch",
    subject ``series_uid`` = what it sends, payload ``parent_id`` = its engine job) is not a
    node of the tree: its events hang under the series it sent, and its id is shown with
    each dispatch (``job_id``) and in the output's ``dispatch_jobs``.

    Retrievals (``retrieve``: C-GET / C-MOVE; ``dicomweb.access``: WADO) are found by the
    series and study UIDs they name (payload ``series_uids``, subject ``study_uid``) and
    hang under every source or output series they returned instances of (``retrievals``).

    Returns a dict: ``sources`` (series with their received instances, ``retrievals`` and,
    for originals forwarded as they are, their dispatches), ``jobs`` (engine jobs: task,
    model id / version / weights digest, state events, ``outputs`` each with its
    ``dispatches``, ``dispatch_jobs`` and ``retrievals``, ``held`` outputs with the quality
    gate's reasons, ``discarded`` partial outputs), ``unattached_dispatches`` (dispatch
    events whose series is neither a known output nor a source), ``other_retrievals``
    (retrievals of none of those series, e.g. of another series of the study), ``entries``
    (every ledger seq visited).
    """
    events = _linked_entries(ledger, uid, max_rounds)
    dispatch_jobs, engine_ids = _job_ids(events)
    jobs, outputs = _engine_jobs(events, engine_ids)
    sources = _sources(events, outputs)
    unattached = _attach_dispatches(events, outputs, sources)
    _attach_dispatch_jobs(dispatch_jobs, outputs)
    other_retrievals = _attach_retrievals(events, outputs, sources)
    return {"uid": uid, "sources": list(sources.values()), "jobs": list(jobs.values()),
            "unattached_dispatches": unattached, "other_retrievals": other_retrievals,
            "entries": [e.seq for e in events]}


def _linked_entries(ledger: Ledger, uid: str, max_rounds: int) -> list[StoredEntry]:
    """The entries linked to ``uid`` (``_links``, followed for up to ``max_rounds`` rounds),
    in ledger order."""
    seen: dict[int, StoredEntry] = {}
    frontier = {uid}
    known: set[str] = set()
    for _ in range(max_rounds):
        frontier -= known
        if not frontier:
            break
        known |= frontier
        new: set[str] = set()
        for e in ledger.query(uids=sorted(frontier)):
            if e.seq in seen:
                continue
            seen[e.seq] = e
            new |= _links(e.event)
        frontier = new
    return [seen[s] for s in sorted(seen)]


def _job_ids(events: list[StoredEntry]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``(dispatch_jobs, engine_ids)``: which job ids are dispatch jobs (kind recorded by
    node/pipeline/jobs.py; id -> what they sent, where, their state and events) and which are
    engine jobs (in order of appearance)."""
    dispatch_jobs: dict[str, dict[str, Any]] = {}
    engine_ids: list[str] = []
    for e in events:
        ev = e.event
        jid = ev.subject.get("job_id")
        if not jid or ev.type not in JOB_TYPES:
            continue
        if ev.payload.get("kind") == DISPATCH_JOB_KIND:
            d = dispatch_jobs.setdefault(str(jid), {"job_id": jid, "series_uid": None,
                                                    "destination": None, "parent_id": None,
                                                    "state": None, "events": []})
            d["series_uid"] = d["series_uid"] or ev.subject.get("series_uid")
            d["destination"] = d["destination"] or ev.payload.get("destination")
            d["parent_id"] = d["parent_id"] or ev.payload.get("parent_id")
            d["state"] = JOB_STATE_OF[ev.type]
            d["events"].append(e.seq)
        elif str(jid) not in engine_ids:
            engine_ids.append(str(jid))
    for e in events:  # engine jobs known only by their outputs (job events outside the ledger)
        jid = e.event.subject.get("job_id")
        if e.event.type in OUTPUT_TYPES and jid and str(jid) not in engine_ids \
                and str(jid) not in dispatch_jobs:
            engine_ids.append(str(jid))
    return dispatch_jobs, engine_ids


def _engine_jobs(
    events: list[StoredEntry], engine_ids: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(jobs, outputs)``: each engine job (task, model, state events, outputs, held and
    discarded outputs) and each output series (by UID; the same dicts as in the jobs)."""
    jobs: dict[str, dict[str, Any]] = {
        j: {"job_id": j, "task": None, "model_id": None, "model_version": None,
            "weights_sha256": None, "source_series_uids": [], "events": [], "outputs": [],
            "held": [], "discarded": [], "released": []}
        for j in engine_ids}
    outputs: dict[str, dict[str, Any]] = {}
    for e in events:
        job = jobs.get(str(e.event.subject.get("job_id")))
        if job is not None:
            _add_to_job(job, e, outputs)
    return jobs, outputs


def _add_to_job(job: dict[str, Any], e: StoredEntry, outputs: dict[str, dict[str, Any]]) -> None:
    """Record entry ``e`` (a job, output or dispatch event of ``job``) in ``job``; a created
    output also goes into ``outputs``."""
    ev = e.event
    for u in _uids(ev.payload.get("source_series_uids")):
        if u not in job["source_series_uids"]:
            job["source_series_uids"].append(u)
    job["model_id"] = (
        ev.subject.get("model_id") or ev.payload.get("model_id") or job["model_id"]
    )
    for k in ("model_version", "weights_sha256"):
        job[k] = ev.payload.get(k) or job[k]
    job["task"] = job["task"] or ev.payload.get("task")
    if ev.type in JOB_TYPES:
        state: dict[str, Any] = {"seq": e.seq, "type": ev.type.value,
                                 "time": format_time(ev.time)}
        for k in ("attempt", "worker", "weights_sha256", "seed", "device", "error"):
            if k in ev.payload:
                state[k] = ev.payload[k]
        job["events"].append(state)
    elif ev.type == EventType.OUTPUT_CREATED:
        series = ev.payload.get("output_series_uid") or ev.subject.get("series_uid")
        out: dict[str, Any] = {"seq": e.seq, "series_uid": series,
                               "sop_uids": len(ev.payload.get("output_sop_uids") or []),
                               "output_format": ev.payload.get("output_format"),
                               "watermark_payload": ev.payload.get("watermark_payload"),
                               "dispatches": [], "dispatch_jobs": []}
        job["outputs"].append(out)
        outputs[str(series)] = out
    elif ev.type == EventType.OUTPUT_HELD:
        job["held"].append({"seq": e.seq, "output_index": ev.payload.get("output_index"),
                            "series_uid": ev.subject.get("series_uid"),
                            "checks": list(ev.payload.get("checks") or []),
                            "reasons": list(ev.payload.get("reasons") or [])})
    elif ev.type == EventType.OUTPUT_DISCARDED:
        job["discarded"].append({"seq": e.seq, "series_uid": ev.subject.get("series_uid"),
                                 "reason": ev.payload.get("reason"), "actor": ev.actor})
    elif ev.type == EventType.OUTPUT_RELEASED:
        job["released"].append({"seq": e.seq, "actor": ev.actor,
                                "reason": ev.payload.get("reason"),
                                "job_id": ev.payload.get("new_job_id")})


def _sources(
    events: list[StoredEntry], outputs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Source series (by UID) with their received instances; the pipeline stores its outputs
    through ingest too, and those are not sources."""
    sources: dict[str, dict[str, Any]] = {}
    for e in events:
        ev = e.event
        series = ev.subject.get("series_uid")
        if ev.type != EventType.INSTANCE_RECEIVED or str(series) in outputs:
            continue  # the pipeline stores its outputs through ingest too: not sources
        s = sources.setdefault(str(series), {
            "series_uid": series, "study_uid": ev.subject.get("study_uid"),
            "instances": [], "from": ev.actor, "dispatches": []})
        s["instances"].append({"seq": e.seq, "sop_uid": ev.subject.get("sop_uid"),
                               "sha256": ev.payload.get("sha256")})
    return sources


def _attach_dispatches(events: list[StoredEntry], outputs: dict[str, dict[str, Any]],
                       sources: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Hang each dispatch under the series it sent: an output (or a forwarded original);
    returns the dispatches of neither."""
    unattached: list[dict[str, Any]] = []
    for e in events:
        if e.event.type not in DISPATCH_TYPES:
            continue
        item = _dispatch_item(e)
        found = (outputs.get(u) or sources.get(u) for u in _uids(e.event.subject.get("series_uid")))
        homes = [h for h in found if h is not None]
        for h in homes:
            h["dispatches"].append(item)
        if not homes:
            unattached.append(item)
    return unattached


def _attach_dispatch_jobs(dispatch_jobs: dict[str, dict[str, Any]],
                          outputs: dict[str, dict[str, Any]]) -> None:
    """List each dispatch job under the output it sent (``dispatch_jobs``)."""
    for d in dispatch_jobs.values():
        out = outputs.get(str(d["series_uid"]))
        if out is not None:
            out["dispatch_jobs"].append({k: d[k] for k in ("job_id", "destination", "state")})
            if d["destination"] is None:  # older ledgers: the destination is on the events
                dests = {x["destination"] for x in out["dispatches"] if x["job_id"] == d["job_id"]}
                out["dispatch_jobs"][-1]["destination"] = (
                    next(iter(dests)) if len(dests) == 1 else None
                )


RETRIEVAL_TYPES = {EventType.RETRIEVE, EventType.DICOMWEB_ACCESS}


def retrieval_item(e: StoredEntry) -> dict[str, Any]:
    """One retrieval (C-GET, C-MOVE, WADO) as lineage and ``audit patient`` show it."""
    ev = e.event
    p = ev.payload
    item: dict[str, Any] = {
        "seq": e.seq, "type": ev.type.value, "time": format_time(ev.time), "actor": ev.actor,
        "service": p.get("service") or ("DICOMweb" if ev.type == EventType.DICOMWEB_ACCESS
                                        else ev.type.value),
        "outcome": ev.outcome.value,
    }
    for k in ("destination", "level", "status", "completed", "failed", "warning",
              "sub_operations", "reason", "method", "path"):
        v = p.get(k, ev.subject.get(k))
        if v not in (None, ""):
            item[k] = v
    return item


def _covered(ev: Event, series_sops: dict[str, set[str]]) -> dict[str, int]:
    """``{series_uid: instances}`` of the known series a retrieval returned instances of:
    by SOP Instance UID when it lists them, else by the series it names."""
    sops = set(_uids(ev.payload.get("sop_uids")))
    named = set(_uids(ev.payload.get("series_uids"))) | set(_uids(ev.subject.get("series_uid")))
    out: dict[str, int] = {}
    for series, members in series_sops.items():
        n = len(members & sops) if sops and members else 0
        if n or series in named:
            out[series] = n or len(members)
    return out


def _attach_retrievals(events: list[StoredEntry], outputs: dict[str, dict[str, Any]],
                       sources: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Hang each retrieval under the source / output series it returned; returns the
    retrievals of none of them."""
    series_sops: dict[str, set[str]] = {}
    for e in events:
        ev = e.event
        if ev.type == EventType.OUTPUT_CREATED:
            series = str(ev.payload.get("output_series_uid") or ev.subject.get("series_uid"))
            series_sops.setdefault(series, set()).update(_uids(ev.payload.get("output_sop_uids")))
        elif ev.type == EventType.INSTANCE_RECEIVED:
            series = str(ev.subject.get("series_uid"))
            if series in sources:
                series_sops.setdefault(series, set()).update(_uids(ev.subject.get("sop_uid")))
    other: list[dict[str, Any]] = []
    for e in events:
        if e.event.type not in RETRIEVAL_TYPES:
            continue
        covered = _covered(e.event, series_sops)
        for series, n in covered.items():
            home = outputs.get(series) or sources.get(series)
            if home is not None:
                home.setdefault("retrievals", []).append({**retrieval_item(e), "instances": n})
        if not covered:
            other.append(retrieval_item(e))
    for home in (*outputs.values(), *sources.values()):
        home.setdefault("retrievals", [])
    return other


def iter_entries(ledger: Ledger, seqs: Iterable[int]) -> Iterator[StoredEntry]:
    for s in seqs:
        yield ledger.entry(s)


def parse_when(text: str | None) -> datetime | None:
    """``YYYY-MM-DD`` or ISO 8601 (naive = UTC) for ``audit query --since/--until``."""
    if not text:
        return None

    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def event_json(entry: StoredEntry) -> dict[str, Any]:
    ev: Event = entry.event
    return {"seq": entry.seq, "leaf_hash": entry.leaf_hash.hex(), "type": ev.type.value,
            "time": format_time(ev.time), "actor": ev.actor, "outcome": ev.outcome.value,
            "subject": ev.subject, "payload": ev.payload}


def write_path(path: Path | None) -> IO[str]:
    import sys

    return (
        sys.stdout if path is None or str(path) == "-" else Path(path).open("w", encoding="utf-8")
    )


def inclusion_proofs(ledger: Ledger, seqs: list[int]) -> dict[str, Any]:
    """Inclusion proofs of ``seqs`` (RFC 9162 2.1.3) against the latest signed checkpoint
    (entries after it: against the current tree, marked unsigned), each verified here."""
    from audit import merkle

    cps = ledger.checkpoints()
    size, root, note = cps[-1] if cps else (0, b"", None)
    out: dict[str, Any] = {"checkpoint": {"tree_size": size, "root_hash": root.hex(),
                                          "note": note} if note else None,
                           "entries": {}}
    head_size = ledger.size()
    head_root = ledger.root(head_size)
    for seq in seqs:
        signed = seq < size
        n, r = (size, root) if signed else (head_size, head_root)
        entry = ledger.entry(seq)
        path = ledger.inclusion_proof(seq, n)
        merkle.verify_inclusion(seq, n, entry.leaf_hash, path, r)
        out["entries"][str(seq)] = {"leaf_hash": entry.leaf_hash.hex(), "tree_size": n,
                                    "root_hash": r.hex(), "signed": signed,
                                    "proof": [h.hex() for h in path]}
    return out
