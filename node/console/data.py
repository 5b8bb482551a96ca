"""What the console pages show, read through the node's own query code (QIDO-RS matching,
the job store, the ledger's query and lineage, the model gate): no SQL of its own beyond
the dashboard's counts."""
from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from node.context import NodeContext
from node.dicomweb.access import AccessRecorder
from node.dicomweb.auth import Principal
from node.dicomweb.qido import parse_qido, search
from storage.matching import QueryLevel

__all__ = ["dashboard", "delivery", "model_rows", "series_of", "studies"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _value(obj: dict[str, Any], tag: str) -> str:
    v = obj.get(tag, {}).get("Value") or []
    if not v:
        return ""
    x = v[0]
    if isinstance(x, dict):  # Person Name
        return str(x.get("Alphabetic", ""))
    return "\\".join(str(i) for i in v) if len(v) > 1 else str(x)


def _qido(ctx: NodeContext, recorder: AccessRecorder, who: Principal, level: QueryLevel,
          params: list[tuple[str, str]], path_keys: dict[str, str],
          path: str) -> list[dict[str, Any]]:
    req = parse_qido(level, params, path_keys, False)
    body = b"".join(search(ctx, recorder, who, req, "", path))
    return list(json.loads(body))


#: (console field, QIDO key) of the study search form
SEARCH_FIELDS = [("patient_id", "PatientID"), ("patient_name", "PatientName"),
                 ("accession", "AccessionNumber"), ("date", "StudyDate"),
                 ("modality", "ModalitiesInStudy")]


def studies(ctx: NodeContext, recorder: AccessRecorder, who: Principal,
            form: dict[str, str]) -> list[dict[str, str]]:
    """Studies matching the search form (QIDO-RS matching: wildcards, date ranges); the
    read is recorded in the ledger as a QIDO-RS query by the console user."""
    params = [(key, form[name].strip()) for name, key in SEARCH_FIELDS
              if form.get(name, "").strip()]
    syn = form.get("synthetic", "").upper()
    if syn in ("YES", "NO"):
        params.append(("SyntheticData", syn))
    params += [("includefield", "SyntheticData"), ("limit", "200")]
    rows = _qido(ctx, recorder, who, QueryLevel.STUDY, params, {}, "/console/studies")
    return [{"study": _value(r, "0020000D"), "patient_id": _value(r, "00100020"),
             "patient_name": _value(r, "00100010"), "date": _value(r, "00080020"),
             "accession": _value(r, "00080050"), "modalities": _value(r, "00080061"),
             "description": _value(r, "00081030"), "series": _value(r, "00201206"),
             "instances": _value(r, "00201208"),
             "synthetic": _value(r, "0008001C")} for r in rows]


def series_of(ctx: NodeContext, recorder: AccessRecorder, who: Principal,
              study: str) -> list[dict[str, str]]:
    rows = _qido(ctx, recorder, who, QueryLevel.SERIES,
                 [("includefield", "SyntheticData"), ("includefield", "SeriesDescription")],
                 {"StudyInstanceUID": study}, f"/console/studies/{study}")
    out = []
    for r in rows:
        syn = _value(r, "0008001C")  # Synthetic Data
        out.append({"series": _value(r, "0020000E"), "modality": _value(r, "00080060"),
                    "number": _value(r, "00200011"), "description": _value(r, "0008103E"),
                    "instances": _value(r, "00201209"), "synthetic": syn})
    return sorted(out, key=lambda s: (s["synthetic"] == "YES", s["number"].zfill(6)))


def completion(ctx: NodeContext, study: str) -> dict[str, Any] | None:
    """The pipeline's completion state of a study (open / complete, instances, times), or
    None when the pipeline has not seen it."""
    from node.pipeline.tables import studies as t

    with ctx.engine.connect() as c:
        row = c.execute(select(t.c.state, t.c.instances, t.c.first_instance_at,
                               t.c.last_instance_at, t.c.completed_at, t.c.generation)
                        .where(t.c.study_uid == study)).first()
    if row is None:
        return None
    return dict(row._mapping)


def delivery(jobs: list[Any]) -> list[dict[str, Any]]:
    """Per destination: each dispatch job's state, attempts and last error."""
    out = []
    for j in jobs:
        if j.kind.value != "dispatch":
            continue
        spec = j.spec if isinstance(j.spec, dict) else json.loads(j.spec or "{}")
        out.append({"destination": spec.get("destination", "?"), "job": j.id,
                    "series": j.series_uid or "", "state": j.state.value,
                    "attempts": f"{j.attempts}/{j.max_attempts}", "error": j.error or ""})
    return out


def dashboard(ctx: NodeContext, node_info: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels: (label, value, detail, measured) each."""
    from audit.tables import ledger_checkpoints, ledger_head
    from storage.tables import Instance

    rows: list[dict[str, Any]] = []

    def add(label: str, value: Any, detail: str = "") -> None:
        rows.append({"label": label, "value": value, "detail": detail, "measured": _now()})

    for name, addr in node_info.get("listeners", []):
        add(f"{name} listener", addr)
    obs = ctx.observability
    if obs is not None:
        ok, checks, _ = obs.ready()
        add("readiness", "ready" if ok else "NOT READY",
            ", ".join(f"{c.name}: {'ok' if c.ok else 'FAILED'} ({c.detail})" for c in checks))
        m = obs.metrics
        for source in ("dimse", "stow"):  # summed over the acceptor processes, if several
            rec = m.total("synthnode_instances_received", source=source)
            ref = m.total("synthnode_instances_refused", source=source)
            label = "C-STORE" if source == "dimse" else "STOW-RS"
            add(f"{label} instances received since start", int(rec),
                f"{int(ref)} refused; up {int(time.time() - obs.started)} s")
    ti = Instance.__table__
    with ctx.engine.connect() as c:
        n, size = c.execute(select(func.count(), func.coalesce(func.sum(ti.c.file_size),
                                                                0))).one()
        head = c.execute(select(ledger_head.c.size)).scalar() or 0
        cp = c.execute(select(ledger_checkpoints.c.size, ledger_checkpoints.c.signed_at,
                              ledger_checkpoints.c.note, ledger_checkpoints.c.root_hash)
                       .order_by(ledger_checkpoints.c.size.desc()).limit(1)).first()
    add("instances stored", int(n), f"{int(size)} bytes")
    rate, peers = _recent(ctx)
    add("ingest rate", f"{rate} in the last 5 min", "instances received (ledger)")
    add("peers seen in the last hour", ", ".join(peers) or "none",
        "DIMSE associations accepted / refused (ledger)")
    states = _job_counts(ctx)
    add("queue depth by job state",
        ", ".join(f"{k}: {v}" for k, v in sorted(states.items())) or "no jobs",
        "engine and dispatch jobs")
    add("held outputs", _held_outputs(ctx), "outputs held by the quality gate or refused "
        "(watermark not verified) and not yet released or discarded; their jobs' pages show "
        "the failed checks and the pictures")
    add("failed dispatches", _failed_dispatches(ctx), "dispatch jobs in state failed")
    try:
        free = shutil.disk_usage(ctx.store.root).free
        add("disk free (store)", f"{free / 2**30:.1f} GiB", str(ctx.store.root))
    except OSError as exc:
        add("disk free (store)", "unknown", str(exc))
    add("ledger size", int(head), "entries")
    if cp is not None:
        add("last checkpoint", f"{int(cp[0])} entries, {_checkpoint_state(ctx, cp)}",
            f"signed {cp[1].isoformat(timespec='seconds') if cp[1] else '?'}")
    else:
        add("last checkpoint", "none yet")
    add("model gate", _gate_summary(ctx))
    return rows


def _recent(ctx: NodeContext) -> tuple[int, list[str]]:
    """Instances received in the last 5 minutes; calling AEs of the last hour's
    associations with their count (refusals marked)."""
    from datetime import timedelta

    from audit.events import EventType
    from audit.tables import ledger_entries as e

    now = datetime.now(UTC)
    with ctx.engine.connect() as c:
        rate = c.execute(select(func.count()).select_from(e).where(
            e.c.event_type == EventType.INSTANCE_RECEIVED.value,
            e.c.time >= now - timedelta(minutes=5))).scalar() or 0
        rows = c.execute(select(e.c.actor, e.c.event_type, func.count()).where(
            e.c.event_type.in_([EventType.ASSOCIATION_ACCEPTED.value,
                                EventType.ASSOCIATION_REJECTED.value]),
            e.c.time >= now - timedelta(hours=1)).group_by(e.c.actor, e.c.event_type)
            .order_by(e.c.actor)).all()
    peers = [f"{actor} ({n}{' refused' if et.endswith('rejected') else ''})"
             for actor, et, n in rows]
    return int(rate), peers


def _checkpoint_state(ctx: NodeContext, cp: Any) -> str:
    """Whether the last checkpoint's signature verifies with this node's key and its root
    is the root of the stored tree at its size ('verify the whole ledger' on the Audit page
    re-derives every hash)."""
    from audit.checkpoint import open_checkpoint

    if ctx.audit is None:
        return "not verified (no verifier)"
    try:
        opened = open_checkpoint(cp[2], ctx.audit.verifier, ctx.settings.audit.origin)
        ok = opened.root == bytes(cp[3]) == ctx.ledger.root(int(cp[0]))
    except Exception as exc:  # a bad signature or note: shown, not raised
        return f"NOT VERIFIED ({type(exc).__name__}: {exc})"[:200]
    return "verified" if ok else "NOT VERIFIED (root differs from the stored tree)"


def _held_outputs(ctx: NodeContext) -> int:
    """Outputs waiting for an administrator, from the pipeline's own state: a succeeded
    engine job's held (quality gate; never built) and refused (watermark not verified;
    stored in ``pipeline_outputs`` flagged held) outputs, until it is released or
    discarded."""
    from node.pipeline.jobs import JobStore

    jobs = JobStore(ctx.engine, ctx.ledger).list(state="succeeded", kind="engine", limit=100000)
    return sum(len(r.get("held") or []) + len(r.get("refused") or [])
               for r in (j.result or {} for j in jobs) if not r.get("decision"))


def _job_counts(ctx: NodeContext) -> dict[str, int]:
    from node.pipeline.jobs import JobStore

    return JobStore(ctx.engine, ctx.ledger).counts()


def _failed_dispatches(ctx: NodeContext) -> int:
    from node.pipeline.jobs import JobStore

    return len(JobStore(ctx.engine, ctx.ledger).list(state="failed", kind="dispatch",
                                                      limit=10000))


def model_rows(ctx: NodeContext) -> list[dict[str, str]]:
    """Model folders with their gate state (read only: nothing is recorded)."""
    from audit.modelgate import Approver, ModelGate

    gate = ModelGate(ctx.ledger, Approver.from_config(ctx.settings.audit.approvers))
    root: Path = ctx.settings.models_dir
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and any(c.is_file() for c in p.iterdir())) if root.is_dir() else []
    out = []
    for f in folders:
        s = gate.status(f)
        card = ""
        for name in ("MODEL_CARD.md", "README.md", "model_card.md"):
            if (f / name).is_file():
                card = (f / name).read_text(errors="replace")[:4000]
                break
        out.append({"folder": f.name, "model_id": s.model_id, "version": s.version,
                    "state": s.state, "detail": s.detail or "", "card": card})
    return out


def model_uses(ctx: NodeContext, per_model: int = 20) -> dict[str, dict[str, Any]]:
    """Where each model was used, from the ledger: the engine jobs whose outputs it made
    (``output.created``) or the quality gate held (``output.held``), by model id: the
    number of such entries and the latest ``per_model`` of them (job, study, event, time)."""
    uses: dict[str, dict[str, Any]] = {}
    for entry in reversed(ctx.ledger.query(event_types=["output.created", "output.held"])):
        ev = entry.event
        model = ev.subject.get("model_id") or ev.payload.get("model_id")
        if not model:
            continue
        u = uses.setdefault(str(model), {"count": 0, "jobs": []})
        u["count"] += 1
        if len(u["jobs"]) < per_model:
            u["jobs"].append({"job_id": ev.subject.get("job_id", ""),
                              "study_uid": ev.subject.get("study_uid", ""),
                              "event": ev.type.value, "seq": entry.seq,
                              "time": ev.time.isoformat(timespec="seconds")})
    return uses


def _gate_summary(ctx: NodeContext) -> str:
    try:
        rows = model_rows(ctx)
    except Exception as exc:  # the dashboard shows it rather than failing
        return f"unknown ({type(exc).__name__})"
    if not rows:
        return "no model installed"
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
