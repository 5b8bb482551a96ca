"""Alembic environment: one migration history, one branch per component.

Each component declares its tables on its own ``MetaData`` (``storage.tables``,
``audit.tables``, ``node.pipeline.tables``); migrations live in ``alembic/versions`` with
branch labels ``storage``, ``audit`` and ``node``. The URL comes from the
``sqlalchemy.url`` main option, set by ``node.db.upgrade``, or ``$SYNTHNODE_DATABASE__URL``.
"""
from __future__ import annotations

import importlib
import os

from sqlalchemy import create_engine, pool

from alembic import context

config = context.config

target_metadata = []
for _mod in ("storage.tables", "audit.tables", "node.pipeline.tables"):
    try:
        target_metadata.append(importlib.import_module(_mod).metadata)
    except ModuleNotFoundError:  # component not built yet
        pass


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("SYNTHNODE_DATABASE__URL")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or SYNTHNODE_DATABASE__URL")
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        engine = create_engine(_url(), poolclass=pool.NullPool)
        with engine.connect() as connection:
            _run(connection)
        engine.dispose()
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
