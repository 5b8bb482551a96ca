"""The console's ledger verification: one run at a time, in a background thread of the
node's process, its progress readable while it runs.

A run re-derives every hash and checks every signed checkpoint
(:func:`audit.verify.verify_database`, as ``synthnode audit verify``), reporting the
entries checked against the ledger's size as it goes, and ends with a ``verification.run``
ledger entry naming who started it. Starting while a run is going returns that run.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from audit.events import Event, EventType, Outcome

__all__ = ["VerificationRun", "Verifications"]

#: entries per progress step (the verification itself reads in batches of this size)
BATCH = 2000


@dataclass
class VerificationRun:
    id: str
    actor: str
    started: str
    phase: str = "starting"
    checked: int = 0
    total: int = 0
    finished: str = ""
    report: dict[str, Any] | None = None
    error: str = ""
    ledger_seq: int | None = None
    checkpoint: dict[str, Any] | None = None  # the latest signed checkpoint it checked
    _t0: float = field(default_factory=time.monotonic, repr=False)

    @property
    def running(self) -> bool:
        return not self.finished

    def as_dict(self) -> dict[str, Any]:
        pct = 100 if self.finished else (int(100 * self.checked / self.total)
                                         if self.total else 0)
        return {"id": self.id, "actor": self.actor, "started": self.started,
                "phase": self.phase, "checked": self.checked, "total": self.total,
                "percent": pct, "running": self.running, "finished": self.finished,
                "elapsed_s": round(time.monotonic() - self._t0, 2) if self.running
                else (self.report or {}).get("elapsed_s"),
                "report": self.report, "error": self.error, "ledger_seq": self.ledger_seq,
                "checkpoint": self.checkpoint}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Verifications:
    """The node's verification runs (the latest one kept for the page to show)."""

    def __init__(self, ctx: Any, verify: Callable[..., Any] | None = None):
        from audit.verify import verify_database

        self.ctx = ctx
        #: the verification itself (:func:`audit.verify.verify_database`)
        self.verify = verify or verify_database
        self._lock = threading.Lock()
        self.latest: VerificationRun | None = None
        self._thread: threading.Thread | None = None

    def start(self, actor: str, via: dict[str, Any]) -> tuple[VerificationRun, bool]:
        """``(run, started)``: a new run, or the one still going (``started`` False)."""
        if self.ctx.audit is None:
            raise RuntimeError("no ledger verifier on this node")
        with self._lock:
            if self.latest is not None and self.latest.running:
                return self.latest, False
            run = VerificationRun(id=uuid.uuid4().hex[:12], actor=actor, started=_now())
            self.latest = run
            self._thread = threading.Thread(target=self._run, args=(run, via), daemon=True,
                                            name=f"verify-{run.id}")
            self._thread.start()
            return run, True

    def get(self, run_id: str) -> VerificationRun | None:
        run = self.latest
        return run if run is not None and run.id == run_id else None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the current run's thread (node shutdown, tests)."""
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _run(self, run: VerificationRun, via: dict[str, Any]) -> None:
        ctx = self.ctx

        def progress(phase: str, done: int, total: int) -> None:
            run.phase, run.checked, run.total = phase, done, total

        try:
            report = self.verify(ctx.engine, ctx.audit.verifier, ctx.settings.checkpoint_file,
                                  batch=BATCH, progress=progress)
            run.report = report.as_dict()
            # the checkpoints it read are the first ones in size order (read before the rest)
            checked = ctx.ledger.checkpoints()[:report.checkpoints]
            if checked:
                size, root, _ = checked[-1]
                run.checkpoint = {"size": size, "root": root.hex(), "verified": report.ok}
            stored = ctx.ledger.append(Event(
                EventType.VERIFICATION_RUN, run.actor,
                Outcome.SUCCESS if report.ok else Outcome.SERIOUS_FAILURE,
                payload={"size": report.size, "root_hash": report.root.hex(), "ok": report.ok,
                         "problems": len(report.problems),
                         "first_bad_entry": report.first_bad_entry, "run": run.id, **via}))
            run.ledger_seq = getattr(stored, "seq", None)
            run.phase = "done"
        except Exception as exc:  # shown on the page; the node keeps serving
            run.error = f"{type(exc).__name__}: {exc}"
            run.phase = "error"
        finally:
            run.finished = _now()
