"""``synthnode ingest``: what the node refused to store, and why (the admin view of the
ingest validation policy, docs/security.md).

refused   refused objects from the ledger (``instance.rejected``): time, sender, reason,
          UIDs, detail; filter by reason (e.g. ``patient_conflict``) and time
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from node.cli.common import ConfigOption, fail, open_engine, settings_from
from node.cli.output import Col, JsonOption, PlainOption, WideOption, emit, fmt_time, time_option

app = typer.Typer(no_args_is_help=True)

REFUSED_COLS = [Col("seq", "seq", align="right"), Col("time", "time"),
                Col("sender", "sender"), Col("reason", "reason"),
                Col("sop_uid", "SOP Instance UID", "uid"),
                Col("study_uid", "Study Instance UID", "uid"), Col("detail", "detail", "text")]


@app.command()
def refused(
    config: Path | None = ConfigOption,
    reason: list[str] = typer.Option([], "--reason",
                                     help="only these reasons, e.g. patient_conflict"),
    since: datetime | None = time_option("--since", "from this time on"),
    limit: int = typer.Option(100, "--limit", min=1, help="newest N"),
    as_json: bool = JsonOption,
    plain: bool = PlainOption,
    wide: bool = WideOption,
) -> None:
    """Objects the node refused (failure status sent, nothing stored), newest last."""
    from audit.ledger import Ledger
    from node.ingest.results import RejectReason

    known = {r.value for r in RejectReason}
    bad = [r for r in reason if r not in known]
    if bad:
        fail(f"unknown reason {', '.join(bad)}; known: {', '.join(sorted(known))}", 2)
    settings = settings_from(config)
    ledger = Ledger(open_engine(settings, config))
    rows = []
    for e in ledger.query(event_types=["instance.rejected"], since=since):
        ev = e.event
        r = str(ev.payload.get("reason", ""))
        if reason and r not in reason:
            continue
        rows.append({"seq": e.seq, "time": fmt_time(ev.time),
                     "sender": ev.payload.get("calling_ae") or ev.actor,
                     "peer": ev.payload.get("peer"), "reason": r,
                     "sop_uid": ev.subject.get("sop_uid", ""),
                     "study_uid": ev.subject.get("study_uid", ""),
                     "detail": ev.payload.get("detail", "")})
    rows = rows[-limit:]
    emit(REFUSED_COLS, rows, as_json=as_json, plain=plain, wide=wide,
         footer=f"{len(rows)} refused")
