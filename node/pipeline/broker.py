"""Scale-out: the pipeline's jobs through Celery on RabbitMQ or Redis (issue 6, "Jobs").

The database job table (:mod:`node.pipeline.jobs`) stays the truth; the broker carries only
job ids.

* Publishing (:class:`BrokerPool`, the scale-out stand-in for the local
  :class:`~node.pipeline.jobs.WorkerPool`, chosen by
  :class:`~node.pipeline.orchestrator.Pipeline` when ``pipeline.broker_url`` is set): every
  runnable queued job is published once per queued state (the pair job id / ``updated_at``)
  to the ``engine`` queue (GPU workers) or the ``dispatch`` queue. A sweeper thread in the
  node also requeues jobs whose lease expired and re-publishes jobs that stayed queued more
  than ``stale_after_s`` after their last publication (the message was lost: broker restart,
  purge, a publish that never arrived). Both periods are configuration keys
  (``pipeline.broker_stale_after_s``, ``pipeline.broker_sweep_every_s``), as is the job
  lease (``pipeline.lease_s``).
* Consuming (task :data:`TASK_NAME`, run by ``synthnode worker``): the task claims the job
  with :meth:`JobStore.claim(job_id=...) <node.pipeline.jobs.JobStore.claim>` (one conditional
  ``UPDATE``), runs it with :func:`node.pipeline.jobs.run_job` and records the outcome through the
  same API. A message for a job that is not claimable (already running or finished, a
  duplicate, a stale re-publication, a retry whose ``not_before`` is still ahead) is a
  no-op, so re-publishing is always safe: a job runs once per claim, never twice. The
  worker renews the claim's lease every third of it; outcomes and lease renewals are fenced
  by the claim (attempt and worker), so a worker that lost its lease cannot record over the
  attempt that replaced it.

Messages are acknowledged late (``task_acks_late``) with a prefetch of 1, so a worker that
dies mid-job leaves its message to be redelivered; the redelivery finds the job ``running``
(a no-op) until the node's sweeper requeues it after its lease expires and publishes it again.

Queue names are ``<prefix>engine`` and ``<prefix>dispatch``; the prefix (default empty, from
``$SYNTHNODE_CELERY_QUEUE_PREFIX``) lets several nodes or test runs share one broker.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu import Queue
from sqlalchemy import or_, select

from node.pipeline.jobs import Handler, JobKind, JobState, JobStore, run_job, worker_name
from node.pipeline.tables import jobs

logger = logging.getLogger(__name__)

__all__ = [
    "QUEUE_PREFIX_ENV",
    "TASK_NAME",
    "BrokerPool",
    "WorkerRuntime",
    "make_celery",
    "process_message",
    "queue_names",
]

TASK_NAME = "synthnode.run_job"
QUEUE_PREFIX_ENV = "SYNTHNODE_CELERY_QUEUE_PREFIX"


def queue_names(prefix: str | None = None) -> dict[JobKind, str]:
    """Broker queue of each job kind: ``engine`` (GPU workers) and ``dispatch``."""
    prefix = os.environ.get(QUEUE_PREFIX_ENV, "") if prefix is None else prefix
    return {JobKind.ENGINE: f"{prefix}engine", JobKind.DISPATCH: f"{prefix}dispatch"}


@dataclass
class WorkerRuntime:
    """What the task needs in a worker process: the job store and one handler per kind
    (attached to the Celery app as ``app.synthnode`` by ``synthnode worker``)."""

    store: JobStore
    handlers: dict[JobKind, Handler]
    backoff_s: float = 5.0


def process_message(runtime: WorkerRuntime, job_id: str) -> str:
    """Handle one broker message: claim ``job_id`` in the database, run it, record it.

    Returns the job's state afterwards, or ``"skipped"`` when the job was not claimable
    (duplicate or stale message): the database, not the broker, decides what runs.
    """
    job = runtime.store.claim(kinds=tuple(runtime.handlers), job_id=job_id, worker=worker_name())
    if job is None:
        logger.info("job %s not claimable: message ignored (duplicate or stale)", job_id)
        return "skipped"
    # keep the lease fresh while the job runs: the node's sweeper requeues expired leases
    stop = threading.Event()
    every = max(1.0, runtime.store.lease.total_seconds() / 3)

    def beat() -> None:
        while not stop.wait(every):
            try:
                if not runtime.store.heartbeat(job.id, claim=job):
                    logger.warning("job %s: lease not renewed (no longer this worker's "
                                   "claim)", job.id)
                    return
            except Exception:
                logger.warning("lease heartbeat for job %s failed", job.id, exc_info=True)

    beater = threading.Thread(target=beat, name=f"lease-{job.id[:8]}", daemon=True)
    beater.start()
    try:
        done = run_job(runtime.store, runtime.handlers, job, backoff_s=runtime.backoff_s)
    finally:
        stop.set()
        beater.join(5)
    logger.info("job %s attempt %d -> %s", job.id, job.attempts, done.state.value)
    return done.state.value


def make_celery(broker_url: str, *, prefix: str | None = None) -> Celery:
    """A Celery app for ``broker_url`` (``amqp://...`` or ``redis://...``).

    Late acknowledgement, prefetch 1, JSON messages carrying only the job id, no result
    backend (the job table holds results).
    """
    names = queue_names(prefix)
    app = Celery("synthnode", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(n, routing_key=n) for n in names.values()],
        task_default_queue=names[JobKind.DISPATCH],
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # no remote control (pidbox): anyone who can publish on the broker could otherwise
        # shut down, reconfigure or inspect workers (celery inspect / control)
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        # a solo/threaded worker busy in a long engine job cannot answer AMQP heartbeats;
        # the lease in the database detects dead workers instead
        broker_heartbeat=0,
    )
    app.synthnode_queues = names  # type: ignore[attr-defined]

    # shared=False: a second app in the same process (the worker's pipeline publishes
    # dispatch jobs through its own) must not get this closure as a duplicate task
    @app.task(name=TASK_NAME, bind=True, ignore_result=True, shared=False)
    def run(self: Any, job_id: str) -> str:
        runtime: WorkerRuntime | None = getattr(self.app, "synthnode", None)
        if runtime is None:
            raise RuntimeError("worker started without a synthnode runtime (use synthnode worker)")
        return process_message(runtime, str(job_id))

    return app


class BrokerPool:
    """Scale-out replacement of :class:`~node.pipeline.jobs.WorkerPool` (same ``start`` / ``stop`` /
    ``wake`` / ``drain``): publishes queued job ids instead of running them.

    Parameters
    ----------
    store
        the job store.
    broker_url
        Celery broker URL.
    app
        an existing app from :func:`make_celery` (default: one built for ``broker_url``).
    stale_after_s
        a job still queued this long after its last publication is published again
        (``pipeline.broker_stale_after_s``).
    sweep_every_s
        period of the node's sweeper thread (requeue expired leases, publish due jobs;
        ``pipeline.broker_sweep_every_s``).
    """

    def __init__(self, store: JobStore, broker_url: str, *, app: Celery | None = None,
                 prefix: str | None = None, stale_after_s: float = 300.0,
                 sweep_every_s: float = 5.0) -> None:
        self.store = store
        self.app = app or make_celery(broker_url, prefix=prefix)
        self.queues: dict[JobKind, str] = self.app.synthnode_queues  # type: ignore[attr-defined]
        self.stale_after_s = stale_after_s
        self.sweep_every_s = sweep_every_s
        # job id -> (updated_at of the queued state published, monotonic publish time)
        self._published: dict[str, tuple[Any, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- WorkerPool interface ----------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self.store.requeue_expired()
        self._thread = threading.Thread(target=self._loop, name="synthnode-broker-sweeper",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New jobs were queued: publish them (at once when no sweeper thread runs, as in
        a worker process queuing dispatch jobs)."""
        if self._thread is not None and self._thread.is_alive():
            self._wake.set()
        else:
            self.publish_due()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, max_jobs: int = 1000) -> int:
        """Publish what is due; returns the number of messages sent (jobs run remotely)."""
        return len(self.publish_due()[:max_jobs])

    # -- publishing ----------------------------------------------------------------------
    def publish(self, job_id: str, kind: JobKind | str) -> None:
        """Send one message (the job id) to the kind's queue. Safe to repeat."""
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.queues[JobKind(kind)])

    def publish_due(self, *, stale_after_s: float | None = None,
                    now: datetime | None = None) -> list[str]:
        """Publish every runnable queued job not yet published in its current queued state,
        and re-publish those still queued ``stale_after_s`` after their last publication
        (lost message). Idempotent: a second call right after the first sends nothing, and
        surplus messages are no-ops in the workers. Returns the ids published."""
        stale = self.stale_after_s if stale_after_s is None else stale_after_s
        now = now or datetime.now(UTC)
        with self.store.engine.connect() as c:
            rows = c.execute(
                select(jobs.c.id, jobs.c.kind, jobs.c.updated_at)
                .where(jobs.c.state == JobState.QUEUED.value)
                .where(or_(jobs.c.not_before.is_(None), jobs.c.not_before <= now))
                .order_by(jobs.c.created_at)
            ).fetchall()
        sent: list[str] = []
        with self._lock:
            queued = {r.id for r in rows}
            for gone in set(self._published) - queued:  # claimed, finished or not yet due
                del self._published[gone]
            for r in rows:
                prev = self._published.get(r.id)
                mono = time.monotonic()
                if prev is not None and prev[0] == r.updated_at and mono - prev[1] < stale:
                    continue
                try:
                    self.publish(r.id, r.kind)
                except Exception:
                    logger.exception("could not publish job %s (will retry)", r.id)
                    break
                if prev is not None and prev[0] == r.updated_at:
                    logger.warning("job %s still queued %.0f s after publication: re-published",
                                   r.id, mono - prev[1])
                self._published[r.id] = (r.updated_at, mono)
                sent.append(r.id)
        return sent

    def sweep(self) -> tuple[list[str], list[str]]:
        """One sweeper pass: requeue running jobs whose lease expired, publish due jobs.
        Returns (requeued ids, published ids)."""
        requeued = self.store.requeue_expired()
        return requeued, self.publish_due()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # broker or database down: keep sweeping
                logger.exception("broker sweeper pass failed")
            self._wake.wait(self.sweep_every_s)
            self._wake.clear()


def worker_queues(app: Celery, kinds: Iterable[str]) -> list[str]:
    """Broker queue names for logical queue names (``engine``, ``dispatch``)."""
    names: dict[JobKind, str] = app.synthnode_queues  # type: ignore[attr-defined]
    out = []
    for k in kinds:
        k = k.strip()
        if k:
            out.append(names[JobKind(k)])
    return out
