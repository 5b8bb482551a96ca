"""Study completion: quiet period timers (persistent across restarts), triggers, re-open."""
from __future__ import annotations

import threading
import time

import pytest

from audit.ledger import Ledger
from config.sections.pipeline import PipelineSettings, Rule, TaskSpec
from node.db import make_engine, upgrade
from node.pipeline.completion import StudyTracker


@pytest.fixture
def db(sqlite_url: str) -> str:
    upgrade(sqlite_url)
    return sqlite_url


def _types(ledger: Ledger) -> list[str]:
    return [e.event.type.value for e in ledger.entries()]


def test_manual_completion_once_and_reopen(db: str) -> None:
    engine = make_engine(db)
    ledger = Ledger(engine)
    calls: list[tuple[str, int]] = []
    t = StudyTracker(engine, PipelineSettings(), ledger=ledger,
                     on_complete=lambda s, g: calls.append((s, g)))
    for _ in range(3):
        st = t.instance_received("1.2.3", called_ae="SYNTHNODE", calling_ae="CT1")
    assert st.state == "open" and st.instances == 3 and st.generation == 0
    assert t.complete("1.2.3") is True
    assert t.complete("1.2.3") is False  # once per generation
    assert t.complete("9.9.9") is False  # unknown study
    assert calls == [("1.2.3", 0)]
    st = t.instance_received("1.2.3")  # late instance re-opens
    assert st.state == "open" and st.generation == 1 and st.instances == 4
    assert t.complete("1.2.3", generation=0) is False  # a stale timer does not complete it
    assert t.complete("1.2.3") is True
    assert calls == [("1.2.3", 0), ("1.2.3", 1)]
    assert _types(ledger) == ["study.completed", "study.reopened", "study.completed"]
    reopened = [e.event for e in ledger.entries()][1]
    assert reopened.payload == {"generation": 1, "reprocess": "replace"}
    t.shutdown()


def test_quiet_period_fires_and_is_pushed_back(db: str) -> None:
    engine = make_engine(db)
    fired = threading.Event()
    when: list[float] = []

    def done(study: str, gen: int) -> None:
        when.append(time.monotonic())
        fired.set()

    t = StudyTracker(engine, PipelineSettings(quiet_period_s=1.0), on_complete=done)
    t.start_scheduler()
    try:
        t0 = time.monotonic()
        t.instance_received("1.2.3")
        first = t.pending_timer("1.2.3")
        time.sleep(0.6)
        t.instance_received("1.2.3")  # restarts the quiet period
        assert t.pending_timer("1.2.3") > first
        assert fired.wait(10)
        assert when[0] - t0 >= 1.5  # 0.6 s + a full quiet period after the last instance
        assert t.status("1.2.3").state == "complete"
        assert t.pending_timer("1.2.3") is None
    finally:
        t.shutdown()


def test_timer_survives_restart(db: str) -> None:
    engine = make_engine(db)
    t1 = StudyTracker(engine, PipelineSettings(quiet_period_s=1.0))
    t1.start_scheduler()
    t1.instance_received("1.2.3")
    t1.shutdown()  # node stops before the quiet period ends
    time.sleep(1.5)  # ... and stays down past the due time
    fired = threading.Event()
    t2 = StudyTracker(make_engine(db), PipelineSettings(quiet_period_s=1.0),
                      on_complete=lambda s, g: fired.set())
    t2.start_scheduler()  # the persisted, overdue timer fires now
    try:
        assert fired.wait(10)
        assert t2.status("1.2.3").state == "complete"
    finally:
        t2.shutdown()


def test_quiet_period_per_rule_and_ae() -> None:
    settings = PipelineSettings(
        quiet_period_s=30,
        rules=[
            Rule(name="fast", match={"called_ae": "FAST.*"}, quiet_period_s=5,
                 tasks=[TaskSpec(task="ct_denoise")]),
            Rule(name="ct", match={"calling_ae": "CT1", "modality": "CT"}, quiet_period_s=10,
                 tasks=[TaskSpec(task="ct_denoise")]),
        ],
    )
    t = StudyTracker.__new__(StudyTracker)
    t.settings = settings
    assert t.quiet_period_for("FASTLANE", "X") == 5
    assert t.quiet_period_for("SYNTHNODE", "CT1") == 10
    assert t.quiet_period_for("FASTLANE", "CT1") == 5
    assert t.quiet_period_for("SYNTHNODE", "MR1") == 30


def test_sweep_completes_studies_without_timer(db: str) -> None:
    """Instances recorded by a process without a scheduler (acceptor child) still complete."""
    from datetime import datetime, timedelta, timezone

    engine = make_engine(db)
    calls: list[str] = []
    t = StudyTracker(engine, PipelineSettings(quiet_period_s=30), on_complete=lambda s, g: calls.append(s))
    t.instance_received("1.2.3")
    assert t.sweep() == []  # quiet period not over
    later = datetime.now(timezone.utc) + timedelta(seconds=31)
    assert t.sweep(now=later) == ["1.2.3"] and calls == ["1.2.3"]
    assert t.sweep(now=later) == []
    t.shutdown()


def test_streaming_instances_throttle_timer_writes_but_never_complete_early(db: str) -> None:
    engine = make_engine(db)
    fired = threading.Event()
    t = StudyTracker(engine, PipelineSettings(quiet_period_s=1.0), on_complete=lambda s, g: fired.set())
    sched = t.start_scheduler()
    writes = []
    real = sched.add_job

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        writes.append(k.get("id"))
        return real(*a, **k)

    sched.add_job = counting
    try:
        t0 = time.monotonic()
        for _ in range(20):  # ~2 s of instances, 10 per second
            t.instance_received("1.2.3")
            last = time.monotonic()
            assert t.status("1.2.3").state == "open"
            time.sleep(0.1)
        # throttled: at most one timer write per 0.25 s of streaming (plus the first)
        assert writes.count("quiet:1.2.3") <= (last - t0) / 0.25 + 1
        assert writes.count("quiet:1.2.3") < 20
        assert fired.wait(10)
        assert time.monotonic() - last >= 0.9  # a full quiet period after the last instance
    finally:
        t.shutdown()
