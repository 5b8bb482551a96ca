"""The ``synthnode`` command. Each command group lives in its own module here."""
from __future__ import annotations

import typer

from node.cli import audit as _audit
from node.cli import config_cmd as _config
from node.cli import core as _core
from node.cli import engine as _engine
from node.cli import ingest as _ingest
from node.cli import models as _models
from node.cli import pipeline as _pipeline
from node.cli import tokens as _tokens
from node.cli import watermark as _watermark
from node.cli import worker as _worker

app = typer.Typer(
    name="synthnode",
    help="DICOM node for governed generative imaging: receive, store, query, restore/synthesise, "
    "tag, watermark, dispatch, and audit every step.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

_core.register(app)  # serve, echo, db, studies
app.add_typer(_config.app, name="config", help="Check and show configuration.")
app.add_typer(_audit.app, name="audit", help="Verify, query and export the audit ledger.")
app.add_typer(
    _models.app, name="models", help="Model admission gate: list, approve, revoke, verify."
)
app.add_typer(_ingest.app, name="ingest", help="What the node refused to store, and why.")
app.add_typer(_engine.app, name="engine", help="Train and evaluate engine models.")
app.add_typer(_watermark.app, name="watermark", help="Embed and detect the invisible watermark.")
_pipeline.register(app)  # rules, jobs
_worker.register(app)  # worker (Celery scale-out)
_tokens.register(app)  # tokens create


def main() -> None:
    app()
