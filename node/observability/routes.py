"""Operations endpoints on the node's HTTP application: ``/healthz``, ``/readyz`` and
``/metrics``, and the middleware that counts HTTP requests by route and status.

``/healthz`` and ``/readyz`` need no token (load balancers and orchestrators probe them;
they name no patient data). ``/metrics`` needs the ``audit`` scope (Prometheus sends it as
``authorization: {credentials: TOKEN}``) unless ``dicomweb.anonymous_scopes`` grants it.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.observability.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from node.dicomweb.auth import TokenStore
    from node.observability.health import Observability

__all__ = ["HttpMetricsMiddleware", "add_operations"]


def add_operations(app: FastAPI, obs: Observability, tokens: TokenStore) -> None:
    """Add the operations routes and the HTTP metrics middleware to ``app``."""
    app.add_middleware(HttpMetricsMiddleware, obs=obs)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "uptime_s": round(time.time() - obs.started, 1)})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok, checks, measured = await run_in_threadpool(obs.ready)
        return JSONResponse({"status": "ready" if ok else "not ready", "measured": measured,
                             "checks": [c.as_dict() for c in checks]},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        tokens.require(request, "audit")
        body = await run_in_threadpool(obs.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)


class HttpMetricsMiddleware:
    """Counts each HTTP request by its route template (``/studies/{study}``, never the
    UIDs), method and status, and times it until the response starts."""

    def __init__(self, app: ASGIApp, obs: Observability) -> None:
        self.app = app
        self.obs = obs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]
        seen = [False]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and not seen[0]:
                seen[0] = True
                status[0] = int(message["status"])
                self._observe(scope, status[0], time.perf_counter() - t0)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not seen[0]:
                self._observe(scope, status[0], time.perf_counter() - t0)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        path = getattr(route, "path", None) or getattr(route, "path_format", None)
        if path is None:
            path = "/viewer" if str(scope.get("path", "")).startswith("/viewer") else "unmatched"
        self.obs.metrics.observe_http(str(path), str(scope.get("method", "")), status, seconds)
