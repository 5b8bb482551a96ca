"""``synthnode audit``: verify, prove, query, trace and export the ledger.

verify       re-derive every hash and root, check checkpoint signatures and the external
             checkpoint file; exit 1 naming the first bad entry
prove        inclusion proof of one entry (RFC 9162 2.1.3) as JSON
consistency  consistency proof between two tree sizes (RFC 9162 2.1.4) as JSON
query        entries by UID, time range, event type, actor (table or JSON lines)
lineage      source instances -> jobs -> outputs -> dispatches of a UID, as a tree
export       verifiable JSON lines, DICOM audit messages (PS3.15 A.5) or FHIR R4 JSON
pubkey       the checkpoint verifier key (for ``python -m audit.verify``)
checkpoint   sign a checkpoint of the current tree now
"""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.tree import Tree

from node.cli.common import ConfigOption, console, fail, settings_from

app = typer.Typer(no_args_is_help=True)


def _service(config: Path | None):  # type: ignore[no-untyped-def]
    from audit.ledger import LedgerError
    from audit.service import open_ledger
    from node.db import make_engine

    settings = settings_from(config)
    try:
        svc = open_ledger(make_engine(settings.database_url), key_file=settings.ledger_key_file,
                          checkpoint_file=settings.checkpoint_file, origin=settings.audit.origin,
                          syslog_target=settings.audit.syslog_target)
    except LedgerError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. tables missing
        fail(f"cannot open the ledger at {settings.database_url}: {exc} (run `synthnode db upgrade`)")
    return settings, svc


