"""Durable ingest of one received object: the C-STORE SCP and the pipeline (which stores
its outputs through it) use it, and so does any other receiving service (STOW-RS).

Order::

    check encoding + keys -> temp file -> rename
        -> at once: { fsync(file), fsync(dir) }  and  ONE transaction
                    { index rows + ledger entry + landing row }
        -> both done -> success

Only after the file, its directory entry and that transaction are all on disk does the
caller answer success. The flushes and the commit run at the same time (one round of
disk waits instead of three, bench/results/ingest.md); the landing row, removed by a
later transaction once the flushes are confirmed, lets start-up recovery check by
SHA-256 any file whose flush a crash may have cut short (``node.app.recover``): such an
instance was never acknowledged, so it is rolled back (``instance.rolled_back``). Bad input raises
:class:`IngestError` with a :class:`RejectReason` after a ``instance.rejected`` ledger
entry; each transport maps the reason to its status at exactly one boundary
(DIMSE: :mod:`node.dimse.store`).

What is stored is exactly what was sent: the data set bytes in the negotiated transfer
syntax, behind a File Meta Information header built here (PS3.10 7.1). The file meta
holds no sender-specific value, so an identical re-send gives an identical file (same
SHA-256) and is recognised as such.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError

from audit.events import Event, EventType, Outcome
from config.sections.dimse import DuplicatePolicy
from node.context import NodeContext
from node.dicom.encoding import EncodingError
from node.dicom.part10 import build_part10, split_part10
from node.ingest.attributes import index_record, text_value
from node.ingest.results import IngestError, IngestOutcome, RejectReason, StoredInstance
from node.ingest.validation import Limits, check_owners, validate
from node.observability.logs import bind_study, unbind_study
from storage.filestore import OutOfSpaceError, PendingWrite, StoreError, instance_rel_path
from storage.index import InstanceRecord

logger = logging.getLogger(__name__)

__all__ = ["GroupCommit", "Ingestor"]


# -- ingest -----------------------------------------------------------------------------
class _Pending:
    __slots__ = ("entry", "error", "event", "finished", "rec")

    def __init__(self, rec: InstanceRecord, event: Event):
        self.rec, self.event = rec, event
        self.finished = False
        self.entry: Any = None
        self.error: BaseException | None = None


@contextmanager
def _writer_lock(ctx: NodeContext) -> Iterator[None]:
    """On an SQLite file, the ingest transactions of all acceptor processes take turns on
    an advisory file lock: a waiter wakes the moment the writer before it finishes,
    where SQLite's own busy handler would sleep and retry (and a transaction that read
    before writing could fail at once on a stale snapshot). PostgreSQL needs none."""
    url = ctx.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        yield
        return
    key = (os.getpid(), url.database)  # flock is per open file: a forked child opens its own
    fd = _LOCK_FDS.get(key)
    if fd is None:
        fd = os.open(url.database + ".ingest-lock", os.O_RDWR | os.O_CREAT, 0o600)
        _LOCK_FDS[key] = fd
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


_LOCK_FDS: dict[tuple[int, str], int] = {}

#: data sets from this size on are hashed on a pool thread while they are validated
_HASH_AHEAD_BYTES = 64 * 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class GroupCommit:
    """Commits new instances' index rows + ledger entries, several per transaction when
    they arrive together (group commit).

    A caller whose instance is queued while another caller's transaction is running waits;
    when that transaction ends, one waiting caller commits everything queued meanwhile in
    ONE transaction (one WAL fsync, one ``Ledger.append_many``), and every caller returns
    only after the transaction holding its instance has committed. A lone caller commits
    at once, alone: no added latency. If a batch fails, its instances are retried one
    transaction each, so one bad instance cannot fail the others.
    """

    def __init__(self, ctx: NodeContext, max_batch: int = 64):
        self.ctx = ctx
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leader = False
        self._durable: list[str] = []  # file paths whose flushes completed

    def confirm(self, file_path: str) -> None:
        """The file of an instance this committer indexed is durable: its landing row is
        removed by the next transaction (no extra commit of its own)."""
        with self._cond:
            self._durable.append(file_path)

    def commit(self, rec: InstanceRecord, event: Event) -> Any:
        """Index ``rec`` and append ``event`` durably; returns the ledger entry. Raises
        what the transaction raised (IntegrityError for a duplicate SOP Instance UID)."""
        p = _Pending(rec, event)
        with self._cond:
            self._queue.append(p)
            while True:
                if p.finished:
                    break
                if not self._leader:
                    self._leader = True
                    batch = self._queue[:self.max_batch]
                    del self._queue[:self.max_batch]
                    break
                self._cond.wait()
        if not p.finished:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._leader = False
                    self._cond.notify_all()
        if p.error is not None:
            raise p.error
        return p.entry

    def _one(self, items: list[_Pending]) -> None:
        ctx = self.ctx
        with self._cond:
            confirmed, self._durable = self._durable, []
        try:
            with _writer_lock(ctx), ctx.engine.begin() as conn:
                for it in items:
                    rec = it.rec
                    # again inside the transaction (sees this batch's own rows): two
                    # senders of one new study under two Patient IDs cannot both get in
                    check_owners(ctx.index, rec.study_instance_uid, rec.series_instance_uid,
                                 rec.patient_id, rec.issuer_of_patient_id, conn)
                    ctx.index.add_instance(conn, rec)
                    ctx.index.add_landing(conn, rec)
                ctx.index.clear_landing(conn, confirmed)
                entries = ctx.ledger.append_many([it.event for it in items], conn=conn)
        except BaseException:
            with self._cond:  # not cleared: the next transaction tries again
                self._durable[:0] = confirmed
            raise
        for it, e in zip(items, entries, strict=True):  # one entry per event
            it.entry = e

    def _run(self, batch: list[_Pending]) -> None:
        try:
            self._one(batch)
        except Exception as exc:
            self.ctx.index.clear_cache()
            if len(batch) == 1:
                batch[0].error = exc
            else:
                for it in batch:
                    try:
                        self._one([it])
                    except Exception as one_exc:
                        self.ctx.index.clear_cache()
                        it.error = one_exc
        finally:
            for it in batch:
                it.finished = True


class Ingestor:
    """Durable ingest on a :class:`~node.context.NodeContext` (thread-safe)."""

    def __init__(self, ctx: NodeContext, limits: Limits | None = None):
        self.ctx = ctx
        self.limits = limits or Limits.from_settings(ctx.settings)
        self._commits = GroupCommit(ctx)
        # threads start on first use (acceptor children are new processes, not forks)
        self._hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest-hash")

    # public API -------------------------------------------------------------------
    def ingest_dataset(self, dataset: bytes, transfer_syntax: str, *,
                       sop_class_uid: str | None = None, sop_instance_uid: str | None = None,
                       calling_ae: str | None = None, called_ae: str | None = None,
                       peer: str | None = None, source: str = "dimse",
                       actor: str | None = None) -> StoredInstance:
        """Ingest one data set as sent (no file meta) in ``transfer_syntax``.

        ``sop_class_uid`` / ``sop_instance_uid`` are the Affected SOP Class / Instance
        UIDs of the C-STORE request; the data set must agree with them (PS3.4 B.2.1.1).
        ``actor``: who sent it, for the ledger (default ``ae:CALLING_AE`` or
        ``component:SOURCE``; STOW-RS passes ``token:NAME``).

        Raises
        ------
        IngestError
            After recording ``instance.rejected`` in the ledger.
        """
        actor = actor or (f"ae:{calling_ae}" if calling_ae else f"component:{source}")
        ctx_info = {"calling_ae": calling_ae, "called_ae": called_ae, "peer": peer,
                    "source": source, "transfer_syntax_uid": str(transfer_syntax),
                    "sop_class_uid": sop_class_uid, "sop_instance_uid": sop_instance_uid}
        t0 = time.perf_counter()
        obs = self.ctx.observability
        study_token = bind_study(None)  # _ingest names the study once parsed (JSON logs)
        try:
            info = self._ingest(dataset, str(transfer_syntax), sop_class_uid,
                                sop_instance_uid, calling_ae, called_ae, source, actor,
                                ctx_info)
        except IngestError as exc:
            self._record_rejection(exc, actor, ctx_info, len(dataset))
            if obs is not None:
                obs.metrics.observe_ingest(source, time.perf_counter() - t0, None,
                                           exc.reason.value)
            raise
        finally:
            unbind_study(study_token)
        if obs is not None:
            obs.metrics.observe_ingest(source, time.perf_counter() - t0, info.outcome.value,
                                       None, info.record.file_size)
        return info

    def ingest_part10(self, data: bytes, *, calling_ae: str | None = None,
                      called_ae: str | None = None, peer: str | None = None,
                      source: str = "stow", actor: str | None = None) -> StoredInstance:
        """Ingest a DICOM file (PS3.10), e.g. a part of a STOW-RS request or an output the
        pipeline built: the data set bytes after the file meta are stored unchanged."""
        try:
            meta, body = split_part10(data)
            ts = meta.get("TransferSyntaxUID")
            if not ts:
                raise EncodingError("file meta has no Transfer Syntax UID")
            sop_class = meta.get("MediaStorageSOPClassUID")
            sop_inst = meta.get("MediaStorageSOPInstanceUID")
        except Exception as exc:
            err = IngestError(RejectReason.UNPARSEABLE, f"cannot read file meta: {exc}"[:64])
            self._record_rejection(err, actor or f"component:{source}",
                                   {"source": source, "calling_ae": calling_ae}, len(data))
            if self.ctx.observability is not None:
                self.ctx.observability.metrics.observe_ingest(source, 0.0, None,
                                                              err.reason.value)
            raise err from None
        return self.ingest_dataset(body, str(ts), sop_class_uid=sop_class,
                                   sop_instance_uid=sop_inst, calling_ae=calling_ae,
                                   called_ae=called_ae, peer=peer, source=source,
                                   actor=actor)

    # internals ----------------------------------------------------------------------
    def _record_rejection(self, exc: IngestError, actor: str, info: dict[str, Any],
                          size: int) -> None:
        # subject keys as in the ledger vocabulary (audit.events): sop_uid, sop_class_uid
        subject = {"sop_uid": info.get("sop_instance_uid"),
                   "sop_class_uid": info.get("sop_class_uid")}
        subject = {k: str(v) for k, v in subject.items() if v}
        subject.update(info.get("parsed") or {})  # study, series, patient digests once read
        payload = {k: v for k, v in info.items() if v is not None
                   and k not in ("sop_instance_uid", "sop_class_uid", "parsed")}
        payload.update(reason=exc.reason.value, detail=exc.comment, size=size)
        outcome = (Outcome.SERIOUS_FAILURE if exc.reason in
                   (RejectReason.OUT_OF_SPACE, RejectReason.STORE_FAILED)
                   else Outcome.MINOR_FAILURE)
        logger.warning("instance rejected (%s): %s", exc.reason.value, exc.comment)
        try:
            self.ctx.ledger.append(Event(type=EventType.INSTANCE_REJECTED, actor=actor,
                                         outcome=outcome, subject=subject, payload=payload))
        except Exception:
            logger.exception("could not record the rejection in the ledger")

    def _parse(self, dataset: bytes, ts: str, sop_class_uid: str | None,
               sop_instance_uid: str | None) -> tuple[Dataset, bytes, str]:
        """Validate; the file to store and its SHA-256. When the request names the SOP
        class and instance (C-STORE, a STOW-RS part's file meta), the file is built from
        those and hashed on another thread while the data set is validated (hashlib
        releases the interpreter lock); validation refuses a data set whose UIDs differ,
        and the file is rebuilt from the data set's own UIDs should they differ in form."""
        hashing: Future[str] | None = None
        named = (sop_class_uid.strip(), sop_instance_uid.strip()) if (
            sop_class_uid and sop_instance_uid) else None
        part10, sha = b"", ""
        if named is not None and len(dataset) >= _HASH_AHEAD_BYTES:
            part10 = build_part10(dataset, *named, ts)
            hashing = self._hasher.submit(_sha256, part10)
        try:
            v = validate(dataset, ts, self.limits, sop_class_uid=sop_class_uid,
                         sop_instance_uid=sop_instance_uid)
        finally:
            if hashing is not None:
                sha = hashing.result()
        own = (text_value(v.probe, "SOPClassUID") or "",
               text_value(v.probe, "SOPInstanceUID") or "")
        if hashing is None or own != named:
            part10 = build_part10(dataset, *own, ts)
            sha = _sha256(part10)
        return v.probe, part10, sha

    def _patient_subject(self, rec: InstanceRecord) -> dict[str, str]:
        """Keyed digests of the record's Patient ID / Issuer and Accession Number (its study
        may not be committed yet, so the ledger hook could not look them up)."""
        refs = self.ctx.patients
        if refs is None:
            return {}
        return refs.subject(rec.patient_id, rec.issuer_of_patient_id, rec.accession_number)

    def _received_event(self, rec: InstanceRecord, actor: str, outcome: IngestOutcome) -> Event:
        return Event(
            type=EventType.INSTANCE_RECEIVED, actor=actor,
            subject={"study_uid": rec.study_instance_uid, "series_uid": rec.series_instance_uid,
                     "sop_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
                     **self._patient_subject(rec)},
            payload={"sha256": rec.sha256, "size": rec.file_size,
                     "transfer_syntax_uid": rec.transfer_syntax_uid, "file": rec.file_path,
                     "calling_ae": rec.calling_ae, "called_ae": rec.called_ae,
                     "source": rec.source, "result": outcome.value},
        )

    def _ingest(self, dataset: bytes, ts: str, sop_class_uid: str | None,
                sop_instance_uid: str | None, calling_ae: str | None, called_ae: str | None,
                source: str, actor: str, ctx_info: dict[str, Any]) -> StoredInstance:
        ctx = self.ctx
        probe, part10, sha = self._parse(dataset, ts, sop_class_uid, sop_instance_uid)
        study = text_value(probe, "StudyInstanceUID") or ""
        series = text_value(probe, "SeriesInstanceUID") or ""
        sop = text_value(probe, "SOPInstanceUID") or ""
        rel = instance_rel_path(study, series, sop, sha)
        rec = index_record(probe, ts, rel, len(part10), sha, calling_ae, called_ae, source)
        bind_study(study or None)
        ctx_info["parsed"] = {"study_uid": study, "series_uid": series,
                              **self._patient_subject(rec)}
        check_owners(ctx.index, study, series, rec.patient_id, rec.issuer_of_patient_id)
        policy = ctx.settings.dimse.duplicate_policy
        for attempt in range(4):
            # optimistic first attempt: a new SOP Instance (the common case) costs no
            # lookup; a duplicate shows up as an IntegrityError and is decided on retry
            existing = ctx.index.get_instance(sop) if attempt else None
            if existing is not None and existing.sha256 == sha:
                if not ctx.store.exists(existing.file_path):  # heal a lost file
                    self._write(existing.file_path, part10)
                entry = ctx.ledger.append(
                    self._received_event(rec, actor, IngestOutcome.IDENTICAL_DUPLICATE))
                return StoredInstance(IngestOutcome.IDENTICAL_DUPLICATE, rec, entry)
            if existing is not None and policy == DuplicatePolicy.REJECT:
                raise IngestError(RejectReason.DUPLICATE_CONFLICT,
                                  "SOP Instance UID stored with other content")
            if existing is not None and policy == DuplicatePolicy.KEEP_FIRST:
                self._record_rejection(
                    IngestError(RejectReason.DUPLICATE_CONFLICT, "kept the stored copy"),
                    actor, {"sop_instance_uid": sop, "sop_class_uid": rec.sop_class_uid,
                            "calling_ae": calling_ae, "policy": policy.value,
                            "received_sha256": sha, "parsed": ctx_info["parsed"]}, len(part10))
                return StoredInstance(IngestOutcome.KEPT_FIRST, rec, None)
            # a new instance: its flushes overlap the commit; a replacement: durable first
            pending = self._write_async(rel, part10, sha) if existing is None else None
            if pending is None:
                self._write(rel, part10)
            try:
                if existing is None:
                    outcome, old_path = IngestOutcome.STORED, None
                    entry = self._commits.commit(
                        rec, self._received_event(rec, actor, outcome))
                else:
                    with ctx.engine.begin() as conn:
                        _, old_path = ctx.index.replace_instance(conn, rec)
                        outcome = IngestOutcome.REPLACED
                        entry = ctx.ledger.append(self._received_event(rec, actor, outcome),
                                                  conn=conn)
            except IngestError:
                ctx.index.clear_cache()
                self._settle(pending)
                self._forget(rel)
                raise
            except IntegrityError:
                # another association indexed this SOP Instance UID meanwhile: decide again
                # (the file just written stays only if it is the one now indexed)
                ctx.index.clear_cache()
                self._settle(pending)
                self._forget(rel)
                continue
            except Exception as exc:
                logger.exception("index/ledger commit failed")
                ctx.index.clear_cache()
                self._settle(pending)
                self._forget(rel)
                raise IngestError(RejectReason.STORE_FAILED,
                                  f"index commit failed: {type(exc).__name__}") from None
            if pending is not None:
                self._confirm(pending, rec, actor)
            if old_path and old_path != rel:
                try:
                    ctx.store.delete(old_path)
                except Exception:
                    logger.exception("could not remove replaced file %s", old_path)
            info = StoredInstance(outcome, rec, entry)
            ctx.run_stored_hooks(info)
            return info
        raise IngestError(RejectReason.STORE_FAILED, "concurrent writers kept conflicting")

    def _write(self, rel: str, part10: bytes) -> None:
        try:
            self.ctx.store.write(rel, part10)
        except OutOfSpaceError as exc:
            raise IngestError(RejectReason.OUT_OF_SPACE, str(exc)[:64]) from None
        except StoreError as exc:
            logger.error("file store write failed: %s", exc)
            raise IngestError(RejectReason.STORE_FAILED, "file store write failed") from None

    def _write_async(self, rel: str, part10: bytes, sha: str) -> PendingWrite:
        try:
            return self.ctx.store.write_async(rel, part10, sha)
        except OutOfSpaceError as exc:
            raise IngestError(RejectReason.OUT_OF_SPACE, str(exc)[:64]) from None
        except StoreError as exc:
            logger.error("file store write failed: %s", exc)
            raise IngestError(RejectReason.STORE_FAILED, "file store write failed") from None

    @staticmethod
    def _settle(pending: PendingWrite | None) -> None:
        """Wait for a write's flushes whatever their outcome (before removing the file)."""
        if pending is not None:
            try:
                pending.wait()
            except StoreError:
                pass

    def _confirm(self, pending: PendingWrite, rec: InstanceRecord, actor: str) -> None:
        """Wait until the committed instance's file is durable; if a flush failed, take
        the instance out of the index again and refuse it (the sender gets no success)."""
        try:
            pending.wait()
        except StoreError as exc:
            logger.error("instance %s indexed but its file is not durable: %s",
                         rec.sop_instance_uid, exc)
            try:
                roll_back_instance(self.ctx, rec.file_path, rec.sop_instance_uid,
                                   rec.sha256, f"flush failed: {type(exc.__cause__).__name__}")
            except Exception:
                logger.exception("could not roll back %s; start-up recovery will",
                                 rec.sop_instance_uid)
            reason = (RejectReason.OUT_OF_SPACE if isinstance(exc, OutOfSpaceError)
                      else RejectReason.STORE_FAILED)
            raise IngestError(reason, "file store flush failed") from None
        self._commits.confirm(rec.file_path)

    def _forget(self, rel: str) -> None:
        """Remove a file written for a transaction that did not commit, unless the index
        references it (an identical object indexed by a concurrent association)."""
        try:
            if not self.ctx.index.references(rel):
                self.ctx.store.delete(rel)
        except Exception:
            logger.exception("could not clean up %s", rel)



def roll_back_instance(ctx: NodeContext, file_path: str, sop_instance_uid: str,
                       sha256: str, reason: str) -> bool:
    """Remove an indexed instance whose file never became durable (a failed flush, or a
    crash before its success status: its landing row, see :class:`GroupCommit`), with an
    ``instance.rolled_back`` ledger entry in the same transaction, then its file.
    Returns False if the index no longer points at ``file_path`` (nothing to undo)."""
    existing = ctx.index.get_instance(sop_instance_uid)
    with ctx.engine.begin() as conn:
        ctx.index.clear_landing(conn, [file_path])
        if existing is None or existing.file_path != file_path:
            return False
        ctx.index.delete_instances(conn, [existing.pk])
        ctx.ledger.append(Event(
            type=EventType.INSTANCE_ROLLED_BACK, actor="component:ingest",
            outcome=Outcome.SERIOUS_FAILURE,
            subject={"study_uid": existing.study_instance_uid,
                     "series_uid": existing.series_instance_uid,
                     "sop_uid": sop_instance_uid},
            payload={"reason": reason, "file": file_path, "sha256": sha256}), conn=conn)
    try:
        ctx.store.delete(file_path)
    except Exception:
        logger.exception("could not remove %s", file_path)
    return True
