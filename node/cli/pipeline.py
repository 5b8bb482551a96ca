"""``synthnode rules test | jobs list|show|retry|cancel | study complete``."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer

from node.cli.common import ConfigOption, console, fail, open_engine, settings_from
from node.cli.output import Col, PlainOption, WideOption, emit, fmt_time

rules_app = typer.Typer(no_args_is_help=True, help="Routing rules: test them on files.")
jobs_app = typer.Typer(
    no_args_is_help=True,
    help="Engine and dispatch jobs in the node's database (the truth, also with a broker): "
         "list, show, retry, cancel. States: queued, running, succeeded, failed, cancelled.")
study_app = typer.Typer(no_args_is_help=True, help="Study completion.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.add_typer(rules_app, name="rules")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(study_app, name="study")


# -- rules ------------------------------------------------------------------------------


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            out.append(p)
    return out


@rules_app.command("test")
def rules_test(
    files: list[Path] = typer.Argument(..., help="DICOM files or folders (grouped by series)"),
    called_ae: str = typer.Option("SYNTHNODE", "--called-ae", help="as if received on this AE"),
    calling_ae: str = typer.Option("", "--calling-ae", help="as if sent by this AE"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    config: Path | None = ConfigOption,
) -> None:
    """Show which rule routes each series of FILES, and why every rule matched or not."""
    import pydicom

    from node.pipeline.rules import SeriesFacts, check_rules, route

    settings = settings_from(config)
    problems = check_rules(settings.pipeline, settings.models_dir)
    series: dict[str, list[Any]] = defaultdict(list)
    unreadable = []
    for f in _files(files):
        try:
            series[str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)].append(f)
        except Exception as exc:
            unreadable.append((f, str(exc)))
    detect = None
    key_file = settings.watermark_key_file
    if key_file.exists():
        from audit.watermark import WatermarkKey
        from node.dispatch.dispatcher import watermark_check

        detect = watermark_check([WatermarkKey.from_file(key_file)])
    report: list[dict[str, Any]] = []
    for uid, paths in sorted(series.items()):
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        probe = pydicom.dcmread(paths[len(paths) // 2])
        facts = SeriesFacts.from_datasets(headers, called_ae=called_ae,
                                          calling_ae=calling_ae or None)
        if detect is not None and not facts.synthetic and "PixelData" in probe:
            facts = SeriesFacts(facts.header, facts.instances, facts.called_ae,
                                facts.calling_ae, facts.synthetic, detect(probe))
        r = route(settings.pipeline, facts)
        report.append({
            "series_uid": uid,
            "instances": len(paths),
            "modality": str(headers[0].get("Modality", "")),
            "description": str(headers[0].get("SeriesDescription", "")),
            "rule": r.rule.name if r.rule else None,
            "skipped": r.skipped,
            "tasks": [t.task for t in r.rule.tasks] if r.rule else [],
            "destinations": list(r.rule.destinations) if r.rule else [],
            "verdicts": [{"rule": v.rule, "matched": v.matched, "reasons": list(v.reasons)}
                         for v in r.verdicts],
        })
    if as_json:
        console.print_json(json.dumps({"series": report, "problems": problems,
                                       "unreadable": [str(f) for f, _ in unreadable]}))
        return
    for p in problems:
        console.print(f"[yellow]rule problem:[/yellow] {p}")
    for f, why in unreadable:
        console.print(f"[yellow]not DICOM:[/yellow] {f} ({why})")
    for s in report:
        head = f"series {s['series_uid']} ({s['modality']}, {s['instances']} instance(s))"
        if s["rule"]:
            console.print(f"[green]{head} -> rule {s['rule']}[/green]: tasks {s['tasks']}, "
                          f"destinations {s['destinations']}")
        else:
            console.print(f"[red]{head} -> not routed[/red]: {s['skipped'] or 'no rule matched'}")
        for v in s["verdicts"]:
            mark = "match" if v["matched"] else "no"
            console.print(f"    {v['rule']}: {mark}: " + "; ".join(v["reasons"]))
    if not series:
        fail("no DICOM series in the given files")


# -- jobs -------------------------------------------------------------------------------


def _store(config: Path | None):  # type: ignore[no-untyped-def]
    from audit.ledger import Ledger
    from node.pipeline.jobs import JobStore

    settings = settings_from(config)
    engine = open_engine(settings, config)
    return JobStore(engine, Ledger(engine))


def _job_dict(job: Any) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind.value, "state": job.state.value,
        "study_uid": job.study_uid, "series_uid": job.series_uid, "rule": job.rule,
        "task": job.task, "attempts": job.attempts, "max_attempts": job.max_attempts,
        "error": job.error, "result": job.result, "spec": job.spec, "seed": job.seed,
        "parent_id": job.parent_id, "generation": job.generation, "worker": job.worker,
        # SQLite gives naive datetimes (written as UTC), PostgreSQL aware ones: both in UTC
        "created_at": fmt_time(job.created_at) or None,
        "updated_at": fmt_time(job.updated_at) or None,
        "finished_at": fmt_time(job.finished_at) or None,
    }


JOB_COLS = [Col("id", "id"), Col("kind", "kind"), Col("state", "state"),
            Col("outcome", "outcome"),
            Col("task", "task", "text"), Col("rule", "rule", "text"),
            Col("attempts", "tries", align="right"), Col("updated", "updated (UTC)"),
            Col("study_uid", "study", "uid")]


@jobs_app.command("list")
def jobs_list(
    state: str | None = typer.Option(
        None, "--state", help="only jobs in this state: queued, running, succeeded, failed, "
                              "cancelled"),
    study: str | None = typer.Option(None, "--study", help="only jobs of this Study Instance UID"),
    kind: str | None = typer.Option(None, "--kind", help="only engine or dispatch jobs"),
    limit: int = typer.Option(50, "--limit", min=1, help="at most this many (the newest)"),
    as_json: bool = typer.Option(False, "--json", help="every field of each job, as JSON"),
    plain: bool = PlainOption,
    wide: bool = WideOption,
    config: Path | None = ConfigOption,
) -> None:
    """Jobs, newest first: id (first 8 characters; any unique prefix works in show / retry /
    cancel), kind, state, task, rule, attempts used / allowed, last change (UTC) and study;
    the last error of each job follows the table, whole."""
    from node.pipeline.jobs import JobKind, JobState

    try:
        st = JobState(state) if state else None
        kd = JobKind(kind) if kind else None
    except ValueError as exc:
        fail(str(exc), 2)
        return
    jobs = _store(config).list(state=st, study_uid=study, kind=kd, limit=limit)
    if as_json:
        typer.echo(json.dumps([_job_dict(j) for j in jobs], indent=1, default=str))
        return
    rows = [{"id": j.id if plain else j.id[:8], "kind": j.kind.value, "state": j.state.value,
             "outcome": (job_outcome_text(j.result)
                         or ("refused" if (j.error or "").startswith("refused by policy")
                             else "")),
             "checks": _checks_text(j.result),
             "task": j.task or "", "rule": j.rule or "",
             "attempts": f"{j.attempts}/{j.max_attempts}", "updated": fmt_time(j.updated_at),
             "study_uid": j.study_uid or "", "error": j.error or ""} for j in jobs]
    if plain:
        emit([*JOB_COLS, Col("checks", "checks"), Col("error", "error")], rows, plain=True)
        return
    errors = [f"  {r['id']} {r['state']}: {r['error']}" for r in rows if r["error"]]
    held = [f"  {r['id']} {r['outcome']}: {r['checks']}" for r in rows if r["checks"]]
    emit(JOB_COLS, rows, wide=wide, footer="\n".join(
        [f"{len(rows)} job(s)", *(["held / refused outputs (jobs show ID for the reasons; "
                                   "jobs release / jobs discard ID --reason TEXT):", *held]
                                  if held else []),
         *(["last errors:", *errors] if errors else [])]))


def job_outcome_text(result: dict[str, Any] | None) -> str:
    """An engine job's outcome for people: passed, held, refused, or the administrator's
    decision on them (held -> released / discarded)."""
    if not result or "outcome" not in result:
        return ""
    decision = result.get("decision") or {}
    if decision.get("action"):
        return f"{result['outcome']} -> {decision['action']}"
    if result.get("quality_released"):
        return "released"
    return str(result["outcome"])


def _checks_text(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    checks = [c for h in (result.get("held") or []) + (result.get("refused") or [])
              for c in h.get("checks") or []]
    return ", ".join(dict.fromkeys(checks))


@jobs_app.command("show")
def jobs_show(job_id: str = typer.Argument(..., help="job id or a unique prefix"),
              config: Path | None = ConfigOption) -> None:
    """Everything about one job, as JSON: state, attempts, last error, result (an engine
    job's output series and timings, a dispatch job's acknowledged instances), spec, seed,
    worker, parent job (a dispatch job's engine job)."""
    try:
        job = _store(config).get(job_id)
    except KeyError as exc:
        fail(str(exc).strip("'"))
        return
    console.print_json(json.dumps(_job_dict(job), default=str))


@jobs_app.command("retry")
def jobs_retry(job_id: str = typer.Argument(..., help="job id or a unique prefix"),
               config: Path | None = ConfigOption) -> None:
    """Queue a failed or cancelled job again with a fresh attempt budget (attempts back to
    0). The node's workers (or, with a broker, its sweeper) pick it up; an engine job first
    removes any partial output series its earlier attempts left, and a dispatch job never
    re-sends an instance the destination already acknowledged. Queued, running and
    succeeded jobs cannot be retried."""
    from node.pipeline.jobs import InvalidTransition

    store = _store(config)
    try:
        job = store.retry(job_id)
    except (KeyError, InvalidTransition) as exc:
        fail(str(exc).strip("'"))
        return
    console.print(f"job {job.id} queued again")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="job id or a unique prefix"),
                reason: str = typer.Option("cancelled by user", "--reason",
                                           help="recorded as the job's error and in the ledger"),
                config: Path | None = ConfigOption) -> None:
    """Cancel a queued or running job. A running attempt is not interrupted: it runs to its
    end, but its outcome is not recorded and an engine job's outputs are discarded, never
    dispatched. Instances a dispatch job already sent stay sent. `jobs retry` undoes it."""
    from node.pipeline.jobs import InvalidTransition

    store = _store(config)
    try:
        job = store.cancel(job_id, reason)
    except (KeyError, InvalidTransition) as exc:
        fail(str(exc).strip("'"))
        return
    console.print(f"job {job.id} cancelled")


