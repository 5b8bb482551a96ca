"""The OHIF viewer at ``/viewer/``: its built ``dist/`` (npm ``@ohif/app``, fetched by
``scripts/setup``) served from the node's origin, ``app-config.js`` generated to use this
node's DICOMweb root.

The published ``dist/`` is built for the server root (``window.PUBLIC_URL="/"``, absolute
``/...`` asset paths); ``index.html`` is rewritten on the fly to live under ``/viewer/``, and
the chunks the bundle loads from the root are served there too.

Sign-in: the viewer's requests carry ``Authorization: Bearer``. The console's sign-in
(``/console/login``) also sets the token as an ``HttpOnly``, ``SameSite=Strict`` cookie scoped
to ``/viewer`` when it has the ``read`` scope; ``app-config.js`` (a same-origin script, sent
with that cookie) then hands the token to OHIF's user authentication service, which puts
it on every QIDO-RS / WADO-RS request (study list, metadata, images). Without a valid
cookie, and when anonymous reads are not allowed, ``app-config.js`` sends the browser to
the sign-in page and back. The DICOMweb routes themselves never accept the cookie (no
cross-site request can borrow it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from node.dicomweb.auth import Problem, TokenStore
from node.dicomweb.dicomjson import base_url

__all__ = ["COOKIE", "PREFIX", "app_config", "mount_viewer", "rewrite_index", "sign_in_script",
           "viewer_token"]

PREFIX = "/viewer/"
#: the viewer's copy of the signed-in token (set by the console's sign-in)
COOKIE = "synthnode_viewer"
LOGIN = "/console/login"
#: the version scripts/setup fetches (npm registry)
OHIF_VERSION = "3.13.2"

_ABS = re.compile(r'((?:href|src)=")/(?!/)')


def app_config(root: str, token: str | None = None) -> str:
    """OHIF 3 configuration reading from the DICOMweb root ``root``; with ``token``, every
    request of the viewer carries it as a bearer token.

    OHIF 3.13 accepts ``window.config`` as a function of its services manager; the
    data source's ``onConfiguration`` hook (called before its first request, by the study
    list as by the viewer) installs ``getAuthorizationHeader`` on the
    ``userAuthenticationService`` that the data source and the image loader ask."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "synthnode",
        "configuration": {
            "friendlyName": "synthnode", "name": "synthnode",
            "wadoUriRoot": root, "qidoRoot": root, "wadoRoot": root,
            "qidoSupportsIncludeField": True, "supportsReject": False,
            "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False,
            "supportsWildcard": True, "staticWado": False, "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    cfg = {"routerBasename": PREFIX.rstrip("/"), "showStudyList": True,
           "extensions": [], "modes": [], "showWarningMessageForCrossOrigin": False,
           "showLoadingIndicator": True, "strictZSpacingForVolumeViewport": True,
           "dataSources": [source], "defaultDataSourceName": "synthnode"}
    if token is None:
        return "window.config = " + json.dumps(cfg, indent=2) + ";\n"
    return f"""window.config = function ({{ servicesManager }}) {{
  const config = {json.dumps(cfg, indent=2)};
  const authorization = {{ Authorization: {json.dumps("Bearer " + token)} }};
  const install = () => servicesManager.services.userAuthenticationService
    .setServiceImplementation({{ getAuthorizationHeader: () => authorization }});
  for (const source of config.dataSources) {{
    source.configuration.onConfiguration = (configuration) => {{
      install();
      return configuration;
    }};
  }}
  return config;
}};
"""


def sign_in_script() -> str:
    """``app-config.js`` for a browser not signed in: off to the sign-in page, then back."""
    return (f"window.location.replace({json.dumps(LOGIN + '?next=')} + "
            "encodeURIComponent(window.location.pathname + window.location.search));\n")


def viewer_token(tokens: TokenStore, request: Request) -> str | None:
    """The viewer cookie's token when it is valid and has the ``read`` scope."""
    token = (request.cookies.get(COOKIE) or "").strip()
    if not token:
        return None
    probe = Request({**request.scope, "headers": [
        (b"authorization", f"Bearer {token}".encode())]})
    try:
        return token if tokens.principal(probe).allows("read") else None
    except Problem:
        return None


def rewrite_index(html: str) -> str:
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}"')
    return _ABS.sub(rf"\g<1>{PREFIX}", html)


def mount_viewer(app: FastAPI, dist: Path, tokens: TokenStore) -> None:
    root = dist.resolve()
    index = rewrite_index((root / "index.html").read_text(encoding="utf-8"))

    @app.get("/viewer")
    def viewer_root() -> HTMLResponse:
        return HTMLResponse(index)

    @app.get("/viewer/app-config.js")
    def config_js(request: Request) -> Response:
        headers = {"Cache-Control": "no-store"}
        token = viewer_token(tokens, request)
        if token is None and "read" not in tokens.anonymous:
            body = sign_in_script()
        else:
            body = app_config(base_url(request), token)
        return Response(body, media_type="application/javascript", headers=headers)

    @app.get("/viewer/{path:path}")
    def files(path: str) -> Response:
        p = (root / path).resolve()
        if path and root in p.parents and p.is_file() and p.name != "index.html":
            return FileResponse(p)
        return HTMLResponse(index)  # client-side routes (/viewer/viewer?StudyInstanceUIDs=)

    # The bundle loads its lazy chunks, CSS, WebAssembly and assets from the server root
    # (webpack's publicPath is fixed at build time): serve the dist files found there.
    # Registered last, so no DICOMweb route is shadowed.
    @app.get("/{path:path}", include_in_schema=False)
    def root_files(path: str) -> Response:
        p = (root / path).resolve()
        if path and root in p.parents and p.is_file():
            return FileResponse(p)
        return Response(status_code=404)
