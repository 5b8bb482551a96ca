"""The ledger: one append API for the whole node, an RFC 9162 Merkle tree in SQL.

Every part of the node records what it does with :meth:`Ledger.append` (or
:meth:`Ledger.append_many`), optionally inside the caller's own database transaction so
that, e.g., an index row and its ``instance.received`` event commit or roll back together::

    ledger = Ledger(engine)
    with engine.begin() as conn:
        conn.execute(insert(instances).values(...))
        entry = ledger.append(Event(EventType.INSTANCE_RECEIVED, "ae:MODALITY", ...), conn=conn)

Ordering and locking
--------------------
Appenders serialise on the single ``ledger_head`` row: the first statement of an append is
``UPDATE ledger_head SET size = size WHERE id = 1 RETURNING size, frontier``. On PostgreSQL
that takes the row lock (held to commit; under READ COMMITTED the statement re-reads the
newest committed row once the lock is granted); on SQLite it takes the database write lock
(a deferred transaction whose first statement writes behaves like ``BEGIN IMMEDIATE`` for
this purpose; the busy timeout makes other writers wait). Sequence numbers are therefore
gapless and totally ordered across threads and processes, and a rolled-back transaction
gives its numbers back. Leaf hashing is done before the lock is taken; under the lock an
append does one UPDATE ... RETURNING, a few INSERTs and one UPDATE.

Callers that pass ``conn`` must use READ COMMITTED (PostgreSQL's default), and on SQLite
must not have read from the database in the same transaction before their first write
(SQLite cannot upgrade a stale WAL read snapshot and would fail with "database is locked").
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from audit import merkle
from audit.events import (
    Event,
    EventType,
    Outcome,
    event_from_leaf,
    event_refs,
    event_to_leaf,
    parse_time,
)
from audit.tables import ledger_checkpoints, ledger_entries, ledger_head, ledger_refs

log = logging.getLogger(__name__)

HEAD_ID = 1


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (inconsistent state, refused checkpoint, ...)."""


@dataclass(frozen=True)
class LedgerEntry:
    """Where an event landed: its leaf index and RFC 9162 leaf hash."""

    seq: int
    leaf_hash: bytes


@dataclass(frozen=True)
class StoredEntry:
    """One stored leaf as read back from the database."""

    seq: int
    leaf_hash: bytes
    data: bytes

    @property
    def event(self) -> Event:
        return event_from_leaf(self.data)


@dataclass(frozen=True)
class _Prepared:
    data: bytes
    leaf: bytes
    event: Event


def _prepare(event: Event) -> _Prepared:
    data = event_to_leaf(event)
    return _Prepared(data, merkle.leaf_hash(data), event)


