"""``synthnode audit``: verify, prove, query, trace and export the ledger.

verify       re-derive every hash and root, check checkpoint signatures and the external
             checkpoint file; exit 1 naming the first bad entry
prove        inclusion proof of one entry (RFC 9162 2.1.3) as JSON
consistency  consistency proof between two tree sizes (RFC 9162 2.1.4) as JSON
query        entries by UID, time range, event type, actor (table or JSON lines)
lineage      source series -> engine jobs -> outputs -> dispatches -> retrievals of a UID
patient      every study, synthetic series, delivery and access of one patient
export       verifiable JSON lines, DICOM audit messages (PS3.15 A.5) or FHIR R4 JSON
pubkey       the checkpoint verifier key (for ``python -m audit.verify``)
checkpoint   sign a checkpoint of the current tree now
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from node.audit_views import lineage_tree, retrieval_text
from node.cli.common import ConfigOption, console, fail, open_engine, settings_from
from node.cli.output import Col, emit, time_option

app = typer.Typer(no_args_is_help=True)


def _service(config: Path | None):  # type: ignore[no-untyped-def]
    from audit.ledger import LedgerError
    from audit.service import open_ledger

    settings = settings_from(config)
    engine = open_engine(settings, config)
    try:
        svc = open_ledger(engine, key_file=settings.ledger_key_file,
                          checkpoint_file=settings.checkpoint_file, origin=settings.audit.origin,
                          syslog_target=settings.audit.syslog_target)
    except (LedgerError, ValueError, OSError) as exc:
        fail(str(exc))
    return settings, svc


@app.command()
def verify(
    config: Path | None = ConfigOption,
    checkpoints: Path | None = typer.Option(
        None, "--checkpoints", help="external checkpoint file (default: the configured one)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    record: bool = typer.Option(
        True, "--record/--no-record", help="append a verification.run event"
    ),
    deep: bool = typer.Option(
        False, "--deep", help="also parse every leaf and check the UID index"
    ),
) -> None:
    """Re-derive every leaf, node and root; check every checkpoint signature and the
    checkpoint file. Exit 1 naming the first bad entry."""
    from audit.events import Event, EventType, Outcome
    from audit.verify import print_report, verify_database

    settings, svc = _service(config)
    report = verify_database(
        svc.ledger.engine, svc.verifier, checkpoints or settings.checkpoint_file, deep=deep
    )
    print_report(report, as_json=as_json)
    if record:
        svc.ledger.append(Event(EventType.VERIFICATION_RUN, "user:cli",
                                Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE,
                                payload={"size": report.size, "root_hash": report.root.hex(),
                                         "ok": report.ok, "problems": len(report.problems),
                                         "first_bad_entry": report.first_bad_entry}))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def prove(
    seq: int = typer.Argument(..., help="entry number (leaf index)"),
    size: int | None = typer.Option(None, "--size", help="tree size (default: latest checkpoint, "
                                    "else the current size)"),
    config: Path | None = ConfigOption,
) -> None:
    """Inclusion proof of entry SEQ as JSON (verified before it is printed)."""
    from audit import merkle
    from audit.ledger import LedgerError

    _settings, svc = _service(config)
    ledger = svc.ledger
    note = None
    if size is None:
        cps = [c for c in ledger.checkpoints() if c[0] > seq]
        if cps:
            size, _root, note = cps[-1]
        else:
            size = ledger.size()
    try:
        entry = ledger.entry(seq)
        proof = ledger.inclusion_proof(seq, size)
        root = ledger.root(size)
        merkle.verify_inclusion(seq, size, entry.leaf_hash, proof, root)
    except (LedgerError, merkle.InvalidProof) as exc:
        fail(str(exc))
        return
    out: dict[str, Any] = {"seq": seq, "tree_size": size, "leaf_hash": entry.leaf_hash.hex(),
                           "leaf_data": entry.data.decode("utf-8"), "root_hash": root.hex(),
                           "proof": [p.hex() for p in proof]}
    if note:
        out["checkpoint"] = note
    print(json.dumps(out, indent=2))


@app.command()
def consistency(
    old: int = typer.Argument(..., help="older tree size"),
    new: int = typer.Argument(..., help="newer tree size"),
    config: Path | None = ConfigOption,
) -> None:
    """Consistency proof between tree sizes OLD and NEW as JSON (verified first)."""
    from audit import merkle
    from audit.ledger import LedgerError

    _settings, svc = _service(config)
    try:
        proof = svc.ledger.consistency_proof(old, new)
        r1, r2 = svc.ledger.root(old), svc.ledger.root(new)
        merkle.verify_consistency(old, new, r1, r2, proof)
    except (LedgerError, merkle.InvalidProof) as exc:
        fail(str(exc))
        return
    print(json.dumps({"old_size": old, "new_size": new, "old_root": r1.hex(), "new_root": r2.hex(),
                      "proof": [p.hex() for p in proof]}, indent=2))


QUERY_COLS = [Col("seq", "seq", align="right"), Col("time", "time"), Col("type", "type"),
              Col("actor", "actor", "uid"), Col("outcome", "outcome"),
              Col("subject", "subject", "uid")]


@app.command()
def query(
    config: Path | None = ConfigOption,
    study: str | None = typer.Option(None, "--study", help="Study Instance UID"),
    series: str | None = typer.Option(None, "--series", help="Series Instance UID"),
    sop: str | None = typer.Option(None, "--sop", help="SOP Instance UID"),
    uid: list[str] = typer.Option([], "--uid", help="any indexed UID / id (job id, model id, ...)"),
    event_type: list[str] = typer.Option([], "--type", help="event type, e.g. instance.received"),
    actor: str | None = typer.Option(None, "--actor", help="exact actor, e.g. ae:CT01"),
    since: datetime | None = time_option("--since", "from this time on"),
    until: datetime | None = time_option("--until", "before this time"),
    limit: int | None = typer.Option(None, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
    wide: bool = typer.Option(False, "--wide", help="one line per entry, never folded"),
) -> None:
    """Entries matching all filters (UIDs: any of them), oldest first."""
    from audit.events import EventType
    from audit.export import event_json

    _settings, svc = _service(config)
    uids = [u for u in (study, series, sop, *uid) if u]
    try:
        types = [EventType(t).value for t in event_type]
    except ValueError as exc:
        fail(f"{exc}; known: {', '.join(t.value for t in EventType)}", 2)
        return
    rows = svc.ledger.query(uids=uids, event_types=types, actor=actor, since=since,
                            until=until, limit=limit)
    if as_json:
        for r in rows:
            print(json.dumps(event_json(r), sort_keys=True))
        return
    table = []
    for r in rows:
        j = event_json(r)
        table.append({**j, "subject": " ".join(f"{k}={v}" for k, v in j["subject"].items())})
    emit(QUERY_COLS, table, wide=wide, footer=f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}")


@app.command()
def lineage(
    uid: str = typer.Argument(..., help="study / series / SOP UID, or job id"),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Source series -> engine jobs (task, model) -> output series -> destinations, for
    everything the ledger links to UID (--json: the same as a JSON object)."""
    from audit.export import lineage as build

    _settings, svc = _service(config)
    tree = build(svc.ledger, uid)
    if as_json:
        print(json.dumps(tree, indent=2))
        return
    if not tree["entries"]:
        fail(f"no ledger entry mentions {uid}")
    # a terminal gets the tree at its width; a pipe or file gets one line per node, unwrapped
    # (UIDs and digests stay whole for grep)
    out = console if console.is_terminal else Console(width=100_000, highlight=False)
    out.print(lineage_tree(tree))


