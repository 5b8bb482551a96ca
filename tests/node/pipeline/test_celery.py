"""Scale-out through Celery with real brokers and real ``synthnode worker`` processes.

RabbitMQ (``amqp://guest:guest@127.0.0.1:5672//``) and Redis (``redis://127.0.0.1:6379/0``)
must be running; unreachable: skip locally, fail in CI. Each test uses its own queue names
(uuid prefix) and deletes them afterwards. Most jobs are dispatch jobs of original series
to a real pynetdicom Storage SCP on loopback, which counts every instance it receives, so a
job run twice would show up as instances received twice (and ``attempts`` 2 in the job row).
``test_engine_job_through_the_broker`` runs the whole pipeline through a worker: a completed
study's engine job (a tiny model approved by the model gate) and the dispatch of its
synthetic series.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import ChannelError
from kombu import Connection
from pynetdicom import AE, AllStoragePresentationContexts, evt

from config.settings import load_settings
from node.app import build_context
from node.ingest.ingestor import Ingestor
from node.pipeline.broker import (
    BrokerPool,
    WorkerRuntime,
    make_celery,
    process_message,
    queue_names,
)
from node.pipeline.jobs import JobKind, JobState, JobStore
from tests.support.net import IN_CI, get_port, wait_for
from tests.support.factory import make_series

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
BROKERS = {
    "rabbitmq": os.environ.get("SYNTHNODE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//"),
    "redis": os.environ.get("SYNTHNODE_TEST_REDIS", "redis://127.0.0.1:6379/0"),
}


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    url = BROKERS[request.param]
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:  # noqa: BLE001 - any connection error means "no broker"
        msg = f"{request.param} broker not reachable at {url}: {exc}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return url


class StoragePeer:
    """A real Storage SCP on loopback counting each SOP Instance UID it receives."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.datasets: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.port = get_port()
        self.start()

    def start(self) -> None:
        ae = AE(ae_title="PEER")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        with self._lock:
            uid = str(event.request.AffectedSOPInstanceUID)
            self.received[uid] += 1
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.datasets[uid] = ds
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@dataclass
class ScaleOut:
    url: str
    prefix: str
    config: Path
    ctx: Any
    pool: BrokerPool
    peer: StoragePeer
    workdir: Path
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    @property
    def store(self) -> JobStore:
        return self.pool.store

    def dispatch_job(self, n: int = 3, max_attempts: int = 3) -> tuple[str, set[str]]:
        """Store a small original CT series and queue a dispatch job sending it to the peer."""
        series = make_series(n, 16, 16)
        ing = Ingestor(self.ctx)
        for ds in series:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ing.ingest_part10(buf.getvalue(), calling_ae="CT", called_ae="SYNTHNODE",
                              source="dimse")
        jid = self.store.enqueue(
            JobKind.DISPATCH, study_uid=str(series[0].StudyInstanceUID),
            series_uid=str(series[0].SeriesInstanceUID),
            spec={"destination": "peer", "original": True}, max_attempts=max_attempts)
        return jid, {str(ds.SOPInstanceUID) for ds in series}

    def start_worker(self, queues: str = "dispatch", concurrency: int = 1,
                     prelude: str = "") -> Path:
        """A ``synthnode worker`` subprocess; ``prelude``: Python run before it (fault
        injection)."""
        log = self.workdir / f"worker{len(self.workers)}.log"
        env = {**os.environ, "SYNTHNODE_CELERY_QUEUE_PREFIX": self.prefix,
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("SYNTHNODE_CONFIG", None)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", prelude + "\nfrom node.cli import main; main()", "worker",
                 "--queues", queues, "--concurrency", str(concurrency),
                 "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                start_new_session=True)
        self.workers.append((proc, log))
        return log

    def wait_state(self, job_id: str, state: JobState, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.store.get(job_id)
            if job.state is state:
                return job
            for proc, log in self.workers:
                if proc.poll() is not None:
                    pytest.fail(f"worker exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        logs = "\n".join(log.read_text()[-3000:] for _, log in self.workers)
        now = self.store.get(job_id).state.value
        pytest.fail(f"job {job_id} is {now}, not {state.value}\n{logs}")

    def message_count(self, kind: JobKind) -> int:
        with Connection(self.url) as conn:
            try:
                return int(conn.default_channel.queue_declare(
                    queue=queue_names(self.prefix)[kind], passive=True).message_count)
            except ChannelError:
                if self.url.startswith("redis"):  # an empty Redis queue is no key at all
                    return 0
                raise

    def purge(self, kind: JobKind) -> int:
        with Connection(self.url) as conn:
            return int(conn.default_channel.queue_purge(queue_names(self.prefix)[kind]) or 0)


@pytest.fixture
def scale_out(tmp_path: Path, broker_url: str) -> Iterator[ScaleOut]:
    peer = StoragePeer()
    prefix = f"synthnode-test-{uuid.uuid4().hex[:12]}-"
    config = tmp_path / "node.toml"
    config.write_text(f"""
environment = "development"
data_dir = "{tmp_path / 'node'}"

[pipeline]
broker_url = "{broker_url}"
quiet_period_s = 3600

[[pipeline.destinations]]
name = "peer"
kind = "dimse"
ae_title = "PEER"
host = "127.0.0.1"
port = {peer.port}
max_attempts = 3
backoff_s = 0.1
""")
    settings = load_settings(config)
    ctx = build_context(settings, fsync=False)
    app = make_celery(broker_url, prefix=prefix)
    pool = BrokerPool(JobStore(ctx.engine, ctx.ledger), broker_url, app=app, stale_after_s=3600)
    env = ScaleOut(broker_url, prefix, config, ctx, pool, peer, tmp_path)
    try:
        yield env
    finally:
        for proc, _ in env.workers:
            if proc.poll() is None:
                proc.terminate()  # Celery: warm shutdown
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(5)
        with Connection(broker_url) as conn:
            ch = conn.default_channel
            for name in queue_names(prefix).values():
                try:
                    ch.queue_delete(name)
                except Exception:  # noqa: BLE001 - never declared in this test
                    pass
        peer.stop()
        ctx.engine.dispose()


def test_worker_runs_job_and_sweeper_republishes_lost_message(scale_out: ScaleOut) -> None:
    env = scale_out
    lost, lost_uids = env.dispatch_job()
    # published, then lost before any worker saw it (broker purge)
    assert env.pool.publish_due() == [lost]
    assert env.purge(JobKind.DISPATCH) == 1
    first, first_uids = env.dispatch_job()
    assert env.pool.publish_due() == [first]  # the lost job counts as published: not re-sent
    env.start_worker("dispatch")
    job = env.wait_state(first, JobState.SUCCEEDED)
    assert job.attempts == 1 and job.result["acknowledged"] == len(first_uids)
    assert env.message_count(JobKind.DISPATCH) == 0
    assert env.store.get(lost).state is JobState.QUEUED  # its message is gone
    # sweeper: nothing is stale yet (idempotent), then re-publication of the lost job only
    assert env.pool.publish_due() == []
    assert env.pool.publish_due(stale_after_s=0) == [lost]
    job = env.wait_state(lost, JobState.SUCCEEDED)
    assert job.attempts == 1
    assert env.pool.publish_due(stale_after_s=0) == []  # no longer queued: nothing to send
    assert env.peer.received == Counter({u: 1 for u in first_uids | lost_uids})


def test_duplicate_messages_run_a_job_once(scale_out: ScaleOut) -> None:
    env = scale_out
    jid, uids = env.dispatch_job()
    for _ in range(3):  # a duplicate publication and a stale re-publication
        env.pool.publish(jid, JobKind.DISPATCH)
    log = env.start_worker("dispatch,engine", concurrency=2)
    job = env.wait_state(jid, JobState.SUCCEEDED)
    deadline = time.monotonic() + 60
    while log.read_text().count(f"job {jid} not claimable") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.read_text().count(f"job {jid} not claimable") == 2, log.read_text()[-3000:]
    assert job.attempts == 1
    assert env.store.get(jid).attempts == 1
    assert env.peer.received == Counter({u: 1 for u in uids})
    assert env.message_count(JobKind.DISPATCH) == 0


def test_message_for_finished_or_unknown_job_is_a_no_op(scale_out: ScaleOut) -> None:
    """The task body without a broker: the database decides what runs."""
    env = scale_out
    calls: list[str] = []

    def handler(job: Any) -> dict[str, Any]:
        calls.append(job.id)
        return {"ok": True}

    runtime = WorkerRuntime(env.store, {JobKind.DISPATCH: handler})
    jid = env.store.enqueue(JobKind.DISPATCH, spec={"destination": "peer"})
    assert process_message(runtime, jid) == "succeeded"
    assert process_message(runtime, jid) == "skipped"
    assert process_message(runtime, str(uuid.uuid4())) == "skipped"
    cancelled = env.store.enqueue(JobKind.DISPATCH, spec={"destination": "peer"})
    env.store.cancel(cancelled)
    assert process_message(runtime, cancelled) == "skipped"
    assert calls == [jid]


def test_worker_renews_the_lease_while_a_job_runs(scale_out: ScaleOut) -> None:
    """The node's sweeper must not requeue a job that is still running on a worker."""
    env = scale_out
    store = JobStore(env.ctx.engine, env.ctx.ledger, lease_s=1.5)  # heartbeat every 1 s
    swept: list[list[str]] = []

    def handler(job: Any) -> dict[str, Any]:
        time.sleep(2.2)  # longer than the lease
        swept.append(store.requeue_expired())
        return {}

    jid = store.enqueue(JobKind.DISPATCH, spec={"destination": "peer"})
    assert process_message(WorkerRuntime(store, {JobKind.DISPATCH: handler}), jid) == "succeeded"
    assert swept == [[]]
    assert store.get(jid).attempts == 1


def test_node_pipeline_publishes_queued_jobs_to_workers(
        scale_out: ScaleOut, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``broker_url`` set the node's pipeline publishes instead of running jobs."""
    from node.pipeline.orchestrator import Pipeline

    env = scale_out
    monkeypatch.setenv("SYNTHNODE_CELERY_QUEUE_PREFIX", env.prefix)
    pipe = Pipeline.from_context(env.ctx)
    assert isinstance(pipe.pool, BrokerPool)
    pipe.pool.sweep_every_s = 0.5
    jid, uids = env.dispatch_job()
    env.start_worker("dispatch")
    pipe.start()
    try:
        pipe.pool.wake()
        job = env.wait_state(jid, JobState.SUCCEEDED)
    finally:
        pipe.stop()
    assert job.attempts == 1
    assert env.peer.received == Counter({u: 1 for u in uids})


def test_transient_failure_is_retried_through_the_broker(
        scale_out: ScaleOut, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peer down: the worker requeues the job with a backoff, the node's sweeper publishes
    it again when due, and it is delivered once when the peer is back."""
    from node.pipeline.orchestrator import Pipeline

    env = scale_out
    env.peer.stop()
    monkeypatch.setenv("SYNTHNODE_CELERY_QUEUE_PREFIX", env.prefix)
    pipe = Pipeline.from_context(env.ctx)
    pipe.pool.sweep_every_s = 0.5
    jid, uids = env.dispatch_job(max_attempts=100)
    env.start_worker("dispatch")
    pipe.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = env.store.get(jid)
            if job.attempts >= 1 and job.state is JobState.QUEUED:
                break
            assert job.state in (JobState.QUEUED, JobState.RUNNING), job.error
            time.sleep(0.1)
        assert job.error and "peer" in job.error
        env.peer.start()
        job = env.wait_state(jid, JobState.SUCCEEDED)
    finally:
        pipe.stop()
    assert 2 <= job.attempts < 100
    assert env.peer.received == Counter({u: 1 for u in uids})


@dataclass
class EngineNode:
    """A node (test process) publishing to ``env``'s broker, its pipeline, its marking key."""

    env: ScaleOut
    pipe: Any
    wm_key: Any
    study: str


@pytest.fixture
def engine_node(tmp_path: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[Callable[..., EngineNode]]:
    """Factory: a node whose rule sends CT series through a tiny seeded, untrained
    ct_to_mr model approved by the model gate (quality gate off: untrained model) to a real
    Storage SCP, with ``broker_url`` set; a 4-slice CT study stored, not yet complete."""
    import tomli_w
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from audit.modelgate import public_key_b64
    from audit.watermark import WatermarkKey
    from node.pipeline.orchestrator import build_pipeline
    from tests.support.engine import approved_tiny_model

    made: list[EngineNode] = []

    # 256 px: the CT->MR output is background (0) outside the body outline, and in a 128 px
    # series of the untrained model the 2-unit mark is not verifiable; the pipeline refuses
    # to dispatch such an output (tests/node/pipeline/test_outcomes.py)
    def make(output_format: str = "mf_word_sc", size: int = 256, **pipeline: Any) -> EngineNode:
        peer = StoragePeer()
        prefix = f"synthnode-test-{uuid.uuid4().hex[:12]}-"
        approver = Ed25519PrivateKey.generate()
        models = tmp_path / "models"
        config = tmp_path / "node.toml"
        config.write_text(tomli_w.dumps({
            "environment": "development",
            "data_dir": str(tmp_path / "node"),
            "audit": {"approvers": [{"name": "tester",
                                     "public_key": public_key_b64(approver.public_key())}],
                      "models_dir": str(models)},
            "engine": {"device": "cpu"},
            # these tests are about the broker, leases and crashes, not the mark's robustness:
            # a bound that the untrained model's smooth output carries readably whatever the
            # (random) watermark key, so every output is verified and dispatched
            "watermark": {"other_max_delta": 16},
            "pipeline": {
                "broker_url": broker_url, "quiet_period_s": 3600, "broker_sweep_every_s": 0.5,
                "quality": {"enabled": False},
                "destinations": [{"name": "peer", "kind": "dimse", "ae_title": "PEER",
                                  "host": "127.0.0.1", "port": peer.port,
                                  "accepts_synthetic": True, "max_attempts": 3,
                                  "backoff_s": 0.5}],
                "rules": [{"name": "ct-to-mr", "match": {"modality": "CT"},
                           "tasks": [{"task": "ct_to_mr", "params": {"target": "t2w"},
                                      "output_format": output_format}],
                           "destinations": ["peer"]}],
                **pipeline,
            },
        }))
        settings = load_settings(config)
        wm_key = WatermarkKey.generate(key_id=7)
        settings.watermark_key_file.parent.mkdir(parents=True, exist_ok=True)
        wm_key.to_file(settings.watermark_key_file)
        monkeypatch.setenv("SYNTHNODE_CELERY_QUEUE_PREFIX", prefix)  # the node's queues
        ctx = build_context(settings, fsync=False)
        pipe = build_pipeline(ctx)
        assert isinstance(pipe.pool, BrokerPool) and pipe.pool.sweep_every_s == 0.5
        env = ScaleOut(broker_url, prefix, config, ctx, pipe.pool, peer, tmp_path)
        node = EngineNode(env, pipe, wm_key, "")
        made.append(node)
        approved_tiny_model(models, ctx.ledger, approver)
        series = make_series(4, rows=size, cols=size)
        node.study = str(series[0].StudyInstanceUID)
        ing = Ingestor(ctx)
        for ds in series:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ing.ingest_part10(buf.getvalue(), calling_ae="CT", called_ae="SYNTHNODE",
                              source="dimse")
        return node

    try:
        yield make
    finally:
        for node in made:
            env = node.env
            node.pipe.stop()
            for proc, _ in env.workers:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, 9)
                        proc.wait(5)
            with Connection(env.url) as conn:
                ch = conn.default_channel
                for name in queue_names(env.prefix).values():
                    try:
                        ch.queue_delete(name)
                    except Exception:  # noqa: BLE001 - never declared in this test
                        pass
            env.peer.stop()
            env.ctx.engine.dispose()


def _our_output_rows(ctx: Any) -> list[Any]:
    from sqlalchemy import select

    from node.pipeline.tables import outputs

    with ctx.engine.connect() as c:
        return c.execute(select(outputs)).fetchall()


@pytest.mark.slow
def test_engine_job_through_the_broker(engine_node: Callable[..., EngineNode]) -> None:
    """A study completes in the node, its engine job goes through the broker to a real
    ``synthnode worker`` process, which runs the gated engine (a tiny seeded, untrained
    ct_to_mr model approved by the model gate), stores the watermarked output series,
    queues and publishes its dispatch job and delivers the series to a real Storage SCP once.

    The model is untrained, so the quality gate is off here (it tests the plumbing, not the
    image; the gate's own tests are test_quality.py / test_pipeline.py)."""
    from audit.watermark import detect

    node = engine_node()
    env, pipe, ctx = node.env, node.pipe, node.env.ctx
    worker_log = env.start_worker("engine,dispatch")
    pipe.start()
    assert pipe.complete_study(node.study) is True
    (engine_job,) = pipe.jobs.list(kind=JobKind.ENGINE)
    job = env.wait_state(engine_job.id, JobState.SUCCEEDED, timeout=240)
    worker_pid = env.workers[0][0].pid
    assert job.attempts == 1 and job.worker.split(":")[1] == str(worker_pid)
    (out_series,) = job.result["outputs"]
    (dispatch,) = pipe.jobs.list(kind=JobKind.DISPATCH)
    assert dispatch.series_uid == out_series and dispatch.parent_id == job.id
    dispatch = env.wait_state(dispatch.id, JobState.SUCCEEDED, timeout=120)
    assert dispatch.attempts == 1 and dispatch.worker.split(":")[1] == str(worker_pid)
    # stored in the node once, delivered once, synthetic and marked
    (stored,) = ctx.index.instances(series_instance_uid=out_series)
    (row,) = _our_output_rows(ctx)
    assert row.series_uid == out_series and row.state == "complete"
    assert env.peer.received == Counter({stored.sop_instance_uid: 1})
    got = env.peer.datasets[stored.sop_instance_uid]
    assert got.SyntheticData == "YES" and got.Modality == "MR"
    assert got.StudyInstanceUID == node.study and int(got.NumberOfFrames) == 4
    assert detect(got.pixel_array, [node.wm_key]).marked
    types = [e.event.type.value for e in ctx.ledger.entries()]
    for t in ("study.completed", "job.queued", "model.loaded", "output.created",
              "job.finished", "dispatch.succeeded"):
        assert t in types, t
    # nothing left behind: a message the sweeper republished while the job was finishing is
    # a duplicate, consumed by the worker as a no-op (test_duplicate_messages_run_a_job_once)
    wait_for(lambda: env.message_count(JobKind.ENGINE) == 0
             and env.message_count(JobKind.DISPATCH) == 0, 30, "the queues drained")
    assert env.peer.received == Counter({stored.sop_instance_uid: 1})  # still delivered once
    text = worker_log.read_text()
    assert "Traceback" not in text and "DuplicateTaskNameWarning" not in text


#: worker fault injection: store the first output instance, say so, then hang (until kill -9)
HANG_AFTER_FIRST_OUTPUT = """
import time
from node.ingest.ingestor import Ingestor
_ingest = Ingestor.ingest_part10
def _hang(self, data, **kw):
    stored = _ingest(self, data, **kw)
    if kw.get("source") == "pipeline":
        print(f"STORED ONE OUTPUT INSTANCE OF {stored.record.series_instance_uid} .",
              flush=True)
        time.sleep(600)
    return stored
Ingestor.ingest_part10 = _hang
"""


@pytest.mark.slow
def test_worker_killed_mid_store_partial_series_discarded(
        engine_node: Callable[..., EngineNode]) -> None:
    """kill -9 of a worker after it stored the first instance of a single-frame output
    series: the node's sweeper requeues the job when its lease (``pipeline.lease_s`` = 3 s)
    expires and publishes it again; a second worker discards the partial series (files,
    index rows, ``output.discarded``), builds the output once and dispatches only it."""
    # single frames of 512 x 512: the mark must be verified in each instance to dispatch it
    # (at 256 px the untrained model's CT->MR, background 0 outside the body, is not)
    node = engine_node(output_format="sc", size=512, lease_s=3)
    env, pipe, ctx = node.env, node.pipe, node.env.ctx
    assert pipe.jobs.lease.total_seconds() == 3
    log = env.start_worker("engine", prelude=HANG_AFTER_FIRST_OUTPUT)
    pipe.start()
    assert pipe.complete_study(node.study) is True
    wait_for(lambda: pipe.jobs.list(kind=JobKind.ENGINE), 60, "the engine job queued")
    (job,) = pipe.jobs.list(kind=JobKind.ENGINE)
    deadline = time.monotonic() + 240
    hit = None
    while hit is None and time.monotonic() < deadline:
        assert env.workers[0][0].poll() is None, log.read_text()[-3000:]
        hit = re.search(r"STORED ONE OUTPUT INSTANCE OF ([0-9.]+) \.", log.read_text())
        time.sleep(0.2)
    assert hit is not None, log.read_text()[-3000:]
    partial = hit.group(1)
    (row,) = _our_output_rows(ctx)
    assert row.series_uid == partial and row.state == "building" and row.attempt == 1
    assert len(ctx.index.instances(series_instance_uid=partial)) == 1
    first, _ = env.workers.pop(0)
    os.killpg(first.pid, 9)
    first.wait(10)
    env.start_worker("engine,dispatch")
    second = env.workers[0][0]
    done = env.wait_state(job.id, JobState.SUCCEEDED, timeout=240)
    assert done.attempts == 2 and done.worker.split(":")[1] == str(second.pid)
    (out_series,) = done.result["outputs"]
    (row,) = _our_output_rows(ctx)
    assert row.series_uid == out_series != partial and row.state == "complete"
    assert ctx.index.instances(series_instance_uid=partial) == []
    outputs = {i.sop_instance_uid for i in ctx.index.instances(series_instance_uid=out_series)}
    assert len(outputs) == 4
    (dispatch,) = pipe.jobs.list(kind=JobKind.DISPATCH)
    assert dispatch.series_uid == out_series
    env.wait_state(dispatch.id, JobState.SUCCEEDED, timeout=120)
    assert env.peer.received == Counter({u: 1 for u in outputs})
    (ev,) = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.discarded"]
    assert ev.subject["series_uid"] == partial and len(ev.payload["sop_uids"]) == 1
    assert ev.payload["attempt"] == 1 and "attempt 2" in ev.payload["reason"]
    # originals + the complete output series on disk; the partial file is gone
    assert len(list(ctx.store.iter_files())) == 8
