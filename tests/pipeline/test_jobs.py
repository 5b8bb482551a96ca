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


def test_node_0003_upgrade_keeps_outputs_complete(db_url: str) -> None:
    """Outputs written before node_0003 become ``complete`` (never discarded as partial);
    the revision downgrades cleanly. SQLite (batch mode) and PostgreSQL."""
    from alembic import command
    from sqlalchemy import inspect, text

    from node.db import alembic_config, upgrade

    cfg = alembic_config(db_url)
    command.upgrade(cfg, "node_0002")
    command.upgrade(cfg, "heads")  # audit / storage branches
    command.downgrade(cfg, "node_0002")
    engine = make_engine(db_url)
    now = datetime.now(timezone.utc)
    with engine.begin() as c:
        c.execute(text(
            "INSERT INTO pipeline_jobs (id, kind, state, spec, attempts, max_attempts, generation,"
            " created_at, updated_at) VALUES ('j1', 'engine', 'succeeded', '{}', 1, 3, 0, :t, :t)"
        ), {"t": now})
        c.execute(text(
            "INSERT INTO pipeline_outputs (series_uid, job_id, study_uid, source_series_uid,"
            " generation, output_format, instances, held, superseded, created_at) VALUES"
            " ('1.2.3.9', 'j1', '1.2.3', '1.2.3.4', 0, 'sc', 3, false, false, :t)"), {"t": now})
    upgrade(db_url)
    with engine.connect() as c:
        row = c.execute(tables.outputs.select()).one()
    assert row.state == "complete" and row.attempt is None and row.instances == 3
    command.downgrade(cfg, "node_0002")
    cols = {c["name"] for c in inspect(engine).get_columns("pipeline_outputs")}
    assert "state" not in cols and "attempt" not in cols
    with engine.connect() as c:
        assert c.execute(text("SELECT series_uid FROM pipeline_outputs")).scalar() == "1.2.3.9"
    engine.dispose()


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


def test_stale_claim_cannot_record_an_outcome(store: JobStore) -> None:
    """A worker whose lease expired while it was still running (stalled, not dead) cannot
    finish, fail or renew the job another worker claimed since (fencing by attempt and
    worker); its run_job returns the current state instead of raising."""
    from node.jobs import run_job

    jid = store.enqueue("engine", max_attempts=3)
    stale = store.claim(worker="host:1:1")
    assert stale is not None and store.heartbeat(jid, claim=stale)
    later = datetime.now(timezone.utc) + timedelta(seconds=120)
    assert store.requeue_expired(now=later) == [jid]
    current = store.claim(worker="host:2:1")
    assert current is not None and current.attempts == 2
    assert not store.heartbeat(jid, claim=stale)
    for record in (lambda: store.finish(jid, {"from": "stale"}, claim=stale),
                   lambda: store.fail(jid, "stale error", claim=stale),
                   lambda: store.fail(jid, "stale busy", transient=True, claim=stale)):
        with pytest.raises(InvalidTransition, match="no longer current"):
            record()
    done = run_job(store, {JobKind.ENGINE: lambda job: {"from": "stale"}}, stale)
    assert done.state is JobState.RUNNING and done.worker == "host:2:1"
    assert store.heartbeat(jid, claim=current)
    finished = store.finish(jid, {"from": "current"}, claim=current)
    assert finished.state is JobState.SUCCEEDED and finished.result == {"from": "current"}
    assert _types(store).count("job.finished") == 1


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


def test_job_timing_settings_are_checked_and_wired(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``synthnode config check`` names bad timing keys; good ones reach the job store, the
    local pool and the broker sweeper (no broker connection is made to build them)."""
    from typer.testing import CliRunner

    from config.settings import load_settings
    from node.app import build_context
    from node.celery_app import BrokerPool
    from node.cli import app
    from node.pipeline import Pipeline

    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline]\nlease_s = 1\npoll_s = 0\nretry_backoff_s = -1\n"
                   "broker_sweep_every_s = 10\nbroker_stale_after_s = 2\n")
    r = CliRunner().invoke(app, ["config", "check", str(bad)])
    assert r.exit_code == 2
    for key in ("lease_s", "poll_s", "retry_backoff_s", "broker_stale_after_s"):
        assert f"pipeline.{key}" in r.output, r.output
    assert "broker_sweep_every_s (10)" in r.output
    good = {"lease_s": 30, "poll_s": 0.25, "retry_backoff_s": 0.5,
            "broker_sweep_every_s": 2, "broker_stale_after_s": 40}
    settings = load_settings(None, environment="development", data_dir=str(tmp_path / "n"),
                             pipeline=good)
    ctx = build_context(settings, fsync=False)
    local = Pipeline.from_context(ctx)
    assert local.jobs.lease == timedelta(seconds=30)
    assert local.pool.poll_s == 0.25 and local.pool.backoff_s == 0.5
    # the lease decides when the sweeper takes a job back from a silent worker
    jid = local.jobs.enqueue("engine")
    local.jobs.claim(worker="silent")
    now = datetime.now(timezone.utc)
    assert local.jobs.requeue_expired(now=now + timedelta(seconds=20)) == []
    assert local.jobs.requeue_expired(now=now + timedelta(seconds=31)) == [jid]
    local.tracker.shutdown()
    settings = load_settings(None, environment="development", data_dir=str(tmp_path / "n"),
                             pipeline={**good, "broker_url": "redis://127.0.0.1:1/0"})
    scaled = Pipeline.from_context(build_context(settings, fsync=False))
    assert isinstance(scaled.pool, BrokerPool)
    assert scaled.pool.stale_after_s == 40 and scaled.pool.sweep_every_s == 2
    assert scaled.jobs.lease == timedelta(seconds=30)
    scaled.tracker.shutdown()
    ctx.engine.dispose()
