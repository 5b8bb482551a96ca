"""Ledger tables on their own ``MetaData`` (Alembic branch ``audit``).

``ledger_entries``
    one row per leaf: ``seq`` (0-based leaf index, gapless), the canonical JSON leaf data
    and its RFC 9162 leaf hash ``SHA-256(0x00 || data)``; event type, time and actor are
    copied out of the leaf for querying only (the leaf bytes are authoritative).
``ledger_nodes``
    node cache: the hash of every complete, aligned subtree of ``2**level`` leaves
    (``level >= 1``; level 0 is ``ledger_entries.leaf_hash``), written as its last leaf
    arrives. Any inclusion / consistency proof needs O(log n) of these rows.
``ledger_head``
    a single row (``id = 1``): tree size and the compact-range frontier (the hashes of the
    complete subtrees on the right edge, largest first). Appenders lock this row, so
    sequence numbers are gapless and totally ordered across threads and processes.
``ledger_checkpoints``
    every signed checkpoint (C2SP tlog-checkpoint signed note), at most one per size.
``ledger_refs``
    derived index: each UID / id an entry mentions (subject keys and the payload keys listed
    in :mod:`audit.events`), for ``audit query`` and ``audit lineage``. Rebuildable from
    the leaves; not part of the hashed data.
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("event_type", String(64), nullable=False, index=True),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("actor", String(128), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
)

ledger_nodes = Table(
    "ledger_nodes",
    metadata,
    Column("level", SmallInteger, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
)

ledger_head = Table(
    "ledger_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    Column("frontier", LargeBinary, nullable=False),
)

ledger_checkpoints = Table(
    "ledger_checkpoints",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("note", Text, nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False),
)

ledger_refs = Table(
    "ledger_refs",
    metadata,
    Column("seq", BigInteger, nullable=False, index=True),
    Column("role", String(32), nullable=False),
    Column("uid", String(128), nullable=False),
    Index("ix_ledger_refs_uid_seq", "uid", "seq"),
)