class Ledger:
    """Append-only RFC 9162 ledger stored in the ``audit`` tables of ``engine``'s database.

    Parameters
    ----------
    engine
        SQLAlchemy engine (``node.db.make_engine``) whose database has the ``audit``
        migrations applied.
    """

    #: Called on every event before it becomes a leaf; the node sets it to add the keyed
    #: patient digests to events that name a study (:meth:`node.patients.PatientRefs.annotate`).
    #: Must return an event (the same one when there is nothing to add) and never raise.
    annotate: Callable[[Event], Event] | None = None

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._gc: _GroupCommitter | None = None
        self._gc_lock = threading.Lock()
        self._sql_cache: dict[str, dict[str, str]] = {}
        self._ensure_head()

    # -- head ------------------------------------------------------------------------
    def _ensure_head(self) -> None:
        with self.engine.connect() as conn:
            if conn.execute(select(ledger_head.c.id).where(ledger_head.c.id == HEAD_ID)).first():
                return
            if conn.execute(select(ledger_entries.c.seq).limit(1)).first() is not None:
                # never paper over a deleted head: that is damage for `audit verify` to report
                log.error("ledger_head row is missing although entries exist")
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(ledger_head).values(id=HEAD_ID, size=0, frontier=b""))
        except IntegrityError:  # another process created it first
            pass

    @staticmethod
    def lock_head(conn: Connection) -> tuple[int, list[bytes]]:
        """Take the appenders' lock (see module docs); return ``(size, frontier)``."""
        row = conn.execute(
            update(ledger_head)
            .where(ledger_head.c.id == HEAD_ID)
            .values(size=ledger_head.c.size)
            .returning(ledger_head.c.size, ledger_head.c.frontier)
        ).first()
        if row is None:
            raise LedgerError("ledger_head row is missing: run `synthnode db upgrade`")
        size = int(row.size)
        return size, merkle.unpack_frontier(bytes(row.frontier), size)

    # -- append ----------------------------------------------------------------------
    def append(self, event: Event, conn: Connection | None = None) -> LedgerEntry:
        """Append one event; returns its sequence number and leaf hash.

        Parameters
        ----------
        event
            the record (canonicalised to JSON: RFC 9162 leaf data).
        conn
            an open connection inside the caller's transaction: the entry commits or rolls
            back with it. ``None``: the append runs in its own transaction.
        """
        return self.append_many([event], conn=conn)[0]

    def append_many(
        self, events: Iterable[Event], conn: Connection | None = None
    ) -> list[LedgerEntry]:
        """Append several events as consecutive leaves, atomically.

        Without ``conn``, concurrent callers in this process are group-committed: one
        writer thread takes every append waiting at that moment and commits them in one
        transaction (each caller still returns only after its entries are durable).
        """
        hook = self.annotate
        prepared = [_prepare(hook(e) if hook is not None else e) for e in events]
        if not prepared:
            return []
        if conn is not None:
            return self._append_locked(conn, prepared)
        return self._committer().submit(prepared)

    def _committer(self) -> _GroupCommitter:
        pid = os.getpid()
        gc = self._gc
        if gc is None or gc.pid != pid:  # first use, or a forked child
            with self._gc_lock:
                if self._gc is None or self._gc.pid != pid:
                    self._gc = _GroupCommitter(self, pid)
                gc = self._gc
        return gc

    def close(self) -> None:
        """Stop the group-commit writer thread (appends after this start a new one)."""
        gc, self._gc = self._gc, None
        if gc is not None:
            gc.stop()

    def _commit_batch(self, prepared: Sequence[_Prepared]) -> list[LedgerEntry]:
        with self.engine.begin() as own:
            return self._append_locked(own, prepared)

    def _sql(self, conn: Connection) -> dict[str, str]:
        style = conn.dialect.paramstyle
        key = style
        cached = self._sql_cache.get(key)
        if cached is not None:
            return cached
        ph = "?" if style == "qmark" else "%s"

        def q(sql: str) -> str:
            return sql.replace("?", ph)

        cached = {
            "lock": q("UPDATE ledger_head SET size = size WHERE id = ? RETURNING size, frontier"),
            "entry": q(
                "INSERT INTO ledger_entries "
                "(seq, leaf_hash, data, event_type, time, actor, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            "node": q("INSERT INTO ledger_nodes (level, idx, hash) VALUES (?, ?, ?)"),
            "ref": q("INSERT INTO ledger_refs (seq, role, uid) VALUES (?, ?, ?)"),
            "head": q("UPDATE ledger_head SET size = ?, frontier = ? WHERE id = ?"),
        }
        self._sql_cache[key] = cached
        return cached

    def _append_locked(self, conn: Connection, prepared: Sequence[_Prepared]) -> list[LedgerEntry]:
        """The hot path: five prepared statements on the DBAPI cursor of ``conn``'s
        transaction (no SQL compilation), the head row lock taken by the first."""
        sql = self._sql(conn)
        sqlite = conn.dialect.name == "sqlite"
        if not conn.in_transaction():
            conn.begin()
        cur = conn.connection.cursor()
        try:
            cur.execute(sql["lock"], (HEAD_ID,))
            row = cur.fetchone()
            if row is None:
                raise LedgerError("ledger_head row is missing: run `synthnode db upgrade`")
            size = int(row[0])
            frontier = merkle.unpack_frontier(bytes(row[1]), size)
            entries: list[tuple[Any, ...]] = []
            nodes: list[tuple[int, int, bytes]] = []
            refs: list[tuple[int, str, str]] = []
            out: list[LedgerEntry] = []
            for i, p in enumerate(prepared):
                seq = size + i
                nodes.extend(merkle.frontier_append(frontier, seq, p.leaf))
                ev = p.event
                t = ev.time.astimezone(UTC)
                entries.append((seq, p.leaf, p.data, EventType(ev.type).value,
                                t.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else t,
                                ev.actor[:128], Outcome(ev.outcome).value))
                refs.extend((seq, r, u) for r, u in event_refs(ev))
                out.append(LedgerEntry(seq, p.leaf))
            cur.executemany(sql["entry"], entries)
            if nodes:
                cur.executemany(sql["node"], nodes)
            if refs:
                cur.executemany(sql["ref"], refs)
            cur.execute(
                sql["head"], (size + len(prepared), merkle.pack_frontier(frontier), HEAD_ID)
            )
        finally:
            cur.close()
        return out

    # -- reading ---------------------------------------------------------------------
    def size(self, conn: Connection | None = None) -> int:
        """Number of committed leaves."""
        if conn is None:
            with self.engine.connect() as c:
                return self.size(c)
        return int(
            conn.execute(select(ledger_head.c.size).where(ledger_head.c.id == HEAD_ID)).scalar_one()
        )

    def head(self, conn: Connection | None = None) -> tuple[int, bytes]:
        """``(size, root)`` of the committed tree (from the head frontier)."""
        if conn is None:
            with self.engine.connect() as c:
                return self.head(c)
        row = conn.execute(select(ledger_head.c.size, ledger_head.c.frontier)
                           .where(ledger_head.c.id == HEAD_ID)).one()
        size = int(row.size)
        return size, merkle.frontier_root(merkle.unpack_frontier(bytes(row.frontier), size))

    def fetcher(self, conn: Connection) -> merkle.Fetch:
        """A :data:`audit.merkle.Fetch` callback reading stored complete subtrees
        (primary-key point lookups on the DBAPI cursor: O(log n) rows per proof)."""
        ph = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        q_leaf = f"SELECT leaf_hash FROM ledger_entries WHERE seq = {ph}"
        q_node = f"SELECT hash FROM ledger_nodes WHERE level = {ph} AND idx = {ph}"

        def fetch(ids: set[merkle.NodeId]) -> dict[merkle.NodeId, bytes]:
            out: dict[merkle.NodeId, bytes] = {}
            cur = conn.connection.cursor()
            try:
                for lv, i in ids:
                    if lv == 0:
                        cur.execute(q_leaf, (i,))
                    else:
                        cur.execute(q_node, (lv, i))
                    row = cur.fetchone()
                    if row is not None:
                        out[(lv, i)] = bytes(row[0])
            finally:
                cur.close()
            return out

        return fetch

    def root(self, size: int | None = None, conn: Connection | None = None) -> bytes:
        """Root hash of the first ``size`` leaves (default: all)."""
        if conn is None:
            with self.engine.connect() as c:
                return self.root(size, c)
        current = self.size(conn)
        size = current if size is None else size
        if not 0 <= size <= current:
            raise LedgerError(f"tree size {size} is beyond the ledger size {current}")
        return merkle.root_hash(size, self.fetcher(conn))

    def inclusion_proof(self, seq: int, size: int | None = None,
                        conn: Connection | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of leaf ``seq`` in the tree of ``size`` leaves."""
        if conn is None:
            with self.engine.connect() as c:
                return self.inclusion_proof(seq, size, c)
        current = self.size(conn)
        size = current if size is None else size
        if not 0 <= seq < size <= current:
            raise LedgerError(f"no leaf {seq} in a tree of size {size} (ledger size {current})")
        return merkle.inclusion_proof(seq, size, self.fetcher(conn))

    def consistency_proof(self, old: int, new: int | None = None,
                          conn: Connection | None = None) -> list[bytes]:
        """RFC 9162 consistency proof between tree sizes ``old`` and ``new``."""
        if conn is None:
            with self.engine.connect() as c:
                return self.consistency_proof(old, new, c)
        current = self.size(conn)
        new = current if new is None else new
        if not 0 < old <= new <= current:
            raise LedgerError(f"no consistency proof from {old} to {new} (ledger size {current})")
        return merkle.consistency_proof(old, new, self.fetcher(conn))

    def entry(self, seq: int, conn: Connection | None = None) -> StoredEntry:
        if conn is None:
            with self.engine.connect() as c:
                return self.entry(seq, c)
        row = conn.execute(
            select(ledger_entries.c.seq, ledger_entries.c.leaf_hash, ledger_entries.c.data).where(
                ledger_entries.c.seq == seq
            )
        ).first()
        if row is None:
            raise LedgerError(f"no ledger entry {seq}")
        return StoredEntry(int(row.seq), bytes(row.leaf_hash), bytes(row.data))

    def entries(self, start: int = 0, stop: int | None = None,
                conn: Connection | None = None, batch: int = 5000) -> Iterator[StoredEntry]:
        """Stored entries in sequence order (streamed)."""
        own = conn is None
        c = self.engine.connect() if conn is None else conn
        try:
            q = select(ledger_entries.c.seq, ledger_entries.c.leaf_hash, ledger_entries.c.data) \
                .where(ledger_entries.c.seq >= start).order_by(ledger_entries.c.seq)
            if stop is not None:
                q = q.where(ledger_entries.c.seq < stop)
            for row in c.execution_options(stream_results=True, yield_per=batch).execute(q):
                yield StoredEntry(int(row.seq), bytes(row.leaf_hash), bytes(row.data))
        finally:
            if own:
                c.close()

    def query(
        self,
        *,
        uids: Sequence[str] = (),
        event_types: Sequence[str] = (),
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        conn: Connection | None = None,
    ) -> list[StoredEntry]:
        """Entries matching every given filter (UIDs: any of them, via the UID index).

        The event type is decided by the hashed leaf, never by the copied ``event_type``
        column alone: with ``uids`` the column is not consulted at all (the type is read
        from each leaf), without them it only narrows the scan and every row is then
        checked against its leaf. A row whose column was edited therefore can neither hide
        an event from a UID lookup (e.g. a model revocation) nor pose as another type;
        ``audit verify --deep`` reports such edits."""
        if conn is None:
            with self.engine.connect() as c:
                return self.query(uids=uids, event_types=event_types, actor=actor, since=since,
                                  until=until, limit=limit, conn=c)
        e = ledger_entries.c
        q = select(e.seq, e.leaf_hash, e.data).order_by(e.seq)
        types = {EventType(t).value for t in event_types}
        if uids:
            q = q.where(
                e.seq.in_(select(ledger_refs.c.seq).where(ledger_refs.c.uid.in_(list(uids))))
            )
        if types and not uids:
            q = q.where(e.event_type.in_(sorted(types)))
        if actor:
            q = q.where(e.actor == actor)
        if since:
            q = q.where(e.time >= since)
        if until:
            q = q.where(e.time < until)
        if types:
            return self._leaf_typed(conn, q, types, limit)
        if limit:
            q = q.limit(limit)
        return [StoredEntry(int(r.seq), bytes(r.leaf_hash), bytes(r.data)) for r in conn.execute(q)]

    @staticmethod
    def _leaf_typed(conn: Connection, q: Any, types: set[str],
                    limit: int | None) -> list[StoredEntry]:
        """Rows of ``q`` whose leaf's event type is in ``types``."""
        out: list[StoredEntry] = []
        for r in conn.execute(q):
            entry = StoredEntry(int(r.seq), bytes(r.leaf_hash), bytes(r.data))
            if entry.event.type.value not in types:
                continue
            out.append(entry)
            if limit and len(out) >= limit:
                break
        return out

    def checkpoints(self, conn: Connection | None = None) -> list[tuple[int, bytes, str]]:
        """Stored checkpoints ``(size, root, note)`` in size order."""
        if conn is None:
            with self.engine.connect() as c:
                return self.checkpoints(c)
        cols = ledger_checkpoints.c
        return [(int(r.size), bytes(r.root_hash), r.note)
                for r in conn.execute(
                    select(cols.size, cols.root_hash, cols.note).order_by(cols.size))]

    def latest_checkpoint(self, conn: Connection) -> tuple[int, bytes, str] | None:
        c = ledger_checkpoints.c
        top = conn.execute(select(func.max(c.size))).scalar()
        if top is None:
            return None
        r = conn.execute(select(c.size, c.root_hash, c.note).where(c.size == top)).one()
        return int(r.size), bytes(r.root_hash), r.note


def entry_time(entry: StoredEntry) -> datetime:
    """The event time of a stored entry (from its leaf)."""
    import json

    return parse_time(json.loads(entry.data)["time"])


class _Pending:
    __slots__ = ("done", "error", "prepared", "result")

    def __init__(self, prepared: Sequence[_Prepared]) -> None:
        self.prepared = prepared
        self.done = threading.Event()
        self.result: list[LedgerEntry] = []
        self.error: BaseException | None = None


class _GroupCommitter:
    """One writer thread per process and ledger: commits every waiting append in one
    transaction (group commit). A failing batch is retried item by item, so one bad event
    fails only its own caller. The thread exits after ``IDLE_S`` without work and is
    restarted by the next append (no thread is left behind by short-lived ledgers)."""

    MAX_BATCH = 2000
    IDLE_S = 2.0

    def __init__(self, ledger: Ledger, pid: int) -> None:
        self.ledger = ledger
        self.pid = pid
        self.q: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:  # caller holds self.lock
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
            self.thread.start()

    def submit(self, prepared: Sequence[_Prepared]) -> list[LedgerEntry]:
        item = _Pending(prepared)
        with self.lock:
            self.q.put(item)
            self._ensure_thread()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def stop(self) -> None:
        with self.lock:
            t = self.thread
            if t is None:
                return
            self.q.put(None)
        t.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                first = self.q.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self.lock:
                    if self.q.empty():
                        self.thread = None
                        return
                continue
            if first is None:
                with self.lock:
                    self.thread = None
                return
            batch = [first]
            n = len(first.prepared)
            stop = False
            while n < self.MAX_BATCH:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt.prepared)
            self._commit(batch)
            if stop:
                with self.lock:
                    self.thread = None
                return

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            res = self.ledger._commit_batch([p for it in batch for p in it.prepared])
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].done.set()
                return
            for it in batch:  # isolate the failing item(s)
                self._commit([it])
            return
        k = 0
        for it in batch:
            it.result = res[k:k + len(it.prepared)]
            k += len(it.prepared)
            it.done.set()
