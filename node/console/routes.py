"""Console routes under ``/console/`` (server-rendered with Jinja2).

Sign-in: the login form takes a bearer token and sets it as an ``HttpOnly``,
``SameSite=Strict`` cookie (``Secure`` under TLS) scoped to ``/console``; a request may
instead send ``Authorization: Bearer``. The token's scopes decide what a page shows: ``read``
for the dashboard, studies and jobs, ``audit`` for the audit and models pages, ``admin``
for retry / cancel and for release / discard of a held output (each recorded in the ledger
with the token's name and the reason typed; release / discard call the pipeline's own
decision functions, the ones ``synthnode jobs release / discard`` call).
Forms that change state also check that ``Origin`` (when sent) is this server.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Form, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from audit.events import Event, EventType, Outcome
from node.console import data
from node.console.verification import Verifications
from node.dicomweb import viewer
from node.dicomweb.auth import Principal, Problem

__all__ = ["add_console"]

COOKIE = "synthnode_console"
PREFIX = "/console"
_TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class _Console:
    """What every console route needs: the service, sign-in, templates."""

    def __init__(self, app: FastAPI, svc: Any):
        self.app = app
        self.svc = svc
        self.ctx = svc.ctx
        self.tls = bool(self.ctx.settings.dicomweb.tls_cert_file)
        self.verifications = Verifications(self.ctx)

    def who(self, request: Request, scope: str) -> Principal:
        cookie = request.cookies.get(COOKIE)
        if cookie and not request.headers.get("authorization"):
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
            headers.append((b"authorization", f"Bearer {cookie}".encode()))
            request = Request({**request.scope, "headers": headers})
        return self.svc.tokens.require(request, scope)  # type: ignore[no-any-return]

    def page(self, request: Request, name: str, p: Principal | None, status: int = 200,
             **kw: Any) -> HTMLResponse:
        return _TEMPLATES.TemplateResponse(
            request, name, {"who": p, "prefix": PREFIX, "viewer": _has_viewer(self.app),
                            **kw}, status_code=status)

    def guarded(self, request: Request, scope: str) -> Principal | Response:
        """The principal, or the response to send instead: the login page for no /
        an unknown token, an error page for a missing scope."""
        try:
            return self.who(request, scope)
        except Problem as exc:
            if exc.status == 401:
                return RedirectResponse(f"{PREFIX}/login?next={request.url.path}", 303)
            return self.page(request, "error.html", None, status=exc.status,
                             title=exc.title, detail=exc.detail)

    def error(self, request: Request, p: Principal | None, status: int, title: str,
              detail: str) -> HTMLResponse:
        return self.page(request, "error.html", p, status=status, title=title, detail=detail)


def same_origin(request: Request) -> None:
    """Refuse a state-changing form posted from another origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.url.netloc:
        raise Problem(403, "Forbidden", "cross-origin form submission")


def add_console(app: FastAPI, svc: Any) -> None:
    """Mount the console pages on the DICOMweb application's service ``svc``."""
    c = _Console(app, svc)
    app.state.verifications = c.verifications  # the node's verification runs
    _login_routes(app, c)
    _study_routes(app, c)
    _job_routes(app, c)
    _held_routes(app, c)
    _audit_routes(app, c)
    _watermark_routes(app, c)


