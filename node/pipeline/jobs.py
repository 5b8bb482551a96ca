"""Jobs: an explicit state machine in the database, and the embedded local worker pool.

States and the only allowed transitions (anything else raises :class:`InvalidTransition`)::

    queued ----claim----> running ----finish----> succeeded
      ^  \\                 |  \\----fail-------> failed ----retry----> queued
      |   \\--cancel--> cancelled <--cancel--/   (cancelled --retry--> queued)
      +-------requeue (transient error, lease expired: attempts < max_attempts)

Every transition is one ``UPDATE ... WHERE id = :id AND state = :expected`` so two workers
(threads or processes sharing PostgreSQL / SQLite) can never both claim or finish a job;
the ledger gets job.queued / started / finished / failed / cancelled events in the same
transaction. A job whose worker died keeps state ``running`` with an expired lease; the
sweeper (:meth:`JobStore.requeue_expired`) puts it back in the queue, so a ``kill -9`` of the
node mid-job resumes the job after restart and it finishes once.
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select, update

from audit.events import Event, EventType, Outcome
from node.observability.logs import log_context
from node.pipeline.specs import DispatchJobSpec, EngineJobSpec, InvalidJobSpec, JobSpec, parse_spec
from node.pipeline.tables import jobs

logger = logging.getLogger(__name__)

ACTOR = "component:jobs"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(str, Enum):
    ENGINE = "engine"
    DISPATCH = "dispatch"


#: state -> states it may move to
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED}
    ),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
}

_EVENT = {
    JobState.QUEUED: EventType.JOB_QUEUED,
    JobState.RUNNING: EventType.JOB_STARTED,
    JobState.SUCCEEDED: EventType.JOB_FINISHED,
    JobState.FAILED: EventType.JOB_FAILED,
    JobState.CANCELLED: EventType.JOB_CANCELLED,
}


#: keys of an engine job's result copied to the top of its job.finished payload (and
#: ``model_id`` to the subject): which model ran, as the engine's provenance names it
RESULT_MODEL_KEYS: tuple[str, ...] = ("model_id", "model_version", "weights_sha256")


class InvalidTransition(RuntimeError):
    """The job is not in a state that allows this operation (or another worker won)."""


class TransientJobError(RuntimeError):
    """Raised by a job handler for errors worth another attempt (peer down, busy).

    ``retry_after_s`` overrides the pool's exponential backoff for the next attempt."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentJobError(RuntimeError):
    """A job that cannot succeed by retrying (bad input, policy, unknown destination)."""


class JobClaimLost(RuntimeError):
    """The job was cancelled, or claimed again by another worker, while this attempt ran."""