@app.command()
def verify(
    config: Path | None = ConfigOption,
    checkpoints: Path | None = typer.Option(None, "--checkpoints", help="external checkpoint file "
                                            "(default: the configured one)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    record: bool = typer.Option(True, "--record/--no-record", help="append a verification.run event"),
    deep: bool = typer.Option(False, "--deep", help="also parse every leaf and check the UID index"),
) -> None:
    """Re-derive every leaf, node and root; check every checkpoint signature and the
    checkpoint file. Exit 1 naming the first bad entry."""
    from audit.events import Event, EventType, Outcome
    from audit.verify import print_report, verify_database

    settings, svc = _service(config)
    report = verify_database(svc.ledger.engine, svc.verifier, checkpoints or settings.checkpoint_file,
                             deep=deep)
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


@app.command()
def query(
    config: Path | None = ConfigOption,
    study: str | None = typer.Option(None, "--study", help="Study Instance UID"),
    series: str | None = typer.Option(None, "--series", help="Series Instance UID"),
    sop: str | None = typer.Option(None, "--sop", help="SOP Instance UID"),
    uid: list[str] = typer.Option([], "--uid", help="any indexed UID / id (job id, model id, ...)"),
    event_type: list[str] = typer.Option([], "--type", help="event type, e.g. instance.received"),
    actor: str | None = typer.Option(None, "--actor", help="exact actor, e.g. ae:CT01"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 / YYYY-MM-DD (UTC)"),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 / YYYY-MM-DD (UTC), exclusive"),
    limit: int | None = typer.Option(None, "--limit"),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table"),
) -> None:
    """Entries matching all filters (UIDs: any of them)."""
    from audit.events import EventType
    from audit.export import event_json, parse_when

    _settings, svc = _service(config)
    uids = [u for u in (study, series, sop, *uid) if u]
    try:
        types = [EventType(t).value for t in event_type]
    except ValueError as exc:
        fail(f"{exc}; known: {', '.join(t.value for t in EventType)}")
        return
    rows = svc.ledger.query(uids=uids, event_types=types, actor=actor, since=parse_when(since),
                            until=parse_when(until), limit=limit)
    if as_json:
        for r in rows:
            print(json.dumps(event_json(r), sort_keys=True))
        return
    table = Table("seq", "time", "type", "actor", "outcome", "subject")
    for r in rows:
        j = event_json(r)
        table.add_row(str(j["seq"]), j["time"], j["type"], j["actor"], j["outcome"],
                      " ".join(f"{k}={v}" for k, v in j["subject"].items()))
    console.print(table)


@app.command()
def lineage(
    uid: str = typer.Argument(..., help="study / series / SOP UID, or job id"),
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Source instances -> jobs -> outputs -> dispatches linked to UID."""
    from audit.export import lineage as build

    _settings, svc = _service(config)
    tree = build(svc.ledger, uid)
    if as_json:
        print(json.dumps(tree, indent=2))
        return
    if not tree["entries"]:
        fail(f"no ledger entry mentions {uid}")
    root = Tree(f"[bold]{uid}[/bold] ({len(tree['entries'])} entries)")
    src = root.add("sources")
    for s in tree["sources"]:
        node = src.add(f"series {s['series_uid']} (study {s['study_uid']}) from {s['from']}: "
                       f"{len(s['instances'])} instance(s)")
        for i in s["instances"][:5]:
            node.add(f"#{i['seq']} {i['sop_uid']} sha256 {str(i['sha256'])[:16]}")
        if len(s["instances"]) > 5:
            node.add(f"... {len(s['instances']) - 5} more")
    jobs = root.add("jobs")
    for j in tree["jobs"]:
        jn = jobs.add(f"job {j['job_id']} model {j['model_id']} sources {', '.join(j['source_series_uids'])}")
        for e in j["events"]:
            extra = " ".join(f"{k}={str(e[k])[:16]}" for k in ("weights_sha256", "seed", "device", "error") if k in e)
            jn.add(f"#{e['seq']} {e['type']} {e['time']} {extra}")
        for o in j["outputs"]:
            on = jn.add(f"#{o['seq']} output series {o['series_uid']} ({o['sop_uids']} SOP) "
                        f"watermark {o['watermark_payload']}")
            for d in j["dispatches"]:
                if d["series_uid"] in (None, o["series_uid"]):
                    on.add(f"#{d['seq']} {d['type']} -> {d['destination']}")
    console.print(root)


class ExportFormat(str, Enum):
    jsonl = "jsonl"
    dicom = "dicom"
    fhir = "fhir"


@app.command()
def export(
    config: Path | None = ConfigOption,
    fmt: ExportFormat = typer.Option(ExportFormat.jsonl, "--format", "-f",
                                     help="jsonl (verifiable), dicom (PS3.15 A.5 XML, one message "
                                     "per line), fhir (R4 Bundle of AuditEvent + Provenance)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output file (default stdout)"),
    uid: list[str] = typer.Option([], "--uid", help="only entries mentioning these UIDs (dicom/fhir)"),
    event_type: list[str] = typer.Option([], "--type", help="only these event types (dicom/fhir)"),
    since: str | None = typer.Option(None, "--since"),
    until: str | None = typer.Option(None, "--until"),
    syslog: str | None = typer.Option(None, "--syslog", help="with -f dicom: also send each message "
                                      "to udp://host:port or tcp://host:port (RFC 5424)"),
) -> None:
    """Export the ledger."""
    from audit.export import export_ledger, parse_when, write_dicom_audit, write_fhir_bundle, write_path

    settings, svc = _service(config)
    fh = write_path(out)
    try:
        if fmt == ExportFormat.jsonl:
            n = export_ledger(svc.ledger, fh, origin=settings.audit.origin)
        else:
            if uid or event_type or since or until:
                rows = svc.ledger.query(uids=uid, event_types=event_type, since=parse_when(since),
                                        until=parse_when(until))
            else:
                rows = svc.ledger.entries()
            if fmt == ExportFormat.dicom:
                if syslog:
                    rows = _tee_syslog(list(rows), syslog, settings.dimse.ae_title)
                n = write_dicom_audit(rows, fh, node_ae=settings.dimse.ae_title)
            else:
                n = write_fhir_bundle(rows, fh)
    finally:
        if fh is not sys.stdout:
            fh.close()
    print(f"exported {n} record(s)", file=sys.stderr)


def _tee_syslog(rows: list[Any], target: str, node_ae: str) -> list[Any]:
    """Send one RFC 5424 message per DICOM audit message (MSGID ``IHE+RFC-3881``)."""
    import xml.etree.ElementTree as ET

    from audit.checkpoint import syslog_send
    from audit.export import dicom_audit_message

    for r in rows:
        syslog_send(target, ET.tostring(dicom_audit_message(r, node_ae), encoding="unicode"),
                    msgid="IHE+RFC-3881")
    return rows


@app.command()
def pubkey(
    config: Path | None = ConfigOption,
    pem: bool = typer.Option(False, "--pem", help="PEM SubjectPublicKeyInfo instead of the note verifier key"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write to a file"),
) -> None:
    """The checkpoint verifier key (generated with the node key on first use)."""
    from cryptography.hazmat.primitives import serialization

    _settings, svc = _service(config)
    v = svc.verifier
    text = (v.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            if pem else v.vkey() + "\n")
    if out:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


@app.command()
def checkpoint(
    config: Path | None = ConfigOption,
    force: bool = typer.Option(False, "--force", help="sign even if only a checkpoint event is new"),
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
