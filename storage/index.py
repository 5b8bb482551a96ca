"""Index writes and reads: patient / study / series / instance rows (``storage.tables``).

Writers take an open :class:`sqlalchemy.Connection` inside ``engine.begin()`` so the
caller commits the index rows together with its ledger entry (the durability contract).
Parent rows are created with ``INSERT .. ON CONFLICT`` (a study's or series' row upserted
and its key returned; a patient looked up, inserted if new, read back after a conflict), so
concurrent associations that deliver the first instances of one study do not collide
(SQLite and PostgreSQL). Within :attr:`Index.PARENT_CACHE_S` of writing a series' parent
rows, further instances of that series insert only their own row (a 500-slice series
costs one statement per slice, not ten). The cache is per thread: a thread's entries were
written by its own transactions, which are visible to it (the open one) or committed (the
ones before); another thread's may not be committed yet, and a row that refers to an
uncommitted parent fails PostgreSQL's foreign key check. Callers clear the cache after a
rollback.

The index holds DICOM values as text (see ``storage.tables``); it has no DICOM parser:
the node extracts an :class:`InstanceRecord` and hands it over.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from storage.synthetic import is_synthetic
from storage.tables import Instance, Landing, Patient, Series, Study

__all__ = [
    "Index",
    "IndexedInstance",
    "InstanceRecord",
    "StudySummary",
]


@dataclass(frozen=True)
class InstanceRecord:
    """What the index stores about one received instance.

    Attribute names follow the DICOM keywords (PS3.6) in snake case; values are the
    received strings (PN as its string form, DA/TM as text). The C.6 unique keys
    (``patient_id`` + ``issuer_of_patient_id``, ``study_instance_uid``,
    ``series_instance_uid``, ``sop_instance_uid``) identify the rows.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    file_path: str
    file_size: int
    sha256: str
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    calling_ae: str | None = None
    called_ae: str | None = None
    source: str = "dimse"
    # patient level (PS3.4 C.6.1.1.2)
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    # study level (PS3.4 C.6.1.1.3)
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    # series level (PS3.4 C.6.1.1.4)
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    series_date: str | None = None
    series_time: str | None = None
    frame_of_reference_uid: str | None = None
    # instance level (PS3.4 C.6.1.1.5)
    instance_number: int | None = None
    number_of_frames: int | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    content_date: str | None = None
    content_time: str | None = None
    synthetic_data: str | None = None  # (0008,001C) as received

    def __post_init__(self) -> None:
        for name in ("sop_instance_uid", "sop_class_uid", "series_instance_uid",
                     "study_instance_uid", "transfer_syntax_uid", "file_path", "sha256"):
            if not getattr(self, name):
                raise ValueError(f"InstanceRecord.{name} is required")
        if len(self.sha256) != 64:
            raise ValueError("InstanceRecord.sha256 must be 64 hex digits")
        if self.received_at.tzinfo is None:
            raise ValueError("InstanceRecord.received_at must be timezone-aware")


@dataclass(frozen=True)
class IndexedInstance:
    """An instance row as read back (what retrieval and listing need)."""

    pk: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    file_path: str
    file_size: int
    sha256: str
    received_at: datetime
    calling_ae: str | None


@dataclass(frozen=True)
class StudySummary:
    """One line of ``synthnode studies``."""

    study_instance_uid: str
    patient_id: str
    patient_name: str | None
    study_date: str | None
    accession_number: str | None
    study_description: str | None
    modalities: tuple[str, ...]
    n_series: int
    n_instances: int
    updated_at: datetime


def _trunc(value: str | None, n: int) -> str | None:
    return None if value is None else value[:n]


