"""The OHIF viewer at ``/viewer/``: its built ``dist/`` (npm ``@ohif/app``, fetched by
``scripts/setup``) served from the node's origin, ``app-config.js`` generated to use this
node's DICOMweb root.

The published ``dist/`` is built for the server root (``window.PUBLIC_URL="/"``, absolute
``/...`` asset paths); ``index.html`` is rewritten on the fly to live under ``/viewer/``, and
the chunks the bundle loads from the root are served there too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from node.dicomweb.dicomjson import base_url

__all__ = ["PREFIX", "app_config", "mount_viewer", "rewrite_index"]

PREFIX = "/viewer/"
#: the version scripts/setup fetches (npm registry)
OHIF_VERSION = "3.13.2"

_ABS = re.compile(r'((?:href|src)=")/(?!/)')


def app_config(root: str) -> str:
    """OHIF 3 configuration reading from the DICOMweb root ``root``."""
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
    return "window.config = " + json.dumps(cfg, indent=2) + ";\n"


def rewrite_index(html: str) -> str:
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}"')
    return _ABS.sub(rf"\g<1>{PREFIX}", html)


def mount_viewer(app: FastAPI, dist: Path) -> None:
    root = dist.resolve()
    index = rewrite_index((root / "index.html").read_text(encoding="utf-8"))

    @app.get("/viewer")
    def viewer_root() -> HTMLResponse:
        return HTMLResponse(index)

    @app.get("/viewer/app-config.js")
    def config_js(request: Request) -> Response:
        return Response(app_config(base_url(request)), media_type="application/javascript")

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
