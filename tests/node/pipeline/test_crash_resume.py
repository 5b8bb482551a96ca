"""kill -9 of the process running an engine job: after restart the job resumes and
finishes once (one output series, one job.finished).

Partial outputs: an attempt that dies (kill -9, an exception, an interrupt) after storing
some instances of an output series but before the series is complete leaves nothing behind
once the job is retried or resumed: the partial series' files and index rows are removed
(``output.discarded`` in the ledger says which instances and why), exactly one complete
output series is stored and only it gets dispatch jobs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path

from sqlalchemy import select

from config.settings import load_settings
from engine.api import Provenance, TaskResult
from engine.research.baselines import nlm_ct
from node.app import build_context
from node.ingest.ingestor import Ingestor
from node.pipeline.jobs import JobKind, JobState
from node.pipeline.orchestrator import Pipeline
from node.pipeline.tables import outputs
from tests.support.factory import make_series

ROOT = Path(__file__).resolve().parents[3]
PIPELINE = {"quiet_period_s": 3600,
            "rules": [{"name": "ct", "match": {"modality": "CT"},
                       "tasks": [{"task": "ct_denoise", "output_format": "mf_word_sc"}]}]}

WORKER = textwrap.dedent("""
    import sys, time
    from config.settings import load_settings
    from node.app import build_context
    from node.pipeline.orchestrator import Pipeline
    settings = load_settings(None, environment="development", data_dir=sys.argv[1],
                             pipeline=eval(sys.argv[2]))
    ctx = build_context(settings, migrate=False, fsync=False)
    def slow(task, volume, params, seed, model):
        print("ENGINE STARTED", flush=True)
        time.sleep(600)
    Pipeline.from_context(ctx, runner=slow).pool.run_once()
""")


def nlm(task, volume, params, seed, model):  # type: ignore[no-untyped-def]
    out = nlm_ct()(volume)
    return TaskResult([out], Provenance(task, "baseline-nlm", "1", "0" * 64, params, seed,
                                        "cpu", 1, 0.0))


def test_kill9_mid_job_resumes_and_finishes_once(tmp_path: Path) -> None:
    data = tmp_path / "node"
    settings = load_settings(None, environment="development", data_dir=str(data), pipeline=PIPELINE)
    ctx = build_context(settings, fsync=False)
    pipe = Pipeline.from_context(ctx, runner=nlm)
    series = make_series(3, rows=64, cols=64)
    ing = Ingestor(ctx)
    for ds in series:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest_part10(buf.getvalue(), calling_ae="CT", source="dimse")
    study = str(series[0].StudyInstanceUID)
    pipe.complete_study(study)
    (job,) = pipe.jobs.list()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(data), repr(PIPELINE)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        seen: list[str] = []
        while time.monotonic() < deadline and not any("ENGINE STARTED" in x for x in seen):
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            seen.append(line)
        assert any("ENGINE STARTED" in x for x in seen), "".join(seen)[-3000:]
        running = pipe.jobs.get(job.id)
        assert running.state is JobState.RUNNING and running.worker.split(":")[1] == str(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # restart: the orphaned job is requeued at once (no lease wait) and finishes once
    assert pipe.jobs.requeue_orphans() == [job.id]
    assert pipe.pool.drain() == 1
    done = pipe.jobs.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.attempts == 2
    with ctx.engine.connect() as c:
        assert len(c.execute(select(outputs)).fetchall()) == 1
    types = [e.event.type.value for e in ctx.ledger.entries()
             if e.event.subject.get("job_id") == job.id]
    assert types.count("job.started") == 2 and types.count("job.finished") == 1
    # a job whose outputs were recorded before the crash is finished, not redone
    pipe.tracker.shutdown()


# -- partial output series -------------------------------------------------------------------
SC_PIPELINE = {
    "quiet_period_s": 3600,
    "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                      "port": 104, "accepts_synthetic": True}],
    "rules": [{"name": "ct", "match": {"modality": "CT"}, "destinations": ["pacs"],
               "tasks": [{"task": "ct_denoise", "output_format": "sc"}]}],
}
N_SLICES = 3  # single-frame SC output: one output instance per slice

PARTIAL_WORKER = textwrap.dedent("""
    import sys, time
    from dataclasses import replace
    from config.settings import load_settings
    from engine.api import Provenance, TaskResult
    from engine.research.baselines import nlm_ct
    from node.app import build_context
    from node.pipeline.orchestrator import Pipeline
    settings = load_settings(None, environment="development", data_dir=sys.argv[1],
                             pipeline=eval(sys.argv[2]))
    ctx = build_context(settings, migrate=False, fsync=False)
    def nlm(task, volume, params, seed, model):
        return TaskResult([nlm_ct()(volume)], Provenance(task, "baseline-nlm", "1", "0" * 64,
                                                         params, seed, "cpu", 1, 0.0))
    pipe = Pipeline.from_context(ctx, runner=nlm)
    ingest = pipe.parts.ingest
    def ingest_then_hang(data):
        stored = ingest(data)
        print("STORED ONE OUTPUT INSTANCE", flush=True)
        time.sleep(600)
    pipe.parts = replace(pipe.parts, ingest=ingest_then_hang)
    pipe.pool.run_once()
