"""The OHIF viewer at ``/viewer/``: its built ``dist/`` served from the node's origin,
with ``app-config.js`` generated to use this node's DICOMweb root."""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response

from node.dicomweb.dicomjson import base_url

__all__ = ["app_config", "mount_viewer"]


def app_config(root: str) -> str:
    """OHIF 3 configuration pointing at the DICOMweb root ``root``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "synthnode",
        "configuration": {
            "friendlyName": "synthnode", "name": "synthnode",
            "wadoUriRoot": root, "qidoRoot": root, "wadoRoot": root,
            "qidoSupportsIncludeField": True, "supportsReject": False,
            "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False,
            "supportsWildcard": True, "staticWado": False, "singlepart": "bulkdata",
            "bulkDataURI": {"enabled": True},
        },
    }
    cfg = {"routerBasename": "/viewer", "showStudyList": True,
           "dataSources": [source], "defaultDataSourceName": "synthnode"}
    return "window.config = " + json.dumps(cfg, indent=2) + ";\n"


def mount_viewer(app: FastAPI, dist: Path) -> None:
    root = dist.resolve()

    @app.get("/viewer/app-config.js")
    def config_js(request: Request) -> Response:
        return Response(app_config(base_url(request)), media_type="application/javascript")

    @app.get("/viewer/{path:path}")
    def files(path: str) -> FileResponse:
        p = (root / path).resolve()
        if not path or root not in p.parents or not p.is_file():
            p = root / "index.html"  # client-side routes
        return FileResponse(p)
