"""Study completion: a per-study quiet period, explicit triggers and re-opening.

* Every stored instance calls :meth:`StudyTracker.instance_received` (the ingest hook
  ``NodeContext.on_instance_stored``): the study's row in ``pipeline_studies`` is created or
  updated and its quiet-period timer (re)started in APScheduler. Timers live in a persistent
  SQLAlchemy job store (``pipeline_scheduler_jobs``): after a restart a pending timer still
  fires, and one whose time passed while the node was down fires at start-up.
* When the timer fires, or ``synthnode study complete UID`` is run, :meth:`complete` moves
  the study from ``open`` to ``complete`` exactly once per generation (conditional UPDATE),
  appends ``study.completed`` to the ledger and calls the completion callback (the
  pipeline: route series, enqueue jobs).
* An instance arriving after completion re-opens the study (generation + 1, ledger
  ``study.reopened`` with the policy). On the next completion the callback receives the
  generation; the pipeline applies the re-process policy (never / always / replace).

The quiet period of a study is the shortest ``quiet_period_s`` of the rules whose
``called_ae`` / ``calling_ae`` entries accept the association, else the pipeline default.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from audit.events import Event, EventType, Outcome
from config.sections.pipeline import PipelineSettings
from node.pipeline.tables import studies

logger = logging.getLogger(__name__)

ACTOR = "component:completion"
SCHEDULER_TABLE = "pipeline_scheduler_jobs"

#: completion callback: (study_uid, generation) -> None
OnComplete = Callable[[str, int], object]

# APScheduler persists a job as a textual reference to a module-level function plus its
# arguments; the function finds the live tracker here by its key (the database URL).
_TRACKERS: dict[str, StudyTracker] = {}
_TRACKERS_LOCK = threading.Lock()


def fire_quiet_period(tracker_key: str, study_uid: str, generation: int) -> None:
    """Scheduler entry point (referenced by persisted jobs; keep its name and signature)."""
    with _TRACKERS_LOCK:
        tracker = _TRACKERS.get(tracker_key)
    if tracker is None:
        logger.warning("quiet period fired with no live tracker %s", tracker_key)
        return
    tracker.complete(study_uid, trigger="quiet_period", generation=generation)


def sweep_quiet_studies(tracker_key: str) -> None:
    """Scheduler entry point of the periodic sweep (keep name and signature)."""
    with _TRACKERS_LOCK:
        tracker = _TRACKERS.get(tracker_key)
    if tracker is not None:
        tracker.sweep()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=UTC)  # SQLite hands back naive UTC
    return t


@dataclass(frozen=True)
class StudyStatus:
    study_uid: str
    state: str
    generation: int
    instances: int
    first_instance_at: datetime
    last_instance_at: datetime
    completed_at: datetime | None
    called_ae: str | None
    calling_ae: str | None


class StudyTracker:
    """Per-study completion state and quiet-period timers.

    Parameters
    ----------
    engine
        database with the ``node`` migrations applied.
    settings
        the pipeline section (default quiet period, rules, re-process policy).
    ledger
        the ledger's append API; None = no events (tests only).
    series_of
        study UID -> its series UIDs (for the ``study.completed`` payload).
    on_complete
        called after a study completed (outside the database transaction).
    scheduler
        an APScheduler ``BaseScheduler``; None = :meth:`start_scheduler` builds a
        ``BackgroundScheduler`` on the persistent job store.
    """

    def __init__(
        self,
        engine: Engine,
        settings: PipelineSettings,
        *,
        ledger: Any = None,
        on_complete: OnComplete | None = None,
        scheduler: Any = None,
        series_of: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.ledger = ledger
        self.on_complete = on_complete
        self.scheduler = scheduler
        self.series_of = series_of
        self.sweep_interval_s = 10.0
        self._armed: dict[str, tuple[int, datetime]] = {}  # study -> (generation, due)
        self.key = str(engine.url)
        with _TRACKERS_LOCK:
            _TRACKERS[self.key] = self

    # -- scheduler ------------------------------------------------------------------------
    def start_scheduler(self) -> Any:
        """Start a background scheduler on the persistent job store (idempotent)."""
        if self.scheduler is None:
            from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
            from apscheduler.schedulers.background import BackgroundScheduler

            store = SQLAlchemyJobStore(engine=self.engine, tablename=SCHEDULER_TABLE)
            self.scheduler = BackgroundScheduler(
                jobstores={"default": store},
                job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 1},
                timezone=UTC,
            )
        if not self.scheduler.running:
            self.scheduler.start()
        # backstop for instances recorded without a timer (acceptor child processes, a
        # crash between commit and scheduling): complete studies whose quiet period passed
        self.scheduler.add_job(
            sweep_quiet_studies, trigger="interval", seconds=self.sweep_interval_s,
            id="quiet-sweep", replace_existing=True, args=[self.key],
        )
        return self.scheduler

    def shutdown(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        with _TRACKERS_LOCK:
            if _TRACKERS.get(self.key) is self:
                del _TRACKERS[self.key]

    def _job_id(self, study_uid: str) -> str:
        return f"quiet:{study_uid}"

    def _schedule(self, study_uid: str, generation: int, delay_s: float) -> None:
        """(Re)start the study's timer. Throttled: while instances stream in, the persistent
        timer is rewritten at most every ``delay_s / 4`` (<= 1 s); a timer that fires early
        re-arms itself for the rest of the quiet period (see :meth:`complete`)."""
        if self.scheduler is None:
            return
        run_at = _now() + timedelta(seconds=delay_s)
        last = self._armed.get(study_uid)
        if last is not None and last[0] == generation and \
                (run_at - last[1]).total_seconds() < min(1.0, delay_s / 4):
            return
        self._armed[study_uid] = (generation, run_at)
        self.scheduler.add_job(
            fire_quiet_period,
            trigger="date",
            run_date=run_at,
            id=self._job_id(study_uid),
            replace_existing=True,
            args=[self.key, study_uid, generation],
        )

    def pending_timer(self, study_uid: str) -> datetime | None:
        if self.scheduler is None:
            return None
        job = self.scheduler.get_job(self._job_id(study_uid))
        return job.next_run_time if job is not None else None

    # -- quiet period -----------------------------------------------------------------------
    def quiet_period_for(self, called_ae: str | None, calling_ae: str | None) -> float:
        """Shortest quiet period of the rules whose AE entries accept this association."""
        best: float | None = None
        for rule in self.settings.rules:
            if not rule.enabled or rule.quiet_period_s is None:
                continue
            ok = True
            for key, value in (("called_ae", called_ae), ("calling_ae", calling_ae)):
                pattern = rule.match.get(key)
                if pattern is not None and not (
                    value is not None and re.fullmatch(pattern, value, re.IGNORECASE)
                ):
                    ok = False
            if ok:
                best = rule.quiet_period_s if best is None else min(best, rule.quiet_period_s)
        return best if best is not None else self.settings.quiet_period_s

    # -- events -----------------------------------------------------------------------------
    def _event(self, conn: Any, type_: EventType, study_uid: str, payload: dict[str, Any]) -> None:
        if self.ledger is not None:
            self.ledger.append(
                Event(type=type_, actor=ACTOR, outcome=Outcome.SUCCESS,
                      subject={"study_uid": study_uid}, payload=payload),
                conn=conn,
            )

    def instance_received(
        self,
        study_uid: str,
        *,
        called_ae: str | None = None,
        calling_ae: str | None = None,
        when: datetime | None = None,
    ) -> StudyStatus:
        """Record one stored instance of ``study_uid`` and restart its quiet period."""
        when = when or _now()
        quiet = self.quiet_period_for(called_ae, calling_ae)
        with self.engine.begin() as conn:
            # insert-if-absent in one statement: several associations delivering the first
            # instances of one study at once must not race on the primary key
            ins = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(studies)
            created = conn.execute(ins.values(
                study_uid=study_uid, state="open", generation=0, first_instance_at=when,
                last_instance_at=when, instances=1, called_ae=called_ae,
                calling_ae=calling_ae, quiet_period_s=round(quiet),
            ).on_conflict_do_nothing(index_elements=["study_uid"])
              .returning(studies.c.study_uid)).first() is not None
            row = None if created else conn.execute(
                select(studies).where(studies.c.study_uid == study_uid)
            ).first()
            if row is None:
                pass
            elif row.state == "complete":
                generation = int(row.generation) + 1
                conn.execute(update(studies).where(studies.c.study_uid == study_uid).values(
                    state="open", generation=generation, last_instance_at=when,
                    instances=studies.c.instances + 1, completed_at=None,
                ))
                policy = self.settings.reprocess.value
                self._event(conn, EventType.STUDY_REOPENED, study_uid,
                            {"generation": generation, "reprocess": policy})
                logger.info("study re-opened by a late instance (generation %d)", generation)
            else:
                conn.execute(update(studies).where(studies.c.study_uid == study_uid).values(
                    last_instance_at=when, instances=studies.c.instances + 1,
                ))
            status = self._status(conn, study_uid)
        self._schedule(study_uid, status.generation, quiet)
        return status

    def complete(self, study_uid: str, *, trigger: str = "manual",
                 generation: int | None = None, check_quiet: bool = True) -> bool:
        """Mark the study complete (once per generation) and run the completion callback.

        Returns False when the study is unknown, already complete, or (for a timer) the
        generation moved on since the timer was set.
        """
        with self.engine.begin() as conn:
            row = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
            if row is None:
                return False
            if trigger == "quiet_period" and check_quiet and row.state == "open":
                quiet = float(row.quiet_period_s or self.settings.quiet_period_s)
                last = _aware(row.last_instance_at)
                left = quiet - (_now() - last).total_seconds() if last else 0.0
                if left > 0.05:  # an instance came after the (throttled) timer was set
                    self._armed.pop(study_uid, None)
                    self._schedule(study_uid, int(row.generation), left)
                    return False
            cond = [studies.c.study_uid == study_uid, studies.c.state == "open"]
            if generation is not None:
                cond.append(studies.c.generation == generation)
            now = _now()
            res = conn.execute(update(studies).where(and_(*cond)).values(
                state="complete", completed_at=now,
            ))
            if res.rowcount != 1:
                return False
            gen = int(row.generation)
            payload: dict[str, Any] = {
                "trigger": trigger, "generation": gen, "instances": int(row.instances),
            }
            if self.series_of is not None:
                payload["series_uids"] = sorted(self.series_of(study_uid))
            self._event(conn, EventType.STUDY_COMPLETED, study_uid, payload)
        if self.scheduler is not None and trigger != "quiet_period":
            try:
                self.scheduler.remove_job(self._job_id(study_uid))
            except Exception:  # no pending timer
                pass
        logger.info("study completed (%s, generation %d)", trigger, gen)
        if self.on_complete is not None:
            try:
                self.on_complete(study_uid, gen)
            except Exception:
                logger.exception("completion callback failed")
        return True

    def sweep(self, now: datetime | None = None) -> list[str]:
        """Complete every open study whose quiet period has passed (timer backstop)."""
        now = now or _now()
        with self.engine.connect() as conn:
            rows = conn.execute(select(studies).where(studies.c.state == "open")).fetchall()
        done = []
        for r in rows:
            quiet = float(r.quiet_period_s or self.settings.quiet_period_s)
            last = _aware(r.last_instance_at)
            if last is not None and (now - last).total_seconds() >= quiet:
                if self.complete(r.study_uid, trigger="quiet_period", generation=int(r.generation),
                                 check_quiet=False):
                    done.append(r.study_uid)
        return done

    def _status(self, conn: Any, study_uid: str) -> StudyStatus:
        r = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
        m = r._mapping
        return StudyStatus(
            study_uid=m["study_uid"], state=m["state"], generation=int(m["generation"]),
            instances=int(m["instances"]), first_instance_at=m["first_instance_at"],
            last_instance_at=m["last_instance_at"], completed_at=m["completed_at"],
            called_ae=m["called_ae"], calling_ae=m["calling_ae"],
        )

    def status(self, study_uid: str) -> StudyStatus | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(studies).where(studies.c.study_uid == study_uid)).first()
            return None if r is None else self._status(conn, study_uid)
