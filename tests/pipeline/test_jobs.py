"""Job state machine, claims under concurrency, retries, sweeper; SQLite and PostgreSQL."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from audit.ledger import Ledger
from node import tables
from node.db import make_engine
from node.jobs import (
    InvalidTransition,
    JobKind,
    JobState,
    JobStore,
    TransientJobError,
    WorkerPool,
)


@pytest.fixture
def store(migrated_db: str) -> JobStore:
    engine = make_engine(migrated_db)
    return JobStore(engine, Ledger(engine), lease_s=60)


def _types(store: JobStore) -> list[str]:
    return [e.event.type.value for e in store.ledger.entries()]


def test_migration_matches_metadata(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), tables.metadata)
    ours = [d for d in diff if "pipeline_" in repr(d)]
    assert ours == []


def test_happy_path_and_ledger(store: JobStore) -> None:
    jid = store.enqueue(JobKind.ENGINE, study_uid="1.2.3", series_uid="1.2.3.4", task="ct_denoise",
                        spec={"params": {"steps": 2}}, seed=5)
    job = store.get(jid)
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.spec["params"]["steps"] == 2
    assert store.get(jid[:8]).id == jid  # unique prefix
    claimed = store.claim()
    assert claimed is not None and claimed.id == jid and claimed.state is JobState.RUNNING
    assert claimed.attempts == 1
    assert store.claim() is None
    done = store.finish(jid, {"outputs": ["1.2.9"]})
    assert done.state is JobState.SUCCEEDED and done.result == {"outputs": ["1.2.9"]}
    assert _types(store) == ["job.queued", "job.started", "job.finished"]
    with pytest.raises(InvalidTransition):
        store.cancel(jid)
    with pytest.raises(InvalidTransition):
        store.retry(jid)


def test_transient_requeue_then_terminal(store: JobStore) -> None:
    jid = store.enqueue("dispatch", max_attempts=2)
    store.claim()
    j = store.fail(jid, "peer down", transient=True, retry_after_s=3600)
    assert j.state is JobState.QUEUED and j.error == "peer down"
    assert store.claim() is None  # not before its backoff
    with store.engine.begin() as c:
        c.execute(tables.jobs.update().values(not_before=None))
    store.claim()
    j = store.fail(jid, "peer down again", transient=True)
    assert j.state is JobState.FAILED and j.attempts == 2  # attempts spent: terminal
    j = store.retry(jid)
    assert j.state is JobState.QUEUED and j.attempts == 0 and j.error is None
    store.cancel(jid)
    assert store.get(jid).state is JobState.CANCELLED
    assert store.claim() is None


def test_concurrent_claims_each_job_once(store: JobStore) -> None:
    ids = {store.enqueue("engine") for _ in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            j = store.claim()
            if j is None:
                return
            with lock:
                claimed.append(j.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_sweeper_requeues_dead_workers_job(store: JobStore) -> None:
    jid = store.enqueue("engine", max_attempts=3)
    store.claim(worker="dead-worker")
    assert store.requeue_expired() == []  # lease still valid
    later = datetime.now(timezone.utc) + timedelta(seconds=120)
    assert store.requeue_expired(now=later) == [jid]
    j = store.get(jid)
    assert j.state is JobState.QUEUED and "lease expired" in (j.error or "")


def test_worker_pool_runs_handlers(store: JobStore) -> None:
    calls: list[str] = []

    def ok(job):  # type: ignore[no-untyped-def]
        calls.append(job.id)
        return {"n": len(calls)}

    def flaky(job):  # type: ignore[no-untyped-def]
        if job.attempts < 2:
            raise TransientJobError("busy")
        return {"ok": True}

    a = store.enqueue("engine")
    b = store.enqueue("dispatch", max_attempts=3)
    pool = WorkerPool(store, {JobKind.ENGINE: ok, JobKind.DISPATCH: flaky}, backoff_s=0.0)
    pool.drain()
    assert store.get(a).state is JobState.SUCCEEDED and calls == [a]
    jb = store.get(b)
    assert jb.state is JobState.SUCCEEDED and jb.attempts == 2
    c = store.enqueue("engine")

    def boom(job):  # type: ignore[no-untyped-def]
        raise ValueError("bad input")

    WorkerPool(store, {JobKind.ENGINE: boom}).drain()
    jc = store.get(c)
    assert jc.state is JobState.FAILED and "ValueError: bad input" in (jc.error or "")
    assert store.counts() == {"succeeded": 2, "failed": 1}


def test_worker_pool_threads(store: JobStore) -> None:
    done = threading.Event()
    ids = [store.enqueue("engine") for _ in range(3)]

    def handler(job):  # type: ignore[no-untyped-def]
        if store.counts().get("queued", 0) == 0:
            done.set()
        return {}

    pool = WorkerPool(store, {JobKind.ENGINE: handler}, workers=2, poll_s=0.05)
    pool.start()
    try:
        assert done.wait(20)
        for _ in range(200):
            if all(store.get(i).state is JobState.SUCCEEDED for i in ids):
                break
            threading.Event().wait(0.05)
    finally:
        pool.stop()
    assert all(store.get(i).state is JobState.SUCCEEDED for i in ids)