""")


class Crash(BaseException):
    """An interrupt no handler catches (the in-process stand-in for a dying worker)."""


def _sc_node(tmp_path: Path) -> tuple[object, Pipeline, str, str]:
    data = tmp_path / "node"
    settings = load_settings(None, environment="development", data_dir=str(data),
                             pipeline=SC_PIPELINE)
    ctx = build_context(settings, fsync=False)
    pipe = Pipeline.from_context(ctx, runner=nlm)
    series = make_series(N_SLICES, rows=64, cols=64)
    ing = Ingestor(ctx)
    for ds in series:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest_part10(buf.getvalue(), calling_ae="CT", source="dimse")
    study = str(series[0].StudyInstanceUID)
    pipe.complete_study(study)
    (job,) = pipe.jobs.list()
    return ctx, pipe, study, job.id


def _fail_after_first_store(pipe: Pipeline, exc: BaseException) -> list[str]:
    """Make the pipeline's ingest store one output instance, then raise ``exc``."""
    ingest = pipe.parts.ingest
    stored: list[str] = []

    def ingest_once(data: bytes):  # type: ignore[no-untyped-def]
        if stored:
            raise exc
        rec = ingest(data)
        stored.append(rec.record.series_instance_uid)
        return rec

    pipe.parts = replace(pipe.parts, ingest=ingest_once)
    return stored


def _output_rows(ctx) -> list:  # type: ignore[no-untyped-def]
    with ctx.engine.connect() as c:
        return c.execute(select(outputs)).fetchall()


def _our_instances(ctx, study: str) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """Output series in the node's index (what C-FIND / C-GET see) -> SOP Instance UIDs."""
    out: dict[str, list[str]] = {}
    for i in ctx.index.instances(study_instance_uid=study):
        if i.calling_ae is None:  # the pipeline's own ingest (no association)
            out.setdefault(i.series_instance_uid, []).append(i.sop_instance_uid)
    return out


def _assert_one_complete_output(ctx, pipe: Pipeline, study: str, job_id: str,  # type: ignore[no-untyped-def]
                                partial: str) -> None:
    job = pipe.jobs.get(job_id)
    assert job.state is JobState.SUCCEEDED, job.error
    (row,) = _output_rows(ctx)
    # output UIDs derive from source, model, parameters and attempt: a manual retry (attempt
    # 1 again) rebuilds the discarded partial series under its own UID, a resumed attempt
    # under a new one; either way one complete series with every instance
    assert row.state == "complete"
    if job.attempts > 1:
        assert row.series_uid != partial
    assert row.instances == N_SLICES and row.digest.startswith("sha256:")
    assert job.result["outputs"] == [row.series_uid]
    assert _our_instances(ctx, study) == {row.series_uid: _our_instances(ctx, study)[row.series_uid]}
    assert len(_our_instances(ctx, study)[row.series_uid]) == N_SLICES
    if row.series_uid != partial:
        assert ctx.index.instances(series_instance_uid=partial) == []
    # originals + one complete output series on disk, nothing else
    assert len(list(ctx.store.iter_files())) == 2 * N_SLICES
    dispatch = pipe.jobs.list(kind=JobKind.DISPATCH)
    assert [d.series_uid for d in dispatch] == [row.series_uid]
    created = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.created"]
    assert [e.subject["series_uid"] for e in created] == [row.series_uid]