def _decide(action: str, job_id: str, by: str | None, reason: str,
            config: Path | None) -> None:
    import getpass

    from node.app import build_context
    from node.pipeline.orchestrator import Pipeline

    who = by or getpass.getuser()
    settings = settings_from(config)
    open_engine(settings, config).dispose()
    ctx = build_context(settings, migrate=False)
    pipeline = Pipeline.from_context(ctx)
    try:
        job = pipeline.jobs.get(job_id)
        if action == "release":
            new = pipeline.release(job.id, by=who, reason=reason)
            console.print(f"job {job.id}: held output(s) released by {who}; job {new} queued "
                          "(the node's workers build and dispatch them)")
        else:
            removed = pipeline.discard(job.id, by=who, reason=reason)
            console.print(f"job {job.id}: held / refused output(s) discarded by {who}"
                          + (f"; removed series {', '.join(removed)}" if removed else ""))
    except (KeyError, ValueError) as exc:
        fail(str(exc).strip("'"))
    finally:
        pipeline.tracker.shutdown()


@jobs_app.command("release")
def jobs_release(job_id: str = typer.Argument(..., help="job id or a unique prefix"),
                 reason: str = typer.Option(..., "--reason", help="why (recorded in the ledger)"),
                 by: str | None = typer.Option(None, "--by",
                                               help="who decides (default: the login name)"),
                 config: Path | None = ConfigOption) -> None:
    """Release the outputs the quality gate held for an engine job: a new job with the same
    source, parameters and seed builds them anyway (the gate's findings go into its result
    and the output's ledger entry) and dispatches them. Recorded in the ledger
    (output.released) with who and why. Outputs refused for an unverified watermark cannot
    be released."""
    _decide("release", job_id, by, reason, config)