@dataclass(frozen=True)
class Job:
    id: str
    kind: JobKind
    state: JobState
    study_uid: str | None
    series_uid: str | None
    rule: str | None
    task: str | None
    spec: dict[str, Any]
    seed: int | None
    attempts: int
    max_attempts: int
    error: str | None
    result: dict[str, Any] | None
    parent_id: str | None
    generation: int
    worker: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        m = row._mapping
        return cls(
            id=m["id"],
            kind=JobKind(m["kind"]),
            state=JobState(m["state"]),
            study_uid=m["study_uid"],
            series_uid=m["series_uid"],
            rule=m["rule"],
            task=m["task"],
            spec=json.loads(m["spec"] or "{}"),
            seed=m["seed"],
            attempts=m["attempts"],
            max_attempts=m["max_attempts"],
            error=m["error"],
            result=json.loads(m["result"]) if m["result"] else None,
            parent_id=m["parent_id"],
            generation=m["generation"],
            worker=m["worker"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            started_at=m["started_at"],
            finished_at=m["finished_at"],
        )


    @property
    def engine_spec(self) -> EngineJobSpec:
        """The typed spec of an engine job (raises :class:`InvalidJobSpec`)."""
        if self.kind is not JobKind.ENGINE:
            raise InvalidJobSpec(f"job {self.id} is a {self.kind.value} job, not an engine job")
        return parse_spec(self.kind.value, self.spec)  # type: ignore[return-value]

    @property
    def dispatch_spec(self) -> DispatchJobSpec:
        """The typed spec of a dispatch job (raises :class:`InvalidJobSpec`)."""
        if self.kind is not JobKind.DISPATCH:
            raise InvalidJobSpec(f"job {self.id} is a {self.kind.value} job, not a dispatch job")
        return parse_spec(self.kind.value, self.spec)  # type: ignore[return-value]


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes: they were written as UTC."""
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return t


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class JobStore:
    """All job state changes go through here (the single bookkeeper).

    Parameters
    ----------
    engine
        database with the ``node`` migrations applied.
    ledger
        the ledger's append API (``append(event, conn)``); None = no events (tests only).
    lease_s
        how long a claim holds before the sweeper may requeue the job.
    """

    def __init__(self, engine: Engine, ledger: Any = None, *, lease_s: float = 600.0) -> None:
        self.engine = engine
        self.ledger = ledger
        self.lease = timedelta(seconds=lease_s)

    # -- reading --------------------------------------------------------------------
    def get(self, job_id: str, conn: Connection | None = None) -> Job:
        if conn is None:
            with self.engine.connect() as c:
                return self.get(job_id, c)
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            # accept a unique prefix, as `synthnode jobs show 3fa2` does
            rows = conn.execute(select(jobs).where(jobs.c.id.like(f"{job_id}%"))).fetchall()
            if len(rows) != 1:
                raise KeyError(f"no job {job_id!r}" if not rows else f"ambiguous job id {job_id!r}")
            row = rows[0]
        return Job.from_row(row)

    def list(
        self,
        *,
        state: JobState | str | None = None,
        study_uid: str | None = None,
        kind: JobKind | str | None = None,
        limit: int = 100,
    ) -> builtins.list[Job]:
        q = select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        if state is not None:
            q = q.where(jobs.c.state == JobState(state).value)
        if study_uid is not None:
            q = q.where(jobs.c.study_uid == study_uid)
        if kind is not None:
            q = q.where(jobs.c.kind == JobKind(kind).value)
        with self.engine.connect() as c:
            return [Job.from_row(r) for r in c.execute(q)]

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func

        with self.engine.connect() as c:
            rows = c.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
            return {r[0]: int(r[1]) for r in rows}

    # -- writing --------------------------------------------------------------------
    def _event(self, conn: Connection, job: Job | dict[str, Any], state: JobState,
               payload: dict[str, Any]) -> None:
        if self.ledger is None:
            return
        get = (lambda k: getattr(job, k)) if isinstance(job, Job) else job.get
        kind_value = get("kind")
        kind_value = kind_value.value if isinstance(kind_value, Enum) else kind_value
        spec = get("spec")
        spec = json.loads(spec or "{}") if isinstance(spec, str) else (spec or {})
        subject = {"job_id": get("id")}
        if get("study_uid"):
            subject["study_uid"] = get("study_uid")
        if kind_value == JobKind.ENGINE.value:
            # the model that runs: the one the rule names (job.queued / started), the one that
            # ran (job.finished: model_id from the result; None in the spec = the task's
            # default, resolved by the engine runner)
            model_id = payload.get("model_id") or spec.get("model")
            if model_id:
                subject["model_id"] = str(model_id)
            if get("series_uid"):
                # audit vocabulary: an engine job's sources are payload source_series_uids
                payload = {"source_series_uids": [get("series_uid")], **payload}
        else:
            if get("series_uid"):
                subject["series_uid"] = get("series_uid")  # the series a dispatch job sends
            if spec.get("destination"):
                payload = {"destination": spec["destination"], **payload}
        outcome = {
            JobState.FAILED: Outcome.SERIOUS_FAILURE,
            JobState.CANCELLED: Outcome.MINOR_FAILURE,
        }.get(state, Outcome.SUCCESS)
        kind = get("kind")
        payload = {"kind": kind.value if isinstance(kind, Enum) else kind, **payload}
        self.ledger.append(
            Event(
                type=_EVENT[state], actor=ACTOR, outcome=outcome, subject=subject, payload=payload
            ),
            conn=conn,
        )

    def enqueue(
        self,
        kind: JobKind | str,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        rule: str | None = None,
        task: str | None = None,
        spec: JobSpec | dict[str, Any] | None = None,
        seed: int | None = None,
        max_attempts: int = 3,
        parent_id: str | None = None,
        generation: int = 0,
        job_id: str | None = None,
        conn: Connection | None = None,
    ) -> str:
        """Insert a queued job and its job.queued ledger event (one transaction).

        ``spec`` is validated against the kind's schema (:mod:`node.pipeline.specs`); an
        invalid one raises :class:`~node.pipeline.specs.InvalidJobSpec` and nothing is
        written."""
        typed = parse_spec(JobKind(kind).value, spec or {})
        if conn is None:
            with self.engine.begin() as c:
                return self.enqueue(
                    kind, study_uid=study_uid, series_uid=series_uid, rule=rule, task=task,
                    spec=typed, seed=seed, max_attempts=max_attempts, parent_id=parent_id,
                    generation=generation, job_id=job_id, conn=c,
                )
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        now = _now()
        row = {
            "id": job_id or str(uuid.uuid4()),
            "kind": JobKind(kind).value,
            "state": JobState.QUEUED.value,
            "study_uid": study_uid,
            "series_uid": series_uid,
            "rule": rule,
            "task": task,
            "spec": json.dumps(typed.to_json_dict(), sort_keys=True),
            "seed": seed,
            "attempts": 0,
            "max_attempts": max_attempts,
            "parent_id": parent_id,
            "generation": generation,
            "created_at": now,
            "updated_at": now,
        }
        conn.execute(jobs.insert().values(**row))
        payload: dict[str, Any] = {"task": task, "rule": rule, "generation": generation}
        if seed is not None:
            payload["seed"] = seed
        if parent_id:
            payload["parent_id"] = parent_id
        self._event(conn, row, JobState.QUEUED, payload)
        return str(row["id"])

    def _transition(
        self,
        conn: Connection,
        job: Job,
        new: JobState,
        values: dict[str, Any],
        payload: dict[str, Any],
        claim: Job | None = None,
    ) -> Job:
        if new not in TRANSITIONS[job.state]:
            raise InvalidTransition(
                f"job {job.id}: {job.state.value} -> {new.value} is not allowed"
            )
        values = {**values, "state": new.value, "updated_at": _now()}
        where = [jobs.c.id == job.id, jobs.c.state == job.state.value]
        if claim is not None:
            where += _fence(claim)
        res = conn.execute(update(jobs).where(and_(*where)).values(**values))
        if res.rowcount != 1:
            if claim is not None:
                raise InvalidTransition(
                    f"job {job.id}: the claim of attempt {claim.attempts} by {claim.worker} "
                    "is no longer current (lease expired and the job was claimed again)")
            raise InvalidTransition(f"job {job.id} changed state concurrently")
        self._event(conn, job, new, payload)
        return self.get(job.id, conn)

    def claim(self, *, kinds: tuple[JobKind, ...] = (JobKind.ENGINE, JobKind.DISPATCH),
              worker: str | None = None, job_id: str | None = None) -> Job | None:
        """Move the oldest runnable queued job (or ``job_id``) to running; None if none."""
        worker = worker or worker_name()
        now = _now()
        for _ in range(5):  # lost races: try the next candidate
            with self.engine.begin() as conn:
                q = (
                    select(jobs)
                    .where(jobs.c.state == JobState.QUEUED.value)
                    .where(jobs.c.kind.in_([JobKind(k).value for k in kinds]))
                    .where(or_(jobs.c.not_before.is_(None), jobs.c.not_before <= now))
                    .order_by(jobs.c.created_at)
                    .limit(1)
                )
                if job_id is not None:
                    q = q.where(jobs.c.id == job_id)
                row = conn.execute(q).first()
                if row is None:
                    return None
                job = Job.from_row(row)
                try:
                    return self._transition(
                        conn, job, JobState.RUNNING,
                        {"attempts": job.attempts + 1, "worker": worker, "started_at": now,
                         "lease_until": now + self.lease, "error": None},
                        {"attempt": job.attempts + 1, "worker": worker},
                    )
                except InvalidTransition:
                    continue
        return None

    def finish(self, job_id: str, result: dict[str, Any] | None = None, *,
               claim: Job | None = None) -> Job:
        """Record success. ``claim`` (the job as :meth:`claim` returned it) fences the
        update: it applies only while that claim is current (same attempt, same worker),
        so a worker that lost its lease cannot finish the job another worker now runs."""
        with self.engine.begin() as conn:
            job = self.get(job_id, conn)
            return self._transition(
                conn, job, JobState.SUCCEEDED,
                {"finished_at": _now(), "lease_until": None,
                 "result": json.dumps(result or {}, sort_keys=True, default=str)},
                {"attempts": job.attempts, "result": result or {},
                 # lineage reads which model ran from the job.finished event itself
                 **{k: str((result or {})[k]) for k in RESULT_MODEL_KEYS if (result or {}).get(k)}},
                claim=claim,
            )

    def fail(self, job_id: str, error: str, *, transient: bool = False,
             retry_after_s: float = 0.0, claim: Job | None = None) -> Job:
        """Record a failed attempt: transient errors requeue while attempts remain
        (``not_before`` = now + ``retry_after_s``), anything else is terminal. ``claim``
        fences the update as in :meth:`finish`."""
        with self.engine.begin() as conn:
            job = self.get(job_id, conn)
            error = error[:4000]
            if transient and job.attempts < job.max_attempts:
                return self._transition(
                    conn, job, JobState.QUEUED,
                    {"error": error, "lease_until": None, "worker": None,
                     "not_before": _now() + timedelta(seconds=retry_after_s)},
                    {"attempt": job.attempts, "error": error, "requeued": True}, claim=claim,
                )
            return self._transition(
                conn, job, JobState.FAILED,
                {"error": error, "finished_at": _now(), "lease_until": None},
                {"attempts": job.attempts, "error": error}, claim=claim,
            )

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> Job:
        with self.engine.begin() as conn:
            job = self.get(job_id, conn)
            return self._transition(
                conn, job, JobState.CANCELLED,
                {"error": reason, "finished_at": _now(), "lease_until": None},
                {"reason": reason},
            )

    def annotate(self, job_id: str, key: str, value: Any,
                 conn: Connection | None = None) -> Job:
        """Add ``key`` to a finished job's result (an administrator's decision on its held
        outputs); the ledger entry of the decision is the caller's, in ``conn``."""
        if conn is None:
            with self.engine.begin() as c:
                return self.annotate(job_id, key, value, c)
        job = self.get(job_id, conn)
        result = dict(job.result or {})
        result[key] = value
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(
            result=json.dumps(result, sort_keys=True, default=str), updated_at=_now()))
        return self.get(job.id, conn)

    def retry(self, job_id: str) -> Job:
        """Manual retry of a failed or cancelled job: queued again with a fresh budget."""
        with self.engine.begin() as conn:
            job = self.get(job_id, conn)
            return self._transition(
                conn, job, JobState.QUEUED,
                {"attempts": 0, "error": None, "finished_at": None, "not_before": None,
                 "worker": None},
                {"manual_retry": True, "previous_error": job.error or ""},
            )

    def heartbeat(self, job_id: str, claim: Job | None = None,
                  conn: Connection | None = None) -> bool:
        """Renew a running job's lease (only ``claim``'s, when given). False = not renewed
        (the job is no longer running under that claim). With ``conn`` the renewal is part
        of the caller's transaction and locks the job row until it commits: work that must
        only be published while the claim is current (an engine job's outputs) does so in
        that transaction."""
        where = [jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value]
        if claim is not None:
            where += _fence(claim)
        if conn is None:
            with self.engine.begin() as c:
                return self.heartbeat(job_id, claim, c)
        res = conn.execute(update(jobs).where(and_(*where)).values(lease_until=_now() + self.lease))
        return bool(res.rowcount == 1)

    def find(
        self,
        *,
        kind: JobKind | None = None,
        series_uid: str | None = None,
        rule: str | None = None,
        task: str | None = None,
        parent_id: str | None = None,
        states: tuple[JobState, ...] = (),
        exclude_states: tuple[JobState, ...] = (),
        conn: Connection | None = None,
    ) -> builtins.list[Job]:
        """Jobs matching every given criterion, oldest first (the pipeline's questions: is
        this series already processed or sent, which jobs does this one have)."""
        if conn is None:
            with self.engine.connect() as c:
                return self.find(kind=kind, series_uid=series_uid, rule=rule, task=task,
                                 parent_id=parent_id, states=states,
                                 exclude_states=exclude_states, conn=c)
        q = select(jobs).order_by(jobs.c.created_at)
        if kind is not None:
            q = q.where(jobs.c.kind == JobKind(kind).value)
        for col, value in ((jobs.c.series_uid, series_uid), (jobs.c.rule, rule),
                           (jobs.c.task, task), (jobs.c.parent_id, parent_id)):
            if value is not None:
                q = q.where(col == value)
        if states:
            q = q.where(jobs.c.state.in_([s.value for s in states]))
        if exclude_states:
            q = q.where(jobs.c.state.not_in([s.value for s in exclude_states]))
        return [Job.from_row(r) for r in conn.execute(q)]

    def requeue_orphans(self) -> builtins.list[str]:
        """Start-up recovery: running jobs claimed on this host by a process that no longer
        exists (``kill -9``, power loss) go back to the queue at once, without waiting for
        their lease to expire. Returns the ids it touched."""
        host = socket.gethostname()
        touched: builtins.list[str] = []
        with self.engine.connect() as c:
            rows = c.execute(select(jobs).where(jobs.c.state == JobState.RUNNING.value)).fetchall()
        for row in rows:
            job = Job.from_row(row)
            parts = (job.worker or "").split(":")
            if len(parts) < 2 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid == os.getpid() or _pid_alive(pid):
                continue
            try:
                self.fail(job.id, f"worker {job.worker} died (process gone)", transient=True)
                touched.append(job.id)
            except InvalidTransition:
                pass
        return touched

    def requeue_expired(self, *, now: datetime | None = None) -> builtins.list[str]:
        """Sweeper: running jobs whose lease expired (worker died) go back to queued, or to
        failed once their attempts are spent. Returns the ids it touched."""
        now = now or _now()
        touched: builtins.list[str] = []
        with self.engine.connect() as c:
            rows = c.execute(
                select(jobs).where(jobs.c.state == JobState.RUNNING.value)
            ).fetchall()
        for row in rows:
            job = Job.from_row(row)
            lease = _aware(row._mapping["lease_until"])
            if lease is not None and lease > now:
                continue
            try:
                self.fail(job.id, f"worker {job.worker} lost (lease expired)", transient=True)
                touched.append(job.id)
            except InvalidTransition:
                pass
        return touched


