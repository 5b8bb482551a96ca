"""Structured JSON log lines (``log_format = "json"``): one JSON object per line with the
time, level, logger, process, thread, message and, where known, the DIMSE association,
the pipeline job and the study the line is about.

The association is found from the thread (pynetdicom runs each association in its own
``Association`` thread): its calling / called AE titles, peer address and a per-process id.
Jobs and studies are bound with :func:`log_context` (context variables: per thread, and per
task under asyncio) by the code that works on them.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "log_context", "use_json_logs"]

_JOB: ContextVar[str | None] = ContextVar("synthnode_log_job", default=None)
_STUDY: ContextVar[str | None] = ContextVar("synthnode_log_study", default=None)


@contextmanager
def log_context(*, job: str | None = None, study: str | None = None) -> Iterator[None]:
    """Name the job and / or study of every log line written inside the block."""
    tokens = []
    if job is not None:
        tokens.append((_JOB, _JOB.set(job)))
    if study is not None:
        tokens.append((_STUDY, _STUDY.set(study)))
    try:
        yield
    finally:
        for var, tok in reversed(tokens):
            var.reset(tok)


def bind_study(study: str | None) -> Any:
    """Set the study of the following lines; returns a token for :func:`unbind_study`."""
    return _STUDY.set(study)


def unbind_study(token: Any) -> None:
    _STUDY.reset(token)


def _association() -> dict[str, Any] | None:
    from pynetdicom.association import Association

    t = threading.current_thread()
    if not isinstance(t, Association):
        return None
    a: Any = t
    try:
        out: dict[str, Any] = {"id": f"{t.name}/{t.native_id}"}
        req, acc = a.requestor, a.acceptor
        if a.is_acceptor:
            peer, out["calling_ae"], out["called_ae"] = req, req.ae_title, acc.ae_title
        else:
            peer, out["calling_ae"], out["called_ae"] = acc, req.ae_title, acc.ae_title
        out["peer"] = f"{peer.address}:{peer.port}" if peer.address else None
        return {k: (v.strip() if isinstance(v, str) else v) for k, v in out.items()}
    except Exception:  # a log line must never fail on a half-built association
        return {"id": f"{t.name}/{t.native_id}"}


_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extra attributes passed with ``extra=`` are kept."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "process": record.process,
            "thread": record.threadName, "message": record.getMessage()}
        assoc = _association()
        if assoc is not None:
            out["association"] = assoc
        job, study = _JOB.get(), _STUDY.get()
        if job is not None:
            out["job"] = job
        if study is not None:
            out["study"] = study
        for k, v in vars(record).items():
            if k not in _STD and k not in out and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def use_json_logs(logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (the root logger by default) the JSON formatter."""
    for h in (logger or logging.getLogger()).handlers:
        h.setFormatter(JsonFormatter())
