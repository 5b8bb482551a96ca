"""kill -9 of the process running an engine job: after restart the job resumes and
finishes once (one output series, one job.finished)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from io import BytesIO
from pathlib import Path

from sqlalchemy import select

from config.settings import load_settings
from engine.api import Provenance, TaskResult
from engine.baselines import nlm_ct
from node.app import build_context
from node.ingest import Ingestor
from node.jobs import JobState
from node.pipeline import Pipeline
from node.tables import outputs
from tests.pipeline.factory import make_series

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = {"quiet_period_s": 3600,
            "rules": [{"name": "ct", "match": {"modality": "CT"},
                       "tasks": [{"task": "ct_denoise", "output_format": "mf_word_sc"}]}]}

WORKER = textwrap.dedent("""
    import sys, time
    from config.settings import load_settings
    from node.app import build_context
    from node.pipeline import Pipeline
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