def _login_routes(app: FastAPI, c: _Console) -> None:
    svc, page, tls = c.svc, c.page, c.tls

    @app.get(PREFIX + "/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = PREFIX + "/") -> HTMLResponse:
        return page(request, "login.html", None, next=_local(next), error="")

    @app.post(PREFIX + "/login")
    def login(request: Request, token: str = Form(...),
              next: str = Form(PREFIX + "/")) -> Response:
        same_origin(request)
        probe = Request({**request.scope, "headers": [
            (b"authorization", f"Bearer {token.strip()}".encode())]})
        try:
            p = svc.tokens.principal(probe)
        except Problem as exc:
            return page(request, "login.html", None, status=401, next=_local(next),
                        error=exc.detail or "unknown token")
        if not p.allows("read") and not p.allows("audit"):
            return page(request, "login.html", None, status=403, next=_local(next),
                        error="this token has neither the read nor the audit scope")
        resp = RedirectResponse(_local(next), 303)
        resp.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", secure=tls,
                        path=PREFIX)
        if p.allows("read"):  # the viewer's copy (node.dicomweb.viewer)
            resp.set_cookie(viewer.COOKIE, token.strip(), httponly=True, samesite="strict",
                            secure=tls, path=viewer.PREFIX.rstrip("/"))
        return resp

    @app.post(PREFIX + "/logout")
    def logout(request: Request) -> Response:
        resp = RedirectResponse(PREFIX + "/login", 303)
        resp.delete_cookie(COOKIE, path=PREFIX)
        resp.delete_cookie(viewer.COOKIE, path=viewer.PREFIX.rstrip("/"))
        return resp

    @app.get(PREFIX, include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(PREFIX + "/", 307)


def _study_routes(app: FastAPI, c: _Console) -> None:
    ctx, svc, page, guarded, who = c.ctx, c.svc, c.page, c.guarded, c.who

    @app.get(PREFIX + "/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> Response:
        p = guarded(request, "read")
        if isinstance(p, Response):
            return p
        info = {"listeners": _listeners(ctx, request)}
        rows = await run_in_threadpool(data.dashboard, ctx, info)
        return page(request, "dashboard.html", p, rows=rows)

    @app.get(PREFIX + "/studies", response_class=HTMLResponse)
    async def studies(request: Request) -> Response:
        p = guarded(request, "read")
        if isinstance(p, Response):
            return p
        form = dict(request.query_params)
        error, rows = "", []
        try:
            rows = await run_in_threadpool(data.studies, ctx, svc.recorder, p, form)
        except Problem as exc:
            error = exc.detail
        return page(request, "studies.html", p, form=form, rows=rows, error=error,
                    fields=data.SEARCH_FIELDS)

    @app.get(PREFIX + "/studies/{study}", response_class=HTMLResponse)
    async def study(study: str, request: Request) -> Response:
        p = guarded(request, "read")
        if isinstance(p, Response):
            return p
        series = await run_in_threadpool(data.series_of, ctx, svc.recorder, p, study)
        if not series:
            return page(request, "error.html", p, status=404, title="Not Found",
                        detail="no such study")
        jobs = _jobs(ctx).list(study_uid=study, limit=200)
        return page(request, "study.html", p, study=study, series=series, jobs=jobs,
                    delivery=data.delivery(jobs), completion=data.completion(ctx, study),
                    rules=sorted({j.rule for j in jobs if j.rule}))

    @app.get(PREFIX + "/thumbnail/{study}/{series}")
    async def thumbnail(study: str, series: str, request: Request) -> Response:
        p = who(request, "read")
        from node.dicomweb import rendered, wado

        sel = await run_in_threadpool(wado.select_instances, ctx, study, series)
        ref = rendered.representative(sel.refs)
        params = rendered.RenderParams(None, None, None, thumbnail=True)
        img = await run_in_threadpool(rendered.render, ctx, ref, 1, params, "image/png")
        svc.wado_record(p, "thumbnail", request, wado.Selection([ref]), 1,
                        extra={"frame": 1, "console": True})
        return Response(img, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})


def _job_routes(app: FastAPI, c: _Console) -> None:
    ctx, page, guarded = c.ctx, c.page, c.guarded

    @app.get(PREFIX + "/jobs", response_class=HTMLResponse)
    def jobs(request: Request, state: str = "", kind: str = "",
             study: str = "") -> Response:
        p = guarded(request, "read")
        if isinstance(p, Response):
            return p
        try:
            rows = _jobs(ctx).list(state=state or None, kind=kind or None,
                                   study_uid=study or None, limit=200)
        except ValueError as exc:
            return page(request, "error.html", p, status=400, title="Bad Request",
                        detail=str(exc))
        return page(request, "jobs.html", p, jobs=rows, state=state, kind=kind, study=study)

    @app.get(PREFIX + "/jobs/{job_id}", response_class=HTMLResponse)
    def job(job_id: str, request: Request, done: str = "") -> Response:
        p = guarded(request, "read")
        if isinstance(p, Response):
            return p
        try:
            j = _jobs(ctx).get(job_id)
        except KeyError:
            return page(request, "error.html", p, status=404, title="Not Found",
                        detail=f"no job {job_id}")
        held_dir = ctx.settings.data_dir / "held" / j.id
        pictures = {int(f.stem) for f in held_dir.glob("*.npz")} if held_dir.is_dir() else set()
        expired = [e.seq for e in ctx.ledger.query(
            uids=[j.id], event_types=[EventType.OUTPUT_PICTURES_EXPIRED.value])] \
            if (j.result or {}).get("held") and not pictures else []
        return page(request, "job.html", p, job=j, done=done, pictures=pictures,
                    pictures_expired=expired,
                    result=json.dumps(j.result, indent=1, default=str) if j.result else "",
                    spec=json.dumps(j.spec, indent=1, default=str))

    @app.post(PREFIX + "/jobs/{job_id}/{action}")
    def job_action(job_id: str, action: str, request: Request,
                   reason: str = Form("")) -> Response:
        same_origin(request)
        p = guarded(request, "admin")
        if isinstance(p, Response):
            return p
        from node.pipeline.jobs import InvalidTransition

        reason = reason.strip()
        if action in ("release", "discard"):
            return _decide(c, request, p, job_id, action, reason)
        if action not in ("retry", "cancel"):
            return page(request, "error.html", p, status=404, title="Not Found",
                        detail=f"no action {action}")
        if not reason:
            return page(request, "error.html", p, status=400, title="Bad Request",
                        detail="a reason is required")
        store = _jobs(ctx)
        try:
            j = store.retry(job_id) if action == "retry" else store.cancel(
                job_id, f"{reason} ({p.actor})")
        except (KeyError, InvalidTransition) as exc:
            return page(request, "error.html", p, status=409, title="Conflict",
                        detail=str(exc).strip("'"))
        # who did it and why: the console's own entry beside the job's state change
        ctx.ledger.append(Event(
            type=EventType.JOB_QUEUED if action == "retry" else EventType.JOB_CANCELLED,
            actor=p.actor, outcome=Outcome.SUCCESS,
            subject=_job_subject(j),
            payload={"kind": j.kind.value, **_job_payload(j), "action": action,
                     "reason": reason, "via": "console", "address": p.address}))
        return RedirectResponse(f"{PREFIX}/jobs/{j.id}?done={action}", 303)


def _held_routes(app: FastAPI, c: _Console) -> None:
    ctx, guarded = c.ctx, c.guarded

    @app.get(PREFIX + "/jobs/{job_id}/held/{index}.png")
    def held_picture(job_id: str, index: int, request: Request) -> Response:
        """input | output | difference of a held output's middle slice
        (:mod:`node.pipeline.preview`); recorded in the ledger as a read
        (``dicomweb.access``, service ``console``)."""
        from node.pipeline.preview import comparison_png, held_slices_path

        p = guarded(request, "read")
        if isinstance(p, Response):
            return p
        try:
            j = _jobs(ctx).get(job_id)
            path = held_slices_path(ctx.settings.data_dir / "held", j.id, index)
        except (KeyError, ValueError):
            return Response(status_code=404)
        if not path.is_file():
            return Response(status_code=404)
        png = comparison_png(path)
        # pixel data of the study: recorded as a read, as thumbnails are
        c.svc.recorder.record(actor=p.actor, service="console", kind="held-picture",
                              path=request.url.path, address=p.address,
                              studies=[j.study_uid or ""], series=[j.series_uid or ""],
                              count=1, extra={"job_id": j.id, "output_index": index})
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})


