"""Database wiring for the composition root: engine creation and migrations.

The migrations live in the repository's top-level ``alembic/`` folder (one history, a
branch per component). A wheel ships the same files as package data, ``node/migrations``
(``[tool.setuptools.package-dir]`` in pyproject.toml), so an installed node migrates
without the source tree; a source checkout uses ``alembic/`` beside the packages.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

__all__ = ["alembic_config", "make_engine", "migrations_dir", "upgrade"]

SOURCE_ROOT = Path(__file__).resolve().parent.parent


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
