"""Options and helpers shared by every command group.

Conventions every command keeps (README "Quick start"):

* settings come from ``--config``, else ``$SYNTHNODE_CONFIG``, else the bundled defaults
  with the data folder in the user's data directory (:func:`config.settings.user_data_dir`),
  never inside the installed code;
* a command that reads the database checks its schema first (:func:`open_engine`) and,
  on a database without the node's tables, prints one line naming the fix and exits 1: no
  traceback, and no empty ``index.db`` left behind;
* errors are one line on stderr, never wrapped, with a non-zero exit status.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from config.settings import (
    DEFAULT_CONFIG,
    ConfigFileError,
    Settings,
    load_settings,
    user_data_dir,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="TOML config file (default: $SYNTHNODE_CONFIG, else the bundled defaults with data in "
    "~/.local/share/synthnode).",
    envvar="SYNTHNODE_CONFIG",
)

YesOption = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")


def config_path(config: Path | None) -> Path | None:
    """The config file in use: ``--config``, else ``$SYNTHNODE_CONFIG``; None = the bundled
    defaults."""
    if config is not None:
        return config
    env = os.environ.get("SYNTHNODE_CONFIG")
    return Path(env) if env else None


def _installed_code_root() -> Path | None:
    """The folder holding the installed packages (site-packages), or None for a source
    checkout (which keeps its data in the git-ignored ``var/``)."""
    root = Path(__file__).resolve().parents[2]
    return None if (root / "pyproject.toml").is_file() else root


def settings_from(config: Path | None) -> Settings:
    """Load settings or exit 2 naming every bad key with its file and line.

    Without a config file the bundled defaults are used with ``data_dir`` in the user's data
    folder (``$SYNTHNODE_DATA_DIR`` overrides it). A configuration whose data folder lies
    inside the installed code is refused: an upgrade would delete the index and the keys.
    """
    path = config_path(config)
    try:
        settings = load_settings(path or DEFAULT_CONFIG)
    except ConfigFileError as exc:
        for e in exc.errors:
            typer.echo(f"error: {e.located(exc.source)}", err=True)
        raise typer.Exit(2) from None
    if path is None and "SYNTHNODE_DATA_DIR" not in os.environ:
        settings.data_dir = user_data_dir()
    code = _installed_code_root()
    data = settings.data_dir.resolve()
    if code is not None and data.is_relative_to(code):
        fail(f"data_dir {data} is inside the installed synthnode code ({code}); copy "
             f"{DEFAULT_CONFIG} to e.g. /etc/synthnode/site.toml, set data_dir there and pass "
             "--config (or set SYNTHNODE_CONFIG)", 2)
    return settings


def fail(message: str, code: int = 1) -> None:
    """Print ``error: MESSAGE`` as one unwrapped line on stderr and exit ``code``."""
    sys.stdout.flush()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def db_upgrade_hint(config: Path | None) -> str:
    path = config_path(config)
    return f"synthnode db upgrade -c {path}" if path else "synthnode db upgrade"


def open_engine(settings: Settings, config: Path | None = None) -> Engine:
    """The database engine, after checking that every migration is applied.

    Exits 1 with one line (``database not initialised: run `synthnode db upgrade```, with
    ``-c FILE`` when a config file is in use) when it is not; nothing is created.
    """
    from node.db import NOT_INITIALISED, make_engine, schema_problem

    problem = schema_problem(settings.database_url)
    if problem is not None:
        if problem == NOT_INITIALISED:
            problem = problem.replace("synthnode db upgrade", db_upgrade_hint(config))
        fail(problem)
    return make_engine(settings.database_url, echo=settings.database.echo)


def confirm(question: str, yes: bool) -> None:
    """Ask before a permanent act; exit 1 on anything but yes (``--yes`` skips the question;
    without a terminal the question reads stdin, and end of input means no)."""
    if yes:
        return
    try:
        ok = typer.confirm(question, default=False)
    except typer.Abort:
        ok = False
    if not ok:
        fail("not confirmed; nothing done (use --yes to skip the question)")
