"""Job state machine, claims under concurrency, retries, sweeper; SQLite and PostgreSQL."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from audit.ledger import Ledger
from node.db import make_engine
from node.pipeline import tables
from node.pipeline.jobs import (
    InvalidTransition,
    JobKind,
    JobState,
    JobStore,
    TransientJobError,
    WorkerPool,
    run_job,
)
from node.pipeline.specs import DispatchJobSpec, EngineJobSpec, InvalidJobSpec

#: minimal valid specs for state machine tests that do not run a handler
ENGINE = EngineJobSpec(fingerprint="f" * 64)
DISPATCH = DispatchJobSpec(destination="pacs")


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
                        spec={"fingerprint": "f" * 64, "params": {"steps": 2}}, seed=5)
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
    jid = store.enqueue("dispatch", spec=DISPATCH, max_attempts=2)
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
    ids = {store.enqueue("engine", spec=ENGINE) for _ in range(12)}
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
    jid = store.enqueue("engine", spec=ENGINE, max_attempts=3)
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
    from node.pipeline.jobs import run_job

    jid = store.enqueue("engine", spec=ENGINE, max_attempts=3)
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

    a = store.enqueue("engine", spec=ENGINE)
    b = store.enqueue("dispatch", spec=DISPATCH, max_attempts=3)
    pool = WorkerPool(store, {JobKind.ENGINE: ok, JobKind.DISPATCH: flaky}, backoff_s=0.0)
    pool.drain()
    assert store.get(a).state is JobState.SUCCEEDED and calls == [a]
    jb = store.get(b)
    assert jb.state is JobState.SUCCEEDED and jb.attempts == 2
    c = store.enqueue("engine", spec=ENGINE)

    def boom(job):  # type: ignore[no-untyped-def]
        raise ValueError("bad input")

    WorkerPool(store, {JobKind.ENGINE: boom}).drain()
    jc = store.get(c)
    assert jc.state is JobState.FAILED and "ValueError: bad input" in (jc.error or "")
    assert store.counts() == {"succeeded": 2, "failed": 1}


def test_worker_pool_threads(store: JobStore) -> None:
    done = threading.Event()
    ids = [store.enqueue("engine", spec=ENGINE) for _ in range(3)]

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
    from node.cli import app
    from node.pipeline.broker import BrokerPool
    from node.pipeline.orchestrator import Pipeline

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
    jid = local.jobs.enqueue("engine", spec=ENGINE)
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


# -- what the job ledger events carry for lineage (issue 6) --------------------------------
L_STUDY = "1.2.826.0.1.3680043.8.498.77"
L_SRC = L_STUDY + ".1"
L_OUT = L_STUDY + ".9001"


def _fake_dispatcher(store: JobStore, fail_first: bool):  # type: ignore[no-untyped-def]
    """The real Dispatcher (it writes the dispatch.* events) with an in-memory sender."""
    from config.sections.pipeline import Destination
    from node.dispatch.base import Failure, Sender, SendReport
    from node.dispatch.dispatcher import Dispatcher

    calls = []

    class FakeSender(Sender):
        def send(self, datasets):  # type: ignore[no-untyped-def]
            calls.append(len(datasets))
            uids = [str(ds.SOPInstanceUID) for ds in datasets]
            if fail_first and len(calls) == 1:
                return SendReport(failed={u: Failure("peer down", True) for u in uids})
            return SendReport(acknowledged=uids)

    dest = Destination(name="pacs", kind="dimse", ae_title="PACS", host="127.0.0.1", port=11112,
                       accepts_synthetic=True)
    return Dispatcher([dest], ledger=store.ledger, watermark=lambda ds: True,
                      sender_factory=lambda d, ae: FakeSender(d, ae))


def _instances(series_uid: str, n: int):  # type: ignore[no-untyped-def]
    from pydicom.dataset import Dataset

    out = []
    for i in range(n):
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = L_STUDY, series_uid
        ds.SOPInstanceUID = f"{series_uid}.{i}"
        out.append(ds)
    return out


def _run_pipeline_ledger(store: JobStore, model: str | None) -> tuple[str, list[str]]:
    """Source received -> engine job (JobStore) -> output.created -> two dispatch jobs
    (JobStore, parent = the engine job) sending through the Dispatcher, one after a failed
    attempt. Returns the engine job id and the dispatch job ids."""
    from audit.events import Event, EventType

    for ds in _instances(L_SRC, 3):
        store.ledger.append(Event(EventType.INSTANCE_RECEIVED, "ae:CT01", subject={
            "study_uid": L_STUDY, "series_uid": L_SRC, "sop_uid": str(ds.SOPInstanceUID)},
            payload={"sha256": "00" * 32, "source": "dimse"}))
    eid = store.enqueue(JobKind.ENGINE, study_uid=L_STUDY, series_uid=L_SRC, rule="r",
                        task="ct_denoise", spec={"fingerprint": "f" * 64, "model": model}, seed=7)
    job = store.claim(kinds=(JobKind.ENGINE,))
    assert job is not None and job.id == eid
    outs = _instances(L_OUT, 2)
    for ds in outs:  # the pipeline stores its output through ingest: instance.received too
        store.ledger.append(Event(EventType.INSTANCE_RECEIVED, "component:pipeline", subject={
            "study_uid": L_STUDY, "series_uid": L_OUT, "sop_uid": str(ds.SOPInstanceUID)},
            payload={"sha256": "11" * 32, "source": "pipeline"}))
    store.ledger.append(Event(EventType.OUTPUT_CREATED, "component:pipeline", subject={
        "job_id": eid, "study_uid": L_STUDY, "series_uid": L_OUT, "model_id": "ct-denoise-wreg"},
        payload={"source_series_uids": [L_SRC], "output_series_uid": L_OUT,
                 "output_sop_uids": [str(d.SOPInstanceUID) for d in outs], "output_format": "sc",
                 "watermark_payload": "0a0b0c", "model_id": "ct-denoise-wreg"}))
    store.finish(eid, {"outputs": [L_OUT], "held": [], "model_id": "ct-denoise-wreg",
                       "model_version": "1.1.0", "weights_sha256": "ab" * 32, "seed": 7},
                 claim=job)
    dids = []
    for fail_first in (True, False):
        did = store.enqueue(JobKind.DISPATCH, study_uid=L_STUDY, series_uid=L_OUT, rule="r",
                            task="ct_denoise", spec={"destination": "pacs"}, parent_id=eid)
        dids.append(did)
        disp = _fake_dispatcher(store, fail_first)
        for attempt in (1, 2):
            dj = store.claim(kinds=(JobKind.DISPATCH,), job_id=did)
            assert dj is not None
            res = disp.send(outs, "pacs", job_id=did, attempt=attempt, terminal=False)
            if res.acknowledged:
                store.finish(did, {"destination": "pacs"}, claim=dj)
                break
            store.fail(did, res.reason, transient=True, claim=dj)
    return eid, dids


@pytest.mark.parametrize("model", ["ct-denoise-wreg", None], ids=["rule_model", "task_default"])
def test_job_events_name_the_model(store: JobStore, model: str | None) -> None:
    eid, _ = _run_pipeline_ledger(store, model)
    evs = {e.event.type.value: e.event for e in store.ledger.entries()
           if e.event.subject.get("job_id") == eid and e.event.type.value.startswith("job.")}
    # the rule's model from the start; a task default only once the engine resolved it
    assert evs["job.queued"].subject.get("model_id") == model
    assert evs["job.started"].subject.get("model_id") == model
    fin = evs["job.finished"]
    assert fin.subject["model_id"] == "ct-denoise-wreg"
    assert fin.payload["model_version"] == "1.1.0" and fin.payload["weights_sha256"] == "ab" * 32
    # dispatch jobs carry no model, but their destination
    for e in store.ledger.entries():
        if e.event.type.value == "job.queued" and e.event.payload.get("kind") == "dispatch":
            assert "model_id" not in e.event.subject
            assert e.event.payload["destination"] == "pacs"
            if not e.event.payload.get("requeued"):  # enqueue, not a transient requeue
                assert e.event.payload["parent_id"] == eid


@pytest.mark.parametrize("start", ["study", "src", "src_sop", "engine_job", "out", "out_sop",
                                   "dispatch_job"])
def test_lineage_tree_source_job_output_dispatch(store: JobStore, start: str) -> None:
    """With the events node/pipeline/jobs.py and node/dispatch/ really write, lineage hangs every
    dispatch under the output series it sent; dispatch jobs are not jobs of the tree."""
    from rich.console import Console

    from audit.export import lineage
    from node.audit_views import lineage_tree

    eid, dids = _run_pipeline_ledger(store, None)
    uid = {"study": L_STUDY, "src": L_SRC, "src_sop": L_SRC + ".1", "engine_job": eid,
           "out": L_OUT, "out_sop": L_OUT + ".0", "dispatch_job": dids[1]}[start]
    tree = lineage(store.ledger, uid)
    assert [s["series_uid"] for s in tree["sources"]] == [L_SRC]  # the output is not a source
    (job,) = tree["jobs"]
    assert job["job_id"] == eid and job["task"] == "ct_denoise"
    assert (job["model_id"], job["model_version"], job["weights_sha256"]) == (
        "ct-denoise-wreg", "1.1.0", "ab" * 32)
    assert job["source_series_uids"] == [L_SRC]
    assert [e["type"] for e in job["events"]] == ["job.queued", "job.started", "job.finished"]
    (out,) = job["outputs"]
    assert out["series_uid"] == L_OUT and out["sop_uids"] == 2
    types = [(d["job_id"], d["type"]) for d in out["dispatches"]]
    assert types == [(dids[0], "dispatch.attempted"), (dids[0], "dispatch.failed"),
                     (dids[0], "dispatch.attempted"), (dids[0], "dispatch.succeeded"),
                     (dids[1], "dispatch.attempted"), (dids[1], "dispatch.succeeded")]
    assert out["dispatches"][1]["state"] == "retry_scheduled"
    assert {d["destination"] for d in out["dispatches"]} == {"pacs"}
    assert [(d["job_id"], d["destination"], d["state"]) for d in out["dispatch_jobs"]] == [
        (dids[0], "pacs", "succeeded"), (dids[1], "pacs", "succeeded")]
    assert tree["unattached_dispatches"] == []

    console = Console(record=True, width=250, color_system=None)
    console.print(lineage_tree(tree))
    text = console.export_text()
    lines = text.splitlines()

    def at(needle: str) -> tuple[int, int]:
        (i,) = [k for k, line in enumerate(lines) if needle in line]
        return i, len(lines[i]) - len(lines[i].lstrip("│├└─ "))

    src, job_l, out_l = at(f"source series {L_SRC}"), at(f"engine job {eid}"), at(f"output series {L_OUT}")
    dest = at("-> pacs")
    assert src[0] < job_l[0] < out_l[0] < dest[0]  # source -> job -> output -> destination
    assert src[1] < job_l[1] < out_l[1] < dest[1]  # each one level deeper
    assert "model ct-denoise-wreg 1.1.0" in lines[job_l[0]]
    assert "model not recorded" not in text and "None" not in lines[job_l[0]]
    assert text.count("dispatch.succeeded") == 2 and "engine jobs whose source" not in text
    for did in dids:  # each dispatch job one level under the destination, its events below
        line = at(f"dispatch job {did[:8]} succeeded")
        assert dest[0] < line[0] and line[1] > dest[1]


def test_specs_are_validated_when_a_job_is_created(store: JobStore) -> None:
    with pytest.raises(InvalidJobSpec, match="fingerprint"):
        store.enqueue(JobKind.ENGINE, spec={"params": {}})  # no source fingerprint
    with pytest.raises(InvalidJobSpec, match="destinaton"):
        store.enqueue(JobKind.DISPATCH, spec={"destinaton": "pacs"})  # typo: unknown key
    with pytest.raises(InvalidJobSpec, match="output_format"):
        store.enqueue(JobKind.ENGINE, spec={"fingerprint": "f", "output_format": "png"})
    assert store.list() == [] and _types(store) == []  # nothing written
    jid = store.enqueue(JobKind.ENGINE, spec={"fingerprint": "f", "destinations": ["a", "b"]})
    spec = store.get(jid).engine_spec
    assert spec.destinations == ("a", "b") and spec.output_format == "sc" and spec.model is None
    with pytest.raises(InvalidJobSpec, match="not a dispatch job"):
        store.get(jid).dispatch_spec


def test_a_job_whose_stored_spec_is_invalid_fails_at_claim_without_running(
        store: JobStore) -> None:
    jid = store.enqueue(JobKind.DISPATCH, spec=DISPATCH)
    with store.engine.begin() as c:  # a row written by another version, or edited by hand
        c.execute(tables.jobs.update().where(tables.jobs.c.id == jid)
                  .values(spec='{"destination": 5, "extra": 1}'))
    ran: list[str] = []
    job = store.claim()
    assert job is not None
    done = run_job(store, {JobKind.DISPATCH: lambda j: ran.append(j.id) or {}}, job)
    assert ran == [] and done.state is JobState.FAILED
    assert done.error is not None and "invalid dispatch job spec" in done.error