@app.command()
def patient(
    patient_id: str | None = typer.Argument(None, help="Patient ID (0010,0020)"),
    issuer: str | None = typer.Option(
        None, "--issuer", help="Issuer of Patient ID (default: every issuer the index knows "
                               "for this ID, and none)"),
    accession: str | None = typer.Option(
        None, "--accession", help="search by Accession Number instead of Patient ID"),
    key: Path | None = typer.Option(
        None, "--key", help="patient digest key (default: the node's [audit] patient_key_file;"
                            " an auditor's copy works offline)"),
    proof: bool = typer.Option(False, "--proof", help="an inclusion proof of every entry "
                                                      "shown, verified against the latest "
                                                      "signed checkpoint"),
    as_json: bool = typer.Option(False, "--json", help="the report as one JSON object"),
    record: bool = typer.Option(True, "--record/--no-record",
                                help="append an audit.queried event (the search is itself "
                                     "audited)"),
    config: Path | None = ConfigOption,
) -> None:
    """Everything the ledger holds about one patient: every study received, every synthetic
    series derived from it (task, model, version, weights digest), every destination and
    delivery, and every retrieval (C-GET, C-MOVE, WADO) and query, each with its ledger
    entry number. The ledger holds keyed digests, not Patient IDs: the ID given here is
    digested with the node's key and searched for."""
    from audit.events import Event, EventType
    from audit.patient import patient_report, read_patient_key

    if (patient_id is None) == (accession is None):
        fail("give a PATIENT_ID or --accession (one of them)", 2)
    settings, svc = _service(config)
    try:
        digester = read_patient_key(key or settings.patient_key_file)
    except (OSError, ValueError) as exc:
        fail(str(exc))
        return
    issuers = _issuers(svc.ledger.engine, patient_id, issuer) if patient_id else []
    digests = ([d for i in issuers if (d := digester.patient(patient_id, i))] if patient_id
               else [d for d in [digester.accession(accession)] if d])
    report = patient_report(svc.ledger, digests)
    who = ({"patient_id": patient_id, "issuers": issuers} if patient_id
           else {"accession": accession})
    report = {**who, **report}
    if record:
        svc.ledger.append(Event(
            EventType.AUDIT_QUERIED, _user(),
            subject={("patient" if patient_id else "accession"): digests[0]} if digests else {},
            payload={"query": "patient" if patient_id else "accession",
                     "entries": len(report["entries"]),
                     **({"patients": digests} if len(digests) > 1 else {})}))
    if proof:
        from audit.export import inclusion_proofs

        report["proofs"] = inclusion_proofs(svc.ledger, report["entries"])
    if as_json:
        print(json.dumps(report, indent=1))
        return
    _print_patient(report)