def _discarded(ctx, partial: str) -> list:  # type: ignore[no-untyped-def]
    return [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.discarded"
            and e.event.subject["series_uid"] == partial]


def test_exception_after_first_stored_instance_leaves_no_partial_series(tmp_path: Path) -> None:
    ctx, pipe, study, job_id = _sc_node(tmp_path)
    original_ingest = pipe.parts.ingest
    stored = _fail_after_first_store(pipe, RuntimeError("injected store failure"))
    assert pipe.pool.run_once()
    job = pipe.jobs.get(job_id)
    assert job.state is JobState.FAILED and "injected store failure" in (job.error or "")
    (partial,) = stored
    # the failed attempt removed what it had stored, and said so
    assert _output_rows(ctx) == [] and _our_instances(ctx, study) == {}
    assert len(list(ctx.store.iter_files())) == N_SLICES
    (ev,) = _discarded(ctx, partial)
    assert len(ev.payload["sop_uids"]) == 1 and ev.payload["planned_instances"] == N_SLICES
    assert ev.payload["attempt"] == 1 and "injected store failure" in ev.payload["reason"]
    assert ev.subject["job_id"] == job_id
    assert pipe.jobs.list(kind=JobKind.DISPATCH) == []
    # manual retry with a working store: one complete series
    pipe.parts = replace(pipe.parts, ingest=original_ingest)
    pipe.jobs.retry(job_id)
    assert pipe.pool.run_once()
    _assert_one_complete_output(ctx, pipe, study, job_id, partial)
    pipe.tracker.shutdown()


def test_interrupted_attempt_partial_series_discarded_on_resume(tmp_path: Path) -> None:
    """An attempt that dies without any handler running (as kill -9 would) leaves its
    series ``building``; the start-up sweep leaves a running job's series alone, the resumed
    attempt discards it and builds the output once."""
    ctx, pipe, study, job_id = _sc_node(tmp_path)
    original_ingest = pipe.parts.ingest
    stored = _fail_after_first_store(pipe, Crash())
    try:
        pipe.pool.run_once()
    except Crash:
        pass
    else:
        raise AssertionError("the injected crash did not propagate")
    (partial,) = stored
    assert pipe.jobs.get(job_id).state is JobState.RUNNING  # nobody recorded the failure
    (row,) = _output_rows(ctx)
    assert row.series_uid == partial and row.state == "building" and row.attempt == 1
    assert list(_our_instances(ctx, study)) == [partial]  # visible until discarded
    assert pipe.discard_partial_outputs() == []  # job still running: not the sweep's to remove
    pipe.parts = replace(pipe.parts, ingest=original_ingest)
    assert pipe.jobs.requeue_expired(now=datetime.now(timezone.utc) + timedelta(days=1)) == [job_id]
    assert pipe.pool.run_once()
    _assert_one_complete_output(ctx, pipe, study, job_id, partial)
    (ev,) = _discarded(ctx, partial)
    assert len(ev.payload["sop_uids"]) == 1 and ev.payload["attempt"] == 1
    assert "attempt 2" in ev.payload["reason"]
    pipe.tracker.shutdown()


def test_start_up_sweep_discards_partial_series_of_a_cancelled_job(tmp_path: Path) -> None:
    ctx, pipe, study, job_id = _sc_node(tmp_path)
    original_ingest = pipe.parts.ingest
    stored = _fail_after_first_store(pipe, Crash())
    try:
        pipe.pool.run_once()
    except Crash:
        pass
    (partial,) = stored
    pipe.jobs.cancel(job_id, "operator cancelled a stuck job")
    pipe.start()  # a node start: the job is not running, its partial series goes
    pipe.stop()
    assert _output_rows(ctx) == [] and _our_instances(ctx, study) == {}
    assert len(list(ctx.store.iter_files())) == N_SLICES
    (ev,) = _discarded(ctx, partial)
    assert "start-up" in ev.payload["reason"]
    pipe.parts = replace(pipe.parts, ingest=original_ingest)
    pipe.jobs.retry(job_id)
    assert pipe.pool.run_once()
    _assert_one_complete_output(ctx, pipe, study, job_id, partial)