def _fence(claim: Job) -> list[Any]:
    """WHERE terms true only while ``claim`` is the job's current claim: a new claim raises
    ``attempts``, and a worker (host:pid:thread) runs one job at a time."""
    return [jobs.c.attempts == claim.attempts, jobs.c.worker == claim.worker]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: handler(job) -> result dict; raise TransientJobError to requeue, anything else fails it
Handler = Callable[[Job], dict[str, Any]]


class WorkerPool:
    """The embedded local worker pool: ``n`` threads claiming jobs from the database.

    Parameters
    ----------
    store
        the job store.
    handlers
        job kind -> handler.
    workers
        number of threads (engine work is CPU-bound; one per GPU / a few on CPU).
    poll_s
        idle wait between claims; :meth:`wake` cuts it short after an enqueue.
    """

    def __init__(self, store: JobStore, handlers: dict[JobKind, Handler], *, workers: int = 1,
                 poll_s: float = 1.0, backoff_s: float = 5.0) -> None:
        self.store = store
        self.handlers = handlers
        self.n = workers
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self.store.requeue_orphans()
        self.store.requeue_expired()
        for i in range(self.n):
            t = threading.Thread(target=self._loop, name=f"synthnode-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # pragma: no cover - a bug in the store must not kill the pool
                logger.exception("worker loop error")
                ran = False
            if not ran:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def run_once(self) -> bool:
        """Claim and run one job; False when nothing was runnable."""
        job = self.store.claim(kinds=tuple(self.handlers))
        if job is None:
            return False
        with log_context(job=job.id, study=job.study_uid):  # in JSON log lines
            run_job(self.store, self.handlers, job, backoff_s=self.backoff_s)
        return True

    def drain(self, max_jobs: int = 1000) -> int:
        """Run queued jobs in this thread until none is runnable (tests, CLI)."""
        n = 0
        while n < max_jobs and self.run_once():
            n += 1
        return n


def run_job(store: JobStore, handlers: dict[JobKind, Handler], job: Job, *,
            backoff_s: float = 5.0) -> Job:
    """Run one claimed job through its handler and record the outcome. A job whose spec
    does not fit its kind's schema fails at once, permanently, with the reason."""
    handler = handlers[job.kind]
    try:
        try:
            parse_spec(job.kind.value, job.spec)
        except InvalidJobSpec as exc:
            logger.error("job %s refused: %s", job.id, exc)
            return store.fail(job.id, str(exc), claim=job)
        try:
            result = handler(job)
        except TransientJobError as exc:
            delay = exc.retry_after_s
            if delay is None:
                delay = backoff_s * (2 ** max(0, job.attempts - 1))
            logger.warning("job %s attempt %d transient failure: %s", job.id, job.attempts, exc)
            return store.fail(job.id, str(exc), transient=True, retry_after_s=delay, claim=job)
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            return store.fail(job.id, f"{type(exc).__name__}: {exc}", claim=job)
        current = store.get(job.id)
        if current.state is JobState.CANCELLED:  # cancelled while running: keep cancelled
            return current
        return store.finish(job.id, result, claim=job)
    except InvalidTransition as exc:
        # cancelled meanwhile, or the lease expired and another worker claimed the job:
        # the current state (and claim) stands, this attempt's outcome is not recorded
        logger.warning("job %s attempt %d outcome not recorded: %s", job.id, job.attempts, exc)
        return store.get(job.id)


def iter_states() -> Iterator[str]:
    return (s.value for s in JobState)