def _user() -> str:
    import getpass

    try:
        return f"user:{getpass.getuser()}"
    except Exception:
        return "user:cli"


def _issuers(engine: Any, patient_id: str, issuer: str | None) -> list[str]:
    """The issuers to digest ``patient_id`` with: the given one, else those the index holds
    for the ID plus none."""
    if issuer is not None:
        return [issuer]
    from storage.query import patient_studies

    with engine.connect() as conn:
        known = sorted({i for i, _ in patient_studies(conn, patient_id)})
    return list(dict.fromkeys(["", *known]))


def _print_patient(report: dict[str, Any]) -> None:
    out = console if console.is_terminal else Console(width=100_000, highlight=False)
    who = (f"patient {report['patient_id']}"
           + (f" (issuers: {', '.join(i or 'none' for i in report['issuers'])})"
              if any(report["issuers"]) else "")
           if "patient_id" in report else f"accession {report['accession']}")
    studies = report["studies"]
    outputs = sum(len(j["outputs"]) for s in studies for j in s["lineage"]["jobs"])
    out.print(escape(f"{who}: {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, "
                     f"{outputs} synthetic series, {len(report['accesses'])} other access(es); "
                     f"{len(report['entries'])} ledger entries"))
    if not report["entries"]:
        out.print("no ledger entry refers to this patient (check the ID, --issuer, and that "
                  "the patient digest key is the node's)")
    for s in studies:
        out.print(lineage_tree(s["lineage"]))
    if report["accesses"]:
        tree = Tree("queries, retrievals and audit searches")
        for a in report["accesses"]:
            extra = "".join(f", {k} {a[k]}" for k in ("level", "matches", "entries")
                            if a.get(k) is not None)
            tree.add(retrieval_text(a) + escape(extra))
        out.print(tree)
    for r in report["rejected"]:
        out.print(escape(f"#{r['seq']} instance rejected {r['time']} from {r['actor']}: "
                         f"{r['reason']} ({r.get('detail') or ''})"))
    if "proofs" in report:
        p = report["proofs"]
        signed = sum(1 for e in p["entries"].values() if e["signed"])
        cp = p["checkpoint"]
        parts = [f"{signed} against the signed checkpoint of size {cp['tree_size']} (root "
                 f"{cp['root_hash']})"] if cp and signed else []
        if signed < len(p["entries"]):
            parts.append(f"{len(p['entries']) - signed} against the current tree (not yet in a "
                         "signed checkpoint: run `synthnode audit checkpoint`)")
        out.print(escape(f"inclusion proofs: {len(p['entries'])} entries verified, "
                         + ", ".join(parts) + "; --json prints every proof"))