def test_kill9_after_first_stored_instance_partial_series_discarded(tmp_path: Path) -> None:
    ctx, pipe, study, job_id = _sc_node(tmp_path)
    data = tmp_path / "node"
    script = tmp_path / "worker.py"
    script.write_text(PARTIAL_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(data), repr(SC_PIPELINE)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 180
        seen: list[str] = []
        while time.monotonic() < deadline and not any("STORED ONE" in x for x in seen):
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            seen.append(line)
        assert any("STORED ONE" in x for x in seen), "".join(seen)[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    (row,) = _output_rows(ctx)
    partial = row.series_uid
    assert row.state == "building" and len(_our_instances(ctx, study)[partial]) == 1
    assert pipe.jobs.requeue_orphans() == [job_id]
    assert pipe.pool.run_once()  # the engine job only (dispatch jobs stay queued)
    _assert_one_complete_output(ctx, pipe, study, job_id, partial)
    (ev,) = _discarded(ctx, partial)
    assert len(ev.payload["sop_uids"]) == 1 and ev.payload["planned_instances"] == N_SLICES
    done = pipe.jobs.get(job_id)
    assert done.attempts == 2
    pipe.tracker.shutdown()


def test_attempt_storing_into_a_discarded_series_cleans_up_after_itself(tmp_path: Path) -> None:
    """An attempt that lost its claim (stalled past its lease) keeps storing into a series
    the next attempt already discarded: it cannot complete it, and removes the instances it
    stored afterwards, so no orphan instance stays in the index or on disk."""
    ctx, pipe, study, job_id = _sc_node(tmp_path)
    ingest = pipe.parts.ingest
    calls: list[str] = []

    def ingest_while_discarded(data: bytes):  # type: ignore[no-untyped-def]
        stored = ingest(data)
        calls.append(stored.record.series_instance_uid)
        if len(calls) == 1:  # the next attempt's start-of-job discard, as seen by this one
            assert pipe.discard_partial_outputs(job_id=job_id, reason="next attempt") == [
                stored.record.series_instance_uid]
        return stored

    pipe.parts = replace(pipe.parts, ingest=ingest_while_discarded)
    assert pipe.pool.run_once()
    job = pipe.jobs.get(job_id)
    assert job.state is JobState.FAILED and "was discarded while this attempt built it" in job.error
    assert len(calls) == N_SLICES
    assert _output_rows(ctx) == [] and _our_instances(ctx, study) == {}
    assert len(list(ctx.store.iter_files())) == N_SLICES
    first, second = _discarded(ctx, calls[0])
    assert len(first.payload["sop_uids"]) == 1 and first.payload["reason"] == "next attempt"
    assert len(second.payload["sop_uids"]) == N_SLICES - 1
    assert second.subject["job_id"] == job_id and second.payload["planned_instances"] is None
    assert pipe.jobs.list(kind=JobKind.DISPATCH) == []
    pipe.tracker.shutdown()


def test_job_cancelled_while_storing_releases_nothing(tmp_path: Path) -> None:
    """``synthnode jobs cancel`` of a running engine job: the attempt runs on, but its
    output series is not completed or dispatched; it is discarded and the job stays
    cancelled."""
    ctx, pipe, study, job_id = _sc_node(tmp_path)
    ingest = pipe.parts.ingest

    def ingest_then_cancel(data: bytes):  # type: ignore[no-untyped-def]
        stored = ingest(data)
        if pipe.jobs.get(job_id).state is JobState.RUNNING:
            pipe.jobs.cancel(job_id, "operator")
        return stored

    pipe.parts = replace(pipe.parts, ingest=ingest_then_cancel)
    assert pipe.pool.run_once()
    job = pipe.jobs.get(job_id)
    assert job.state is JobState.CANCELLED and job.error == "operator"
    assert _output_rows(ctx) == [] and _our_instances(ctx, study) == {}
    assert len(list(ctx.store.iter_files())) == N_SLICES
    assert pipe.jobs.list(kind=JobKind.DISPATCH) == []
    (ev,) = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.discarded"]
    assert len(ev.payload["sop_uids"]) == N_SLICES and "cancelled" in ev.payload["reason"]
    types = [e.event.type.value for e in ctx.ledger.entries()]
    assert "output.created" not in types and "job.failed" not in types
    pipe.tracker.shutdown()