class Index:
    """The instance index on one SQLAlchemy engine.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        Engine of a migrated database (``synthnode db upgrade``).
    """

    #: Parent rows of a series seen within this many seconds are not re-written
    #: (study/series ``updated_at`` is therefore exact to about this much).
    PARENT_CACHE_S = 1.0
    #: entries kept before the expired ones are dropped
    PARENT_CACHE_MAX = 10_000

    def __init__(self, engine: Engine):
        self.engine = engine
        # (thread, series UID) -> (series pk, monotonic time its parents were last written)
        self._parents: dict[tuple[int, str], tuple[int, float]] = {}
        # series UID -> (study UID, Patient ID, Issuer, monotonic time) as last written
        self._owners: dict[str, tuple[str, str, str, float]] = {}
        self._sql_cache: dict[str, dict[str, str]] = {}

    def clear_cache(self) -> None:
        """Forget cached parent rows (after a rollback or a delete)."""
        self._parents.clear()
        self._owners.clear()

    def known_owners(self, study_instance_uid: str, series_instance_uid: str,
                     patient_id: str, issuer: str) -> bool:
        """Whether this process indexed an instance of this series, under this study and
        patient, within :attr:`PARENT_CACHE_S` (so :meth:`owners` would agree: another
        process cannot re-file a committed study, see ``check_owners``)."""
        o = self._owners.get(series_instance_uid)
        return (o is not None and time.monotonic() - o[3] < self.PARENT_CACHE_S
                and o[:3] == (study_instance_uid, (patient_id or "")[:64],
                              (issuer or "")[:64]))

    # -- writes (inside the caller's transaction) ---------------------------------
    # The parent rows run on the DBAPI cursor too (the first instance of every series
    # writes them: one study per instance in a migration of small studies). A study's or
    # series' row is inserted, or its updated_at (and the series' synthetic flag) set, in
    # one upsert that returns its key; a patient row is looked up first (most are known).
    def _patient_pk(self, conn: Connection, rec: InstanceRecord) -> int:
        sql = self._sql(conn)
        key = ((rec.patient_id or "")[:64], (rec.issuer_of_patient_id or "")[:64])
        row = self._one(conn, sql["patient_pk"], key)
        if row is None:
            row = self._one(conn, sql["patient"], (
                *key, _trunc(rec.patient_name, 324), _trunc(rec.patient_birth_date, 8),
                _trunc(rec.patient_sex, 16)))
        if row is None:  # inserted by another transaction since the look-up
            row = self._one(conn, sql["patient_pk"], key)
        assert row is not None
        return int(row[0])

    def _study_pk(self, conn: Connection, rec: InstanceRecord, patient_pk: int) -> int:
        now = self._time(conn, rec.received_at)
        row = self._one(conn, self._sql(conn)["study"], (
            rec.study_instance_uid, patient_pk, _trunc(rec.study_date, 8),
            _trunc(rec.study_time, 16), _trunc(rec.accession_number, 64),
            _trunc(rec.study_id, 16), _trunc(rec.study_description, 64),
            _trunc(rec.referring_physician_name, 324), now, now))
        assert row is not None
        return int(row[0])

    def _series_pk(self, conn: Connection, rec: InstanceRecord, study_pk: int) -> int:
        now = self._time(conn, rec.received_at)
        row = self._one(conn, self._sql(conn)["series"], (
            rec.series_instance_uid, study_pk, _trunc(rec.modality, 16), rec.series_number,
            _trunc(rec.series_description, 64), _trunc(rec.body_part_examined, 64),
            _trunc(rec.series_date, 8), _trunc(rec.series_time, 16),
            _trunc(rec.frame_of_reference_uid, 64), is_synthetic(rec.synthetic_data),
            now, now))
        assert row is not None
        return int(row[0])

    def _one(self, conn: Connection, sql: str, params: Sequence[Any]) -> Any:
        cur = self._raw(conn, sql, params)
        try:
            return cur.fetchone()
        finally:
            cur.close()

    def _instance_values(self, rec: InstanceRecord, series_pk: int) -> dict[str, Any]:
        return {
            "sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
            "series_pk": series_pk, "instance_number": rec.instance_number,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "number_of_frames": rec.number_of_frames, "rows": rec.rows, "columns": rec.columns,
            "bits_allocated": rec.bits_allocated, "content_date": _trunc(rec.content_date, 8),
            "content_time": _trunc(rec.content_time, 16),
            "synthetic_data": _trunc(rec.synthetic_data, 3), "file_path": rec.file_path,
            "file_size": rec.file_size, "sha256": rec.sha256, "received_at": rec.received_at,
            "calling_ae": _trunc(rec.calling_ae, 16), "called_ae": _trunc(rec.called_ae, 16),
            "source": rec.source,
        }

    def add_instance(self, conn: Connection, rec: InstanceRecord) -> int:
        """Insert an instance (and its patient / study / series if new).

        Raises ``sqlalchemy.exc.IntegrityError`` if the SOP Instance UID is already
        indexed (the caller decides what a duplicate means). Returns the instance pk.
        """
        now = time.monotonic()
        key = (threading.get_ident(), rec.series_instance_uid)
        cached = self._parents.get(key)
        synthetic = is_synthetic(rec.synthetic_data)
        if cached is not None and now - cached[1] < self.PARENT_CACHE_S and not synthetic:
            series_pk, t_written = cached  # parents written moments ago by this thread
        else:
            patient_pk = self._patient_pk(conn, rec)
            study_pk = self._study_pk(conn, rec, patient_pk)
            series_pk = self._series_pk(conn, rec, study_pk)
            t_written = now
        pk = self._insert_instance(conn, self._instance_values(rec, series_pk))
        if len(self._parents) >= self.PARENT_CACHE_MAX:  # forget the expired ones
            live = list(self._parents.items())  # one C-level copy: other threads write
            self._parents = {k: v for k, v in live if now - v[1] < self.PARENT_CACHE_S}
        self._parents[key] = (series_pk, t_written)
        self._owners[rec.series_instance_uid] = (
            rec.study_instance_uid, (rec.patient_id or "")[:64],
            (rec.issuer_of_patient_id or "")[:64], t_written)
        return pk

    _INSTANCE_COLS = tuple(c.name for c in Instance.__table__.columns if c.name != "id")

    # the two statements every received instance runs: on the DBAPI cursor of the
    # caller's transaction, without SQL compilation (as audit.ledger does)
    def _sql(self, conn: Connection) -> dict[str, str]:
        style = conn.dialect.paramstyle
        cached = self._sql_cache.get(style)
        if cached is None:
            ph = "?" if style == "qmark" else "%s"
            cols = self._INSTANCE_COLS
            quote = conn.dialect.identifier_preparer.quote
            cached = {
                "instance": f"INSERT INTO instances ({', '.join(map(quote, cols))}) VALUES "
                            f"({', '.join([ph] * len(cols))}) RETURNING id",
                "landing": "INSERT INTO landing (file_path, sop_instance_uid, sha256, "
                           f"file_size, created_at) VALUES ({ph}, {ph}, {ph}, {ph}, {ph})",
                "patient_pk": f"SELECT id FROM patients WHERE patient_id = {ph} AND "
                              f"issuer_of_patient_id = {ph}",
                "patient": "INSERT INTO patients (patient_id, issuer_of_patient_id, "
                           "patient_name, patient_birth_date, patient_sex) VALUES "
                           f"({ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT (patient_id, "
                           "issuer_of_patient_id) DO NOTHING RETURNING id",
                "study": "INSERT INTO studies (study_instance_uid, patient_pk, study_date, "
                         "study_time, accession_number, study_id, study_description, "
                         "referring_physician_name, created_at, updated_at) VALUES "
                         f"({', '.join([ph] * 10)}) ON CONFLICT (study_instance_uid) DO "
                         "UPDATE SET updated_at = excluded.updated_at RETURNING id",
                "series": "INSERT INTO series (series_instance_uid, study_pk, modality, "
                          "series_number, series_description, body_part_examined, "
                          "series_date, series_time, frame_of_reference_uid, synthetic, "
                          f"created_at, updated_at) VALUES ({', '.join([ph] * 12)}) ON "
                          "CONFLICT (series_instance_uid) DO UPDATE SET updated_at = "
                          "excluded.updated_at, synthetic = (series.synthetic OR "
                          "excluded.synthetic) RETURNING id",
                "owner": "SELECT p.patient_id, p.issuer_of_patient_id FROM studies s JOIN "
                         "patients p ON s.patient_pk = p.id WHERE s.study_instance_uid = "
                         f"{ph}",
                "series_study": "SELECT s.study_instance_uid FROM series se JOIN studies s "
                                f"ON se.study_pk = s.id WHERE se.series_instance_uid = {ph}",
                "ph": ph,
            }
            self._sql_cache[style] = cached
        return cached

    @staticmethod
    def _time(conn: Connection, t: datetime) -> Any:
        if conn.dialect.name == "sqlite":  # SQLAlchemy's storage format for DateTime
            return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return t

    def _raw(self, conn: Connection, sql: str, params: Sequence[Any]) -> Any:
        cur = conn.connection.cursor()
        try:
            cur.execute(sql, tuple(params))
        except conn.dialect.dbapi.IntegrityError as exc:  # type: ignore[union-attr]
            # what conn.execute would raise: callers decide duplicates on it
            raise IntegrityError(sql, params, exc) from exc
        return cur

    def _insert_instance(self, conn: Connection, values: dict[str, Any]) -> int:
        sql = self._sql(conn)
        params = [self._time(conn, values[c]) if c == "received_at" else values.get(c)
                  for c in self._INSTANCE_COLS]
        cur = self._raw(conn, sql["instance"], params)
        row = cur.fetchone()
        cur.close()
        return int(row[0])

    def replace_instance(self, conn: Connection, rec: InstanceRecord) -> tuple[int, str]:
        """Point an indexed SOP Instance at a new file (duplicate policy ``replace``).

        Returns ``(pk, old_file_path)``; the caller removes the old file after commit.
        """
        t = Instance.__table__
        row = conn.execute(
            select(t.c.id, t.c.file_path).where(t.c.sop_instance_uid == rec.sop_instance_uid)
        ).one()
        patient_pk = self._patient_pk(conn, rec)
        study_pk = self._study_pk(conn, rec, patient_pk)
        series_pk = self._series_pk(conn, rec, study_pk)
        conn.execute(update(t).where(t.c.id == row.id)
                     .values(**self._instance_values(rec, series_pk)))
        return int(row.id), str(row.file_path)

    # -- landing (files indexed before their durability was confirmed) -------------
    def add_landing(self, conn: Connection, rec: InstanceRecord) -> None:
        """Record, in the transaction indexing ``rec``, that its file is not yet
        confirmed durable (``storage.tables.Landing``)."""
        self._raw(conn, self._sql(conn)["landing"], (
            rec.file_path, rec.sop_instance_uid, rec.sha256, rec.file_size,
            self._time(conn, rec.received_at))).close()

    def clear_landing(self, conn: Connection, file_paths: Sequence[str]) -> None:
        """Files confirmed durable: forget their landing rows."""
        if file_paths:
            ph = self._sql(conn)["ph"]
            self._raw(conn, f"DELETE FROM landing WHERE file_path IN "
                            f"({', '.join([ph] * len(file_paths))})", list(file_paths)).close()

    def landing(self) -> list[tuple[str, str, str, int]]:
        """Every landing row: (file path, SOP Instance UID, SHA-256, size)."""
        t = Landing.__table__
        with self.engine.connect() as c:
            return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in c.execute(
                select(t.c.file_path, t.c.sop_instance_uid, t.c.sha256, t.c.file_size))]

    def delete_instances(self, conn: Connection, pks: Sequence[int]) -> None:
        """Remove instance rows (retention); empty series/studies are removed too."""
        if not pks:
            return
        self.clear_cache()
        ti, ts, tst = Instance.__table__, Series.__table__, Study.__table__
        conn.execute(delete(ti).where(ti.c.id.in_(list(pks))))
        conn.execute(delete(ts).where(~select(ti.c.id).where(ti.c.series_pk == ts.c.id).exists()))
        conn.execute(delete(tst).where(~select(ts.c.id).where(ts.c.study_pk == tst.c.id).exists()))

    # -- reads ---------------------------------------------------------------------
    def _instance_select(self) -> Any:
        ti, ts, tst = Instance.__table__, Series.__table__, Study.__table__
        return (
            select(ti.c.id, ti.c.sop_instance_uid, ti.c.sop_class_uid,
                   ts.c.series_instance_uid, tst.c.study_instance_uid,
                   ti.c.transfer_syntax_uid, ti.c.file_path, ti.c.file_size, ti.c.sha256,
                   ti.c.received_at, ti.c.calling_ae)
            .join(ts, ti.c.series_pk == ts.c.id)
            .join(tst, ts.c.study_pk == tst.c.id)
        )

    @staticmethod
    def _row(r: Any) -> IndexedInstance:
        return IndexedInstance(
            pk=r[0], sop_instance_uid=r[1], sop_class_uid=r[2], series_instance_uid=r[3],
            study_instance_uid=r[4], transfer_syntax_uid=r[5], file_path=r[6],
            file_size=r[7], sha256=r[8], received_at=r[9], calling_ae=r[10],
        )

    def get_instance(self, sop_instance_uid: str, conn: Connection | None = None
                     ) -> IndexedInstance | None:
        """The indexed instance with this SOP Instance UID, or None."""
        stmt = self._instance_select().where(
            Instance.__table__.c.sop_instance_uid == sop_instance_uid)
        if conn is not None:
            r = conn.execute(stmt).first()
        else:
            with self.engine.connect() as c:
                r = c.execute(stmt).first()
        return None if r is None else self._row(r)

    def instances(self, *, study_instance_uid: str | None = None,
                  series_instance_uid: str | None = None) -> list[IndexedInstance]:
        """Instances, optionally of one study or series, in received order."""
        stmt = self._instance_select()
        if study_instance_uid is not None:
            stmt = stmt.where(Study.__table__.c.study_instance_uid == study_instance_uid)
        if series_instance_uid is not None:
            stmt = stmt.where(Series.__table__.c.series_instance_uid == series_instance_uid)
        stmt = stmt.order_by(Instance.__table__.c.id)
        with self.engine.connect() as c:
            return [self._row(r) for r in c.execute(stmt)]

    def received_before(self, cutoff: datetime, limit: int = 1000) -> list[IndexedInstance]:
        """Instances received before ``cutoff`` (retention candidates), oldest first."""
        ti = Instance.__table__
        stmt = (self._instance_select().where(ti.c.received_at < cutoff)
                .order_by(ti.c.received_at).limit(limit))
        with self.engine.connect() as c:
            return [self._row(r) for r in c.execute(stmt)]

    def file_paths(self) -> set[str]:
        """Every file path the index references."""
        ti = Instance.__table__
        with self.engine.connect() as c:
            return {r[0] for r in c.execute(select(ti.c.file_path))}

    def references(self, file_path: str) -> bool:
        """Whether an instance row points at ``file_path``."""
        ti = Instance.__table__
        with self.engine.connect() as c:
            return c.execute(select(ti.c.id).where(ti.c.file_path == file_path)).first() is not None

    def owners(self, study_instance_uid: str, series_instance_uid: str,
               conn: Connection | None = None
               ) -> tuple[tuple[str, str] | None, str | None]:
        """Who the index files a study and a series under: the study's (Patient ID,
        Issuer of Patient ID), and the Study Instance UID the series belongs to (None
        where not indexed). Ingest refuses an instance that contradicts either; with
        ``conn`` the lookup runs in the caller's transaction (sees its own inserts)."""
        if conn is None:
            with self.engine.connect() as c:
                return self.owners(study_instance_uid, series_instance_uid, c)
        sql = self._sql(conn)  # on the DBAPI cursor: every new series asks, twice
        pat = self._one(conn, sql["owner"], (study_instance_uid,))
        study = self._one(conn, sql["series_study"], (series_instance_uid,))
        return ((str(pat[0]), str(pat[1])) if pat is not None else None,
                str(study[0]) if study is not None else None)

    def count_instances(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(Instance.__table__)).scalar_one())

    def studies(self, limit: int = 100) -> list[StudySummary]:
        """Most recently updated studies with their counts."""
        ti, ts, tst, tp = (Instance.__table__, Series.__table__, Study.__table__,
                           Patient.__table__)
        stmt = (
            select(tst.c.id, tst.c.study_instance_uid, tp.c.patient_id, tp.c.patient_name,
                   tst.c.study_date, tst.c.accession_number, tst.c.study_description,
                   tst.c.updated_at)
            .join(tp, tst.c.patient_pk == tp.c.id)
            .order_by(tst.c.updated_at.desc())
            .limit(limit)
        )
        out: list[StudySummary] = []
        with self.engine.connect() as c:
            rows = c.execute(stmt).all()
            for r in rows:
                series = c.execute(
                    select(ts.c.modality, func.count(ti.c.id))
                    .join(ti, ti.c.series_pk == ts.c.id, isouter=True)
                    .where(ts.c.study_pk == r.id)
                    .group_by(ts.c.id, ts.c.modality)
                ).all()
                mods = tuple(sorted({m for m, _ in series if m}))
                out.append(StudySummary(
                    study_instance_uid=r.study_instance_uid, patient_id=r.patient_id,
                    patient_name=r.patient_name, study_date=r.study_date,
                    accession_number=r.accession_number,
                    study_description=r.study_description, modalities=mods,
                    n_series=len(series), n_instances=sum(n for _, n in series),
                    updated_at=r.updated_at,
                ))
        return out