def _decide(c: _Console, request: Request, p: Principal, job_id: str, action: str,
            reason: str) -> Response:
    """Release / discard a held output through the running pipeline (the functions the
    CLI's ``jobs release`` / ``jobs discard`` call; they record the ledger entry with the
    token's name and the reason, and refuse what may not be decided)."""
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        return c.page(request, "error.html", p, status=409, title="Conflict",
                      detail="the pipeline is not enabled on this node")
    if not reason:
        return c.page(request, "error.html", p, status=400, title="Bad Request",
                      detail="a reason is required")
    try:
        job = pipeline.jobs.get(job_id)
        via = {"via": "console", "address": p.address}
        if action == "release":
            pipeline.release(job.id, by=p.actor, reason=reason, via=via)
        else:
            pipeline.discard(job.id, by=p.actor, reason=reason, via=via)
    except KeyError as exc:
        return c.page(request, "error.html", p, status=404, title="Not Found",
                      detail=str(exc).strip("'"))
    except ValueError as exc:
        return c.page(request, "error.html", p, status=409, title="Conflict",
                      detail=str(exc))
    return RedirectResponse(f"{PREFIX}/jobs/{job.id}?done={action}d", 303)


def _audit_routes(app: FastAPI, c: _Console) -> None:
    ctx, page, guarded, who = c.ctx, c.page, c.guarded, c.who

    @app.get(PREFIX + "/audit", response_class=HTMLResponse)
    def audit(request: Request, uid: str = "", event: str = "", since: str = "",
              until: str = "", limit: int = 200, seq: int | None = None) -> Response:
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        from audit.export import event_json

        error, rows = "", []
        try:
            s, u = _time(since), _time(until)
            types = [EventType(event).value] if event else []
            if seq is not None:  # one entry (the lineage graph links to them)
                if not 0 <= seq < ctx.ledger.size():
                    raise ValueError(f"no ledger entry {seq}")
                found = [ctx.ledger.entry(seq)]
            else:
                found = ctx.ledger.query(uids=[uid.strip()] if uid.strip() else [],
                                         event_types=types, since=s, until=u,
                                         limit=max(1, min(limit, 2000)))
            rows = [event_json(r) for r in found]
        except ValueError as exc:
            error = str(exc)
        return page(request, "audit.html", p, rows=rows, uid=uid, event=event, since=since,
                    until=until, error=error, types=[t.value for t in EventType])

    @app.get(PREFIX + "/audit/lineage", response_class=HTMLResponse)
    def lineage(request: Request, uid: str = "") -> Response:
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        from audit.export import lineage as build
        from node.console.graph import lineage_graph, render_svg

        tree = build(ctx.ledger, uid.strip()) if uid.strip() else None
        svg = render_svg(lineage_graph(tree, PREFIX)) if tree and tree.get("entries") else ""
        return page(request, "lineage.html", p, uid=uid, tree=tree, svg=svg,
                    tree_text=_tree_text(tree) if tree and tree.get("entries") else "",
                    tree_json=json.dumps(tree, indent=1, default=str) if tree else "")

    @app.get(PREFIX + "/audit/export")
    def export(request: Request, uid: str = "", event: str = "",
               format: str = "jsonl") -> Response:
        """The entries found (``jsonl``: decoded events; ``fhir``: an R4 Bundle of
        AuditEvent + Provenance; ``dicom``: PS3.15 A.5 messages, one per line) or the
        whole ledger with its leaf bytes for offline verification (``ledger``)."""
        p = who(request, "audit")
        if format not in _EXPORTS:
            raise Problem(400, "Bad Request", f"format is one of {', '.join(_EXPORTS)}")
        text, n = _export(ctx, format, uid.strip(), event)
        ctx.ledger.append(Event(type=EventType.AUDIT_QUERIED, actor=p.actor,
                                payload={"via": "console", "export": format, "uid": uid,
                                         "event": event, "entries": n}))
        media, ext = _EXPORTS[format]
        return Response(text, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="ledger-{format}.{ext}"'})

    @app.get(PREFIX + "/audit/proof/{seq}")
    def proof(seq: int, request: Request) -> Response:
        """Inclusion proof of one entry (against the latest signed checkpoint when it covers
        the entry), verified before it is sent; as ``synthnode audit prove``."""
        who(request, "audit")

        from audit.export import inclusion_proofs
        from audit.ledger import LedgerError

        if not 0 <= seq < ctx.ledger.size():
            raise Problem(404, "Not Found", f"no ledger entry {seq}")
        try:
            out = inclusion_proofs(ctx.ledger, [seq])
        except LedgerError as exc:
            raise Problem(500, "Internal Server Error", str(exc)) from None
        out["entries"][str(seq)]["leaf_data"] = ctx.ledger.entry(seq).data.decode("utf-8")
        return Response(json.dumps(out, indent=1), media_type="application/json", headers={
            "Content-Disposition": f'attachment; filename="ledger-proof-{seq}.json"'})

    _verify_routes(app, c)

    @app.get(PREFIX + "/models", response_class=HTMLResponse)
    def models(request: Request) -> Response:
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        return page(request, "models.html", p, models=data.model_rows(ctx),
                    uses=data.model_uses(ctx), models_dir=str(ctx.settings.models_dir))



def _verify_routes(app: FastAPI, c: _Console) -> None:
    """Verification of the whole ledger in the background (:mod:`node.console.verification`):
    start (or join the run going on), its page (a progress bar, refreshing itself with or
    without script) and its progress as JSON."""
    page, guarded, who = c.page, c.guarded, c.who

    @app.post(PREFIX + "/audit/verify", response_class=HTMLResponse)
    def verify(request: Request) -> Response:
        """Start verifying the whole ledger in the background (or join the run going on)
        and show its progress page."""
        same_origin(request)
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        try:
            run, _ = c.verifications.start(p.actor, {"via": "console", "address": p.address})
        except RuntimeError as exc:
            return c.error(request, p, 503, "Service Unavailable", str(exc))
        return RedirectResponse(f"{PREFIX}/audit/verify/{run.id}", 303)

    @app.get(PREFIX + "/audit/verify", response_class=HTMLResponse)
    def verify_latest(request: Request) -> Response:
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        latest = c.verifications.latest
        return page(request, "verify.html", p,
                    run=latest.as_dict() if latest is not None else None)

    @app.get(PREFIX + "/audit/verify/{run_id}", response_class=HTMLResponse)
    def verify_run(run_id: str, request: Request) -> Response:
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        run = c.verifications.get(run_id)
        if run is None:
            return c.error(request, p, 404, "Not Found",
                           f"no verification run {run_id} (only the latest is kept)")
        return page(request, "verify.html", p, run=run.as_dict())

    @app.get(PREFIX + "/audit/verify/{run_id}/progress")
    def verify_progress(run_id: str, request: Request) -> Response:
        """The run's phase, entries checked / total, and its result once finished."""
        who(request, "audit")
        run = c.verifications.get(run_id)
        if run is None:
            raise Problem(404, "Not Found", f"no verification run {run_id}")
        return Response(json.dumps(run.as_dict()), media_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _watermark_routes(app: FastAPI, c: _Console) -> None:
    ctx, page, guarded = c.ctx, c.page, c.guarded

    @app.get(PREFIX + "/watermark", response_class=HTMLResponse)
    def watermark_form(request: Request) -> Response:
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        return page(request, "watermark.html", p, result=None)

    @app.post(PREFIX + "/watermark", response_class=HTMLResponse)
    async def watermark_check(request: Request, file: UploadFile) -> Response:
        same_origin(request)
        p = guarded(request, "audit")
        if isinstance(p, Response):
            return p
        from node.console.watermark import check_upload

        body = await file.read(64 * 2**20 + 1)
        if len(body) > 64 * 2**20:
            return c.error(request, p, 413, "Content Too Large", "upload at most 64 MiB")
        result = await run_in_threadpool(check_upload, ctx, file.filename or "", body)
        ctx.ledger.append(Event(
            type=EventType.AUDIT_QUERIED, actor=p.actor,
            payload={"via": "console", "watermark_check": True,
                     "marked": bool(result.get("marked")), "payload": result.get("payload"),
                     "size": len(body)}))
        return page(request, "watermark.html", p, result=result)

_EXPORTS = {"jsonl": ("application/x-ndjson", "jsonl"),
            "ledger": ("application/x-ndjson", "jsonl"),
            "fhir": ("application/fhir+json", "json"),
            "dicom": ("application/xml", "xml")}


def _export(ctx: Any, fmt: str, uid: str, event: str) -> tuple[str, int]:
    """The export text and the number of records (the CLI's ``audit export`` writers)."""
    import io

    from audit.atna import write_dicom_audit
    from audit.export import event_json, export_ledger, write_fhir_bundle
    from node.atna import AuditRenderer

    out = io.StringIO()
    if fmt == "ledger":
        n = export_ledger(ctx.ledger, out, origin=ctx.settings.audit.origin)
        return out.getvalue(), n
    types = [EventType(event).value] if event else []
    rows = ctx.ledger.query(uids=[uid] if uid else [], event_types=types)
    if fmt == "jsonl":
        return "".join(json.dumps(event_json(r), sort_keys=True) + "\n" for r in rows), len(rows)
    if fmt == "fhir":
        n = write_fhir_bundle(rows, out)
        return out.getvalue(), n
    render = AuditRenderer.from_settings(ctx.settings, ctx.ledger.engine, resolve=True).xml
    n = write_dicom_audit(rows, out, render=render)
    return out.getvalue(), n


def _tree_text(tree: dict[str, Any]) -> str:
    """The lineage as ``synthnode audit lineage`` draws it (source series -> jobs, model
    -> outputs -> destinations and attempts), as plain text."""
    import io

    from rich.console import Console

    from node.audit_views import lineage_tree

    con = Console(width=160, record=True, file=io.StringIO(), color_system=None,
                  highlight=False)
    con.print(lineage_tree(tree))
    return con.export_text()


def _job_subject(j: Any) -> dict[str, str]:
    """Subject keys of a job event as the job store writes them (audit.events vocabulary:
    lineage reads them)."""
    out = {"job_id": j.id}
    if j.study_uid:
        out["study_uid"] = j.study_uid
    if j.kind.value == "dispatch" and j.series_uid:
        out["series_uid"] = j.series_uid
    return out


def _job_payload(j: Any) -> dict[str, Any]:
    spec = j.spec if isinstance(j.spec, dict) else {}
    if j.kind.value == "dispatch":
        return {"destination": spec["destination"]} if spec.get("destination") else {}
    return {"source_series_uids": [j.series_uid]} if j.series_uid else {}


def _jobs(ctx: Any) -> Any:
    from node.pipeline.jobs import JobStore

    return JobStore(ctx.engine, ctx.ledger)


def _time(value: str) -> Any:
    from datetime import UTC, datetime

    if not value.strip():
        return None
    t = datetime.fromisoformat(value.strip())
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _local(url: str) -> str:
    """Only a path under the console or the viewer (no open redirect)."""
    ok = url.startswith((PREFIX + "/", viewer.PREFIX)) and "//" not in url and "\\" not in url
    return url if ok else PREFIX + "/"


def _has_viewer(app: FastAPI) -> bool:
    return any(getattr(r, "path", "") == "/viewer" for r in app.routes)


def _listeners(ctx: Any, request: Request) -> list[tuple[str, str]]:
    """DIMSE (AE title and bound address, from its readiness probe) and this server."""
    out = []
    probe = ctx.observability.probes.get("dimse") if ctx.observability else None
    if probe is not None:
        ok, detail = probe()
        out.append(("DIMSE", f"{ctx.settings.dimse.ae_title}@{detail}" if ok else detail))
    out.append(("DICOMweb", str(request.base_url).rstrip("/")))
    return out