@jobs_app.command("discard")
def jobs_discard(job_id: str = typer.Argument(..., help="job id or a unique prefix"),
                 reason: str = typer.Option(..., "--reason", help="why (recorded in the ledger)"),
                 by: str | None = typer.Option(None, "--by",
                                               help="who decides (default: the login name)"),
                 config: Path | None = ConfigOption) -> None:
    """Discard the held or refused outputs of an engine job: a refused series stored in the
    node is removed; the decision is recorded in the ledger (output.discarded) with who and
    why."""
    _decide("discard", job_id, by, reason, config)


# -- study ------------------------------------------------------------------------------


@study_app.command("complete")
def study_complete(study_uid: str = typer.Argument(..., help="Study Instance UID"),
                   config: Path | None = ConfigOption) -> None:
    """Declare a study complete now: route its series and queue engine jobs (the running
    node's workers pick them up)."""
    from node.app import build_context
    from node.pipeline.orchestrator import Pipeline

    settings = settings_from(config)
    open_engine(settings, config).dispose()  # one line, not a traceback, when not migrated
    ctx = build_context(settings, migrate=False)
    pipeline = Pipeline.from_context(ctx)
    try:
        status = pipeline.tracker.status(study_uid)
        if status is None:
            fail(f"unknown study {study_uid} (no instance received by the pipeline)")
            return
        if not pipeline.complete_study(study_uid, trigger="manual"):
            fail(f"study {study_uid} is already complete (generation {status.generation})")
            return
        queued = pipeline.jobs.list(study_uid=study_uid, state="queued", kind="engine")
        console.print(f"study completed; {len(queued)} engine job(s) queued")
    finally:
        pipeline.tracker.shutdown()