class ExportFormat(str, Enum):
    jsonl = "jsonl"
    dicom = "dicom"
    fhir = "fhir"


@app.command()
def export(
    config: Path | None = ConfigOption,
    fmt: ExportFormat = typer.Option(
        ExportFormat.jsonl,
        "--format",
        "-f",
        help="jsonl (every entry decoded, with its leaf bytes: `python -m audit.verify "
        "--export` checks it), dicom (PS3.15 A.5 XML, one message per line), fhir (R4 "
        "Bundle of AuditEvent + Provenance)",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="output file (default stdout)"),
    uid: list[str] = typer.Option(
        [], "--uid", help="only entries mentioning these UIDs (dicom/fhir)"
    ),
    event_type: list[str] = typer.Option([], "--type", help="only these event types (dicom/fhir)"),
    since: datetime | None = time_option("--since", "from this time on (dicom/fhir)"),
    until: datetime | None = time_option("--until", "before this time (dicom/fhir)"),
    syslog: str | None = typer.Option(
        None,
        "--syslog",
        help="with -f dicom: also send each message to udp://host:port or tcp://host:port "
        "(RFC 5424) once; the continuous TLS feed is [audit.syslog]",
    ),
    patient_ids: str = typer.Option(
        "resolve", "--patient-ids",
        help="dicom: Patient participant from the index (resolve) or the ledger's digest"),
) -> None:
    """Export the ledger."""
    from audit.export import (
        export_ledger,
        write_dicom_audit,
        write_fhir_bundle,
        write_path,
    )
    from node.atna import AuditRenderer

    if syslog and fmt != ExportFormat.dicom:
        fail(f"--syslog sends DICOM audit messages: use it with -f dicom, not -f {fmt.value}", 2)
    if fmt == ExportFormat.jsonl and (uid or event_type or since or until):
        fail("a jsonl export is the whole ledger (for verification); filter with -f dicom / "
             "fhir or `audit query --json`", 2)
    if patient_ids not in ("resolve", "digest"):
        fail("--patient-ids is resolve or digest", 2)
    settings, svc = _service(config)
    fh = write_path(out)
    try:
        if fmt == ExportFormat.jsonl:
            n = export_ledger(svc.ledger, fh, origin=settings.audit.origin)
        else:
            if uid or event_type or since or until:
                rows = svc.ledger.query(uids=uid, event_types=event_type, since=since,
                                        until=until)
            else:
                rows = svc.ledger.entries()
            if fmt == ExportFormat.dicom:
                render = AuditRenderer.from_settings(settings, svc.ledger.engine,
                                                      resolve=patient_ids == "resolve").xml
                if syslog:
                    rows = _tee_syslog(list(rows), syslog, render)
                n = write_dicom_audit(rows, fh, render=render)
            else:
                n = write_fhir_bundle(rows, fh)
    finally:
        if fh is not sys.stdout:
            fh.close()
    print(f"exported {n} record(s)", file=sys.stderr)


def _tee_syslog(rows: list[Any], target: str, render: Any) -> list[Any]:
    """Send one RFC 5424 message per DICOM audit message (MSGID ``IHE+RFC-3881``)."""
    from audit.checkpoint import syslog_send

    for r in rows:
        syslog_send(target, render(r), msgid="IHE+RFC-3881")
    return rows


@app.command()
def pubkey(
    config: Path | None = ConfigOption,
    pem: bool = typer.Option(
        False, "--pem", help="PEM SubjectPublicKeyInfo instead of the note verifier key"
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="write to a file"),
) -> None:
    """The checkpoint verifier key (generated with the node key on first use)."""
    from cryptography.hazmat.primitives import serialization

    _settings, svc = _service(config)
    v = svc.verifier
    text = (
        v.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        if pem
        else v.vkey() + "\n"
    )
    if out:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


@app.command()
def checkpoint(
    config: Path | None = ConfigOption,
    force: bool = typer.Option(
        False, "--force", help="sign even if only a checkpoint event is new"
    ),
) -> None:
    """Sign a checkpoint of the current tree (database + checkpoint file + syslog)."""
    from audit.ledger import LedgerError

    _settings, svc = _service(config)
    try:
        cp = svc.checkpoint(force=force)
    except LedgerError as exc:
        fail(str(exc))
        return
    if cp is None:
        print("nothing new to sign", file=sys.stderr)
        return
    sys.stdout.write(cp.note)
