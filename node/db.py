"""Database wiring for the composition root: engine creation and migrations.

The migrations live in the repository's top-level ``alembic/`` folder (one history, a
branch per component). A wheel ships the same files as package data, ``node/migrations``
(``[tool.setuptools.package-dir]`` in pyproject.toml), so an installed node migrates
without the source tree; a source checkout uses ``alembic/`` beside the packages.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

__all__ = [
    "NOT_INITIALISED", "alembic_config", "make_engine", "migrations_dir", "redact_url",
    "schema_problem", "upgrade",
]

SOURCE_ROOT = Path(__file__).resolve().parent.parent

#: What every command says about a database without the node's tables.
NOT_INITIALISED = "database not initialised: run `synthnode db upgrade`"


def migrations_dir() -> Path:
    """Folder holding ``env.py`` and ``versions/``: the checkout's ``alembic/`` when the
    packages run from a source tree, else the installed package data ``node/migrations``."""
    source = SOURCE_ROOT / "alembic"
    if (source / "env.py").is_file() and (source / "versions").is_dir():
        return source
    installed = Path(str(resources.files("node"))) / "migrations"
    if not (installed / "env.py").is_file():
        raise RuntimeError(f"no migrations found (looked in {source} and {installed})")
    return installed


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create the SQLAlchemy engine; SQLite gets WAL, full sync and a busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo,
                               connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _rec):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def alembic_config(url: str) -> Config:
    """Alembic configuration for ``url`` (no ini file needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Apply every component's migrations (``alembic upgrade heads``)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "heads")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def schema_problem(url: str) -> str | None:
    """Why the database at ``url`` cannot be used yet, in one line; None when every
    component's migrations (all heads of the one history) are applied.

    Never creates anything: a missing SQLite file is reported, not made.
    """
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect, text

    path = sqlite_path(url)
    if path is not None and not path.is_file():
        return NOT_INITIALISED
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    engine = create_engine(url, connect_args={"timeout": 30} if path else {})
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return NOT_INITIALISED
            rows = conn.execute(text("SELECT version_num FROM alembic_version"))
            current = {str(r[0]) for r in rows}
    except Exception as exc:  # unreachable server, bad credentials, not a database file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"cannot open the database at {redact_url(url)}: {first}"
    finally:
        engine.dispose()
    if not current:
        return NOT_INITIALISED
    if current == heads:
        return None
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        return (f"database was migrated by a newer synthnode (revision {', '.join(unknown)} "
                "unknown here): upgrade synthnode")
    return ("database schema is older than this synthnode "
            f"(missing {', '.join(sorted(heads - current))}): run `synthnode db upgrade`")