def _pipeline(config: Path | None):  # type: ignore[no-untyped-def]
    from node.app import build_context
    from node.pipeline.orchestrator import Pipeline

    settings = settings_from(config)
    open_engine(settings, config).dispose()  # one line, not a traceback, when not migrated
    return Pipeline.from_context(build_context(settings, migrate=False))


@study_app.command("show")
def study_show(study_uid: str = typer.Argument(..., help="Study Instance UID"),
               as_json: bool = typer.Option(False, "--json", help="as one JSON object"),
               config: Path | None = ConfigOption) -> None:
    """One study as the node sees it: completion, the series received and the rule that
    routes each, engine jobs with their outcome (passed / held / refused, failed checks,
    decisions), output series and, per destination, delivered / queued / refused / failed
    and why."""
    pipeline = _pipeline(config)
    try:
        rep = pipeline.study_report(study_uid)
    except ValueError as exc:
        fail(str(exc))
        return
    finally:
        pipeline.tracker.shutdown()
    if as_json:
        typer.echo(json.dumps(rep, indent=1, default=str))
        return
    out = [f"study {rep['study_uid']}: {rep['state']} (generation {rep['generation']}), "
           f"{rep['instances']} instance(s) received"]
    for s in rep["series"]:
        route_txt = (f"rule {s['rule']}" if s["rule"] else f"not routed: {s['not_routed']}")
        if s.get("held"):
            route_txt = s["held"]  # a hold rule: stored, never processed or sent
        out.append(f"  series {s['series_uid']} {s['modality']} {s['description']!r} "
                   f"{s['instances']} instance(s) -> {route_txt}")
    for j in rep["jobs"]:
        out.append(f"  job {j['job_id'][:8]} {j['task']} on {j['series_uid']}: {j['state']}"
                   + (f", outcome {j['outcome']}" if j["outcome"] else "")
                   + (f" ({j['error']})" if j["error"] else ""))
        for h in j["held"]:
            out.append(f"    held output {h.get('index')}: {', '.join(h.get('checks') or [])}: "
                       + "; ".join(h.get("reasons") or []))
        for r in j["refused"]:
            out.append(f"    refused output {r['series_uid']}: " + "; ".join(r.get("reasons") or
                                                                         r.get("checks") or []))
        if j["decision"]:
            d = j["decision"]
            out.append(f"    {d.get('action')} by {d.get('by')}: {d.get('reason')}")
        for o in j["outputs"]:
            out.append(f"    output {o['series_uid']} ({o['instances']} instance(s))"
                       + (" superseded" if o["superseded"] else ""))
            for dest, st in o["destinations"].items():
                out.append(f"      {dest}: {st['state']}"
                           + (f" ({st['why']})" if st.get("why") else ""))
    for f in rep["forwarded_originals"]:
        out.append(f"  original {f['series_uid']} -> {f['destination']}: {f['state']}")
    typer.echo("\n".join(out))


@study_app.command("reprocess")
def study_reprocess(study_uid: str = typer.Argument(..., help="Study Instance UID"),
                    reason: str = typer.Option(..., "--reason",
                                               help="why (recorded in the ledger)"),
                    by: str | None = typer.Option(None, "--by",
                                                  help="who (default: the login name)"),
                    config: Path | None = ConfigOption) -> None:
    """Route a stored study again with the current rules and models (after fixing a rule
    or approving a model): a new engine job per matching rule and task, also for series
    processed before; outputs replace the earlier ones, and an unchanged job gives the same
    output UIDs (nothing duplicated in PACS). Recorded in the ledger with who and why."""
    import getpass

    pipeline = _pipeline(config)
    try:
        queued = pipeline.reprocess(study_uid, by=by or getpass.getuser(), reason=reason)
    except ValueError as exc:
        fail(str(exc))
        return
    finally:
        pipeline.tracker.shutdown()
    console.print(f"study {study_uid}: {len(queued)} engine job(s) queued "
                  "(the node's workers run them)")
