"""The DICOMweb HTTP application (FastAPI) and its server (uvicorn in a thread of the
node's process, on the node's :class:`~node.context.NodeContext`).

Routes (PS3.18): STOW-RS ``POST /studies[/{study}]``; QIDO-RS ``GET /studies``,
``/series``, ``/instances`` and below a study / series; WADO-RS instances, metadata,
frames, bulk data, rendered and thumbnail; ``/viewer/`` (OHIF, when installed); the
console under ``/console/`` and ``/healthz``, ``/readyz``, ``/metrics`` (docs/console.md).
Scopes: store (STOW), read (QIDO / WADO / viewer). Errors are problem+json.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from node.context import NodeContext
from node.dicomweb import qido, rendered, stow, wado
from node.dicomweb.access import AccessRecorder
from node.dicomweb.auth import Principal, Problem, TokenStore, problem_response
from node.dicomweb.dicomjson import base_url
from node.dicomweb.media import (
    DICOM,
    DICOM_JSON,
    OCTET,
    boundary,
    coalesce,
    multipart_body,
    multipart_content_type,
)
from node.ingest.ingestor import Ingestor
from storage.matching import QueryLevel

__all__ = ["DicomwebServer", "create_app"]

log = logging.getLogger(__name__)

#: bytes per write of a streamed stored body (what a loopback socket buffer takes at once)
WRITE = 1 << 20


class _Service:
    """What every route needs: context, tokens, ingest, access recorder."""

    def __init__(self, ctx: NodeContext, recorder: AccessRecorder):
        self.ctx = ctx
        self.tokens = TokenStore(ctx.settings.dicomweb)
        self.ingestor = Ingestor(ctx)
        self.recorder = recorder
        self.metadata = wado.MetadataCache(ctx.metadata_documents())

    def read(self, request: Request) -> Principal:
        return self.tokens.require(request, "read")

    def wado_record(self, who: Principal, kind: str, request: Request, sel: wado.Selection,
                    count: int, status: int = 200, extra: dict[str, Any] | None = None) -> None:
        self.recorder.record(actor=who.actor, service="WADO-RS", kind=kind,
                             path=request.url.path, address=who.address, studies=sel.studies,
                             series=sel.series, sops=sel.sops[:count] if count else [],
                             count=count, status=status, extra=extra)


def _multipart(parts: Iterator[tuple[str, Iterator[bytes]]], part_type: str,
               done: Callable[[], None]) -> StreamingResponse:
    bnd = boundary()

    def recorded() -> Iterator[bytes]:
        try:
            yield from multipart_body(bnd, parts)
        finally:
            done()  # before coalesce sends the last bytes: recorded once the client has all

    def body() -> Iterator[bytes]:
        yield from coalesce(recorded())

    return StreamingResponse(body(), media_type=multipart_content_type(part_type, bnd))


def _json(body: Iterator[bytes], headers: dict[str, str] | None) -> Response:
    """A DICOM JSON body: computed here (the route's worker thread) up to its first 64 KiB
    write; a body that ends there (most searches) is sent whole, with a Content-Length,
    the rest of a longer one is streamed. Streaming a short body costs two more
    worker-thread hops (next chunk, end) for nothing."""
    chunks = coalesce(body)
    first = next(chunks, b"")
    rest = next(chunks, None)
    if rest is None:
        return Response(first, media_type=DICOM_JSON, headers=headers)

    def more() -> Iterator[bytes]:
        yield first
        yield rest
        yield from chunks

    return StreamingResponse(more(), media_type=DICOM_JSON, headers=headers)


def _stored(ctx: NodeContext, refs: list[Any], done: Callable[[], None]) -> StreamingResponse:
    """The stored files of ``refs`` as multipart/related: known length, files read in
    blocks of several (one worker-thread hop each), written in pieces the socket takes."""
    bnd = boundary()
    length, blocks = wado.stored_body(ctx, refs, bnd)

    async def body() -> AsyncIterator[memoryview]:
        n = 0
        while (block := await run_in_threadpool(next, blocks, None)) is not None:
            n += len(block)
            if n == length:
                done()  # before the last block: recorded once the client has all
            for i in range(0, len(block), WRITE):
                yield block[i:i + WRITE]

    return StreamingResponse(body(), headers={"Content-Length": str(length)},
                             media_type=multipart_content_type(DICOM, bnd))


def create_app(ctx: NodeContext, recorder: AccessRecorder | None = None) -> FastAPI:
    """The DICOMweb application on ``ctx``."""
    svc = _Service(ctx, recorder or AccessRecorder(ctx))
    app = FastAPI(title="synthnode DICOMweb", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = svc
    cfg = ctx.settings.dicomweb
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Accept", "Content-Type"],
                           expose_headers=["ETag", "Warning", "Content-Location"])

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc)

    _stow_routes(app, svc)
    _qido_routes(app, svc)
    _wado_routes(app, svc)
    _rendered_routes(app, svc)
    if ctx.observability is not None:  # /healthz, /readyz, /metrics; HTTP request metrics
        from node.observability.routes import add_operations

        add_operations(app, ctx.observability, svc.tokens)
    from node.console.routes import add_console

    add_console(app, svc)  # the browser console under /console/
    _viewer_routes(app, svc)  # last: its catch-all serves the bundle's files
    return app


# -- STOW-RS ---------------------------------------------------------------------------
def _stow_routes(app: FastAPI, svc: _Service) -> None:
    async def store(request: Request, study: str | None) -> JSONResponse:
        who = svc.tokens.require(request, "store")
        result = await stow.stow(svc.ctx, svc.ingestor, who, request, study)
        return JSONResponse(result.body(base_url(request), study), status_code=result.status,
                            media_type=DICOM_JSON)

    @app.post("/studies")
    async def stow_all(request: Request) -> JSONResponse:
        return await store(request, None)

    @app.post("/studies/{study}")
    async def stow_study(study: str, request: Request) -> JSONResponse:
        return await store(request, study)


# -- QIDO-RS ---------------------------------------------------------------------------
def _qido_routes(app: FastAPI, svc: _Service) -> None:
    def search(request: Request, level: QueryLevel, path_keys: dict[str, str],
               across: bool) -> Response:
        who = svc.read(request)
        qido.check_accept(request.headers.get("accept"))
        req = qido.parse_qido(level, list(request.query_params.multi_items()), path_keys,
                              across)
        # the path only: query values (a Patient ID ...) stay out of the ledger
        body = qido.search(svc.ctx, svc.recorder, who, req, base_url(request),
                           request.url.path)
        headers = {"Warning": ", ".join(req.warnings)} if req.warnings else None
        return _json(body, headers)

    ST, SE, IM = QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

    @app.get("/studies")
    def studies(request: Request) -> Response:
        return search(request, ST, {}, False)

    @app.get("/series")
    def all_series(request: Request) -> Response:
        return search(request, SE, {}, True)

    @app.get("/instances")
    def all_instances(request: Request) -> Response:
        return search(request, IM, {}, True)

    @app.get("/studies/{study}/series")
    def study_series(study: str, request: Request) -> Response:
        return search(request, SE, {"StudyInstanceUID": study}, False)

    @app.get("/studies/{study}/instances")
    def study_instances(study: str, request: Request) -> Response:
        return search(request, IM, {"StudyInstanceUID": study}, True)

    @app.get("/studies/{study}/series/{series}/instances")
    def series_instances(study: str, series: str, request: Request) -> Response:
        return search(request, IM, {"StudyInstanceUID": study, "SeriesInstanceUID": series},
                      False)


# -- WADO-RS ---------------------------------------------------------------------------
def _wado_routes(app: FastAPI, svc: _Service) -> None:
    ctx = svc.ctx

    def instances(request: Request, study: str, series: str | None = None,
                  sop: str | None = None) -> StreamingResponse:
        who = svc.read(request)
        sel = wado.select_instances(ctx, study, series, sop)
        ts = wado.choose_dicom_ts(request.headers.get("accept"), sel.refs)

        def done() -> None:
            svc.wado_record(who, "instances", request, sel, len(sel.refs),
                            extra={"transfer_syntax": ts})

        if all(ts in ("*", r.transfer_syntax_uid) for r in sel.refs):
            return _stored(ctx, sel.refs, done)
        return _multipart(wado.dicom_parts(ctx, sel.refs, ts), DICOM, done)

    @app.get("/studies/{study}")
    def study(study: str, request: Request) -> StreamingResponse:
        return instances(request, study)

    @app.get("/studies/{study}/series/{series}")
    def series(study: str, series: str, request: Request) -> StreamingResponse:
        return instances(request, study, series)

    @app.get("/studies/{study}/series/{series}/instances/{sop}")
    def instance(study: str, series: str, sop: str, request: Request) -> StreamingResponse:
        return instances(request, study, series, sop)

    def metadata(request: Request, study: str, series: str | None = None,
                 sop: str | None = None) -> Response:
        who = svc.read(request)
        qido.check_accept(request.headers.get("accept"))
        sel = wado.select_instances(ctx, study, series, sop)
        base = base_url(request)
        etag = wado.metadata_etag(sel.refs, base)
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        inm = request.headers.get("if-none-match")
        if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            svc.wado_record(who, "metadata", request, sel, 0, status=304)
            return Response(status_code=304, headers=headers)
        body = wado.metadata_stream(ctx, sel.refs, base, lambda n: svc.wado_record(
            who, "metadata", request, sel, n), svc.metadata)
        return _json(body, headers)

    @app.get("/studies/{study}/metadata")
    def study_md(study: str, request: Request) -> Response:
        return metadata(request, study)

    @app.get("/studies/{study}/series/{series}/metadata")
    def series_md(study: str, series: str, request: Request) -> Response:
        return metadata(request, study, series)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
    def instance_md(study: str, series: str, sop: str, request: Request) -> Response:
        return metadata(request, study, series, sop)

    @app.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
    def frames(study: str, series: str, sop: str, frames: str,
               request: Request) -> StreamingResponse:
        who = svc.read(request)
        numbers = wado.parse_frames(frames)
        sel = wado.select_instances(ctx, study, series, sop)
        parts, media = wado.frames_parts(ctx, sel.refs[0], numbers,
                                         request.headers.get("accept"))
        return _multipart(((ct, iter([b])) for ct, b in parts), media,
                          lambda: svc.wado_record(who, "frames", request, sel, 1,
                                                  extra={"frames": numbers[:100]}))

    @app.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}")
    def bulk(study: str, series: str, sop: str, tag: str,
             request: Request) -> StreamingResponse:
        who = svc.read(request)
        if wado.octet_acceptable(request.headers.get("accept")) is None:
            raise Problem(406, "Not Acceptable", "bulk data is application/octet-stream")
        sel = wado.select_instances(ctx, study, series, sop)
        value, ts = wado.bulkdata(ctx, sel.refs[0], tag)
        return _multipart(iter([(f"{OCTET}; transfer-syntax={ts}", iter([value]))]), OCTET,
                          lambda: svc.wado_record(who, "bulkdata", request, sel, 1,
                                                  extra={"tag": tag.upper()}))


# -- rendered / thumbnail --------------------------------------------------------------
def _rendered_routes(app: FastAPI, svc: _Service) -> None:
    ctx = svc.ctx

    async def render(request: Request, kind: str, study: str, series: str | None = None,
                     sop: str | None = None, frame: int = 1) -> Response:
        who = svc.read(request)
        media = rendered.choose_image_type(request.headers.get("accept"))
        q = request.query_params
        params = rendered.RenderParams(q.get("window"), q.get("viewport"), q.get("quality"),
                                       thumbnail=kind == "thumbnail")
        sel = await run_in_threadpool(wado.select_instances, ctx, study, series, sop)
        ref = rendered.representative(sel.refs)
        data = await run_in_threadpool(rendered.render, ctx, ref, frame, params, media)
        svc.wado_record(who, kind, request, wado.Selection([ref]), 1,
                        extra={"frame": frame})
        return Response(data, media_type=media)

    for kind in ("rendered", "thumbnail"):
        _add_render(app, render, kind)


def _add_render(app: FastAPI, render: Any, kind: str) -> None:
    @app.get(f"/studies/{{study}}/{kind}")
    async def r_study(study: str, request: Request) -> Response:
        return await render(request, kind, study)  # type: ignore[no-any-return]

    @app.get(f"/studies/{{study}}/series/{{series}}/{kind}")
    async def r_series(study: str, series: str, request: Request) -> Response:
        return await render(request, kind, study, series)  # type: ignore[no-any-return]

    @app.get(f"/studies/{{study}}/series/{{series}}/instances/{{sop}}/{kind}")
    async def r_instance(study: str, series: str, sop: str, request: Request) -> Response:
        return await render(request, kind, study, series, sop)  # type: ignore[no-any-return]

    @app.get(f"/studies/{{study}}/series/{{series}}/instances/{{sop}}/frames/{{frame}}/{kind}")
    async def r_frame(study: str, series: str, sop: str, frame: int,
                      request: Request) -> Response:
        return await render(request, kind, study, series, sop,  # type: ignore[no-any-return]
                            frame)


# -- viewer ----------------------------------------------------------------------------
def viewer_dir(ctx: NodeContext) -> Path | None:
    """The built viewer: ``dicomweb.viewer_dir``, else ``<data_dir>/viewer``, else the user
    data folder's ``viewer`` (where scripts/setup puts it); None when absent."""
    from config.settings import user_data_dir

    cfg = ctx.settings.dicomweb.viewer_dir
    for d in ([cfg] if cfg else [ctx.settings.data_dir / "viewer", user_data_dir() / "viewer"]):
        if (d / "index.html").is_file():
            return d
    return None


def _viewer_routes(app: FastAPI, svc: _Service) -> None:
    from node.dicomweb.viewer import mount_viewer

    d = viewer_dir(svc.ctx)
    if d is not None:
        mount_viewer(app, d, svc.tokens)


# -- server ----------------------------------------------------------------------------
class _Activity:
    """ASGI wrapper telling the metadata warmer when HTTP requests run."""

    def __init__(self, app: Any, warmer: wado.MetadataWarmer):
        self.app, self.warmer = app, warmer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.warmer.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.warmer.request_ended()


class DicomwebServer:
    """uvicorn serving :func:`create_app` in a background thread (same process, same
    context as the DIMSE server)."""

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        cfg = ctx.settings.dicomweb
        self.recorder = AccessRecorder(ctx, cfg.access_flush_s)
        self.app = create_app(ctx, self.recorder)
        self.warmer = (wado.MetadataWarmer(ctx, self.app.state.service.metadata)
                       if cfg.metadata_warm else None)
        self.asgi: Any = self.app if self.warmer is None else _Activity(self.app, self.warmer)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("DICOMweb server not started")
        return self._address

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self.ctx.settings.dicomweb.tls_cert_file else "http"
        return f"{scheme}://{host}:{port}"

    def start(self) -> tuple[str, int]:
        import uvicorn

        cfg = self.ctx.settings.dicomweb
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.bind_address else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # inherited by accepted connections (Linux): a streamed body's last small write is
        # not held back by Nagle's algorithm waiting for the client's delayed ACK (40 ms)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((cfg.bind_address, cfg.port))
        sock.listen(128)
        sock.setblocking(False)
        config = uvicorn.Config(
            self.asgi, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=str(cfg.tls_cert_file) if cfg.tls_cert_file else None,
            ssl_keyfile=str(cfg.tls_key_file) if cfg.tls_key_file else None,
            timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._address = (cfg.bind_address, sock.getsockname()[1])
        self.recorder.start()
        if self.warmer is not None:
            self.warmer.start()

        def run() -> None:
            asyncio.run(self._server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=run, name="dicomweb", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        if not self._server.started:
            raise OSError("the DICOMweb server did not start")
        log.info("DICOMweb listening on %s", self.url)
        return self._address

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.warmer is not None:
            self.warmer.stop()
        self.recorder.stop()
