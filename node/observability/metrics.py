"""Prometheus metrics of one node (the official ``prometheus_client`` library).

Each node has its own :class:`~prometheus_client.CollectorRegistry` (tests run several
nodes in one process). Two kinds of series:

* live counters and histograms updated where the work happens (this process only; they
  start at zero when the process starts, as Prometheus expects of counters):
  ``synthnode_instances_received_total{source,result}``,
  ``synthnode_instances_refused_total{source,reason}``,
  ``synthnode_ingest_seconds{source}`` (``source="dimse"``: C-STORE, ``"stow"``: STOW-RS),
  ``synthnode_stored_bytes_total{source}``, ``synthnode_http_requests_total{route,method,status}``,
  ``synthnode_http_request_seconds{route}`` and ``synthnode_engine_seconds_per_slice{task}``;
* gauges read from the database at scrape time (the whole node, every process, since the
  database was created): instances and bytes in the index, jobs by kind / state / task,
  dispatch jobs and attempts by destination and state, ledger entries, last checkpoint
  size and age, free disk space of the store.

A node run as several acceptor processes (``dimse.acceptor_processes > 1``) uses the
library's multiprocess mode: the parent calls :func:`start_multiprocess` before it builds
its node, which makes a fresh per-run folder ``<data_dir>/run/metrics-<pid>`` and sets
``PROMETHEUS_MULTIPROC_DIR`` to it, so that every process's counters and histograms (the
parent's and the acceptor children's, which inherit the variable) are written there;
``/metrics`` and the console sum them over the processes
(:class:`~prometheus_client.multiprocess.MultiProcessCollector`). A child that exits is
marked dead (:func:`process_exited`); its counts stay in the sums.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

if TYPE_CHECKING:
    from node.context import NodeContext

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "NodeMetrics", "process_exited",
           "start_multiprocess", "stop_multiprocess"]

#: the variable prometheus_client reads to write each process's values to a folder
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)


class NodeMetrics:
    """The metrics of one node: live instruments plus a scrape-time database collector."""

    def __init__(self, ctx: NodeContext | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: the multiprocess folder when this node's processes share their counts
        self.multiprocess_dir: str | None = os.environ.get(MULTIPROC_ENV) or None
        self._database = DatabaseCollector(ctx) if ctx is not None else None
        self.received = Counter("synthnode_instances_received", "instances stored or "
                                "acknowledged (identical re-send, kept first copy)",
                                ["source", "result"], registry=r)
        self.refused = Counter("synthnode_instances_refused", "instances refused, by reason",
                               ["source", "reason"], registry=r)
        self.ingest_seconds = Histogram("synthnode_ingest_seconds", "time to ingest one "
                                        "instance (parse, write, fsync, commit, ledger)",
                                        ["source"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stored_bytes = Counter("synthnode_stored_bytes", "bytes of instances written "
                                    "to the store", ["source"], registry=r)
        self.http_requests = Counter("synthnode_http_requests", "HTTP requests by route "
                                     "template, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_seconds = Histogram("synthnode_http_request_seconds", "HTTP request "
                                      "duration until the response starts", ["route"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.engine_seconds = Histogram("synthnode_engine_seconds_per_slice", "engine "
                                        "time of one job divided by its slices",
                                        ["task"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05,
                                                           0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                                           10.0), registry=r)
        if self._database is not None:
            r.register(self._database)

    # instruments ------------------------------------------------------------------------
    def observe_ingest(self, source: str, seconds: float, result: str | None,
                       reason: str | None, size: int = 0) -> None:
        """One ingest: ``result`` (stored, replaced, ...) or ``reason`` of the refusal."""
        src = _source(source)
        self.ingest_seconds.labels(src).observe(seconds)
        if reason is not None:
            self.refused.labels(src, reason).inc()
        else:
            self.received.labels(src, result or "stored").inc()
            if size and result in ("stored", "replaced"):
                self.stored_bytes.labels(src).inc(size)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    def timed_runner(self, runner: Any) -> Any:
        """``runner`` (the pipeline's engine runner: ``(task, volume, params, seed, model)``)
        observing ``synthnode_engine_seconds_per_slice`` on each successful call."""
        def run(task: str, volume: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = runner(task, volume, *args, **kwargs)
            shape: tuple[int, ...] = tuple(getattr(volume, "shape", ()))
            slices = int(shape[0]) if len(shape) >= 3 and shape[0] else 1
            self.engine_seconds.labels(task or "").observe((time.perf_counter() - t0) / slices)
            return out
        return run

    def exposition(self) -> bytes:
        """The Prometheus text format of every series (in multiprocess mode the live series
        summed over the node's processes)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(reg, self.multiprocess_dir)
        if self._database is not None:
            reg.register(self._database)
        return generate_latest(reg)

    def total(self, name: str, **labels: str) -> float:
        """The sum of a live counter's ``name_total`` samples matching ``labels`` (over
        every process of the node in multiprocess mode)."""
        if self.multiprocess_dir is None:
            families = [f for c in (self.received, self.refused, self.stored_bytes,
                                    self.http_requests) for f in c.collect()]
        else:
            from prometheus_client.multiprocess import MultiProcessCollector

            families = list(MultiProcessCollector(None, self.multiprocess_dir).collect())
        return sum(s.value for f in families for s in f.samples
                   if s.name == name + "_total"
                   and all(s.labels.get(k) == v for k, v in labels.items()))


def start_multiprocess(data_dir: Path) -> Path:
    """Multiprocess mode for a node run as several processes (call in the parent before its
    node is built; the children inherit the variable): a fresh per-run folder under
    ``data_dir / "run"`` (folders of earlier runs removed), ``PROMETHEUS_MULTIPROC_DIR`` set
    to it, and this process's instruments made from now on writing there too."""
    from prometheus_client import values

    root = Path(data_dir) / "run"
    for old in root.glob("metrics-*"):
        shutil.rmtree(old, ignore_errors=True)
    folder = root / f"metrics-{os.getpid()}"
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    values.ValueClass = values.get_value_class()  # chosen at import time otherwise
    return folder


def process_exited(pid: int) -> None:
    """A process of the node exited: its live gauges go (its counts stay in the sums)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if folder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, folder)


def stop_multiprocess(folder: Path) -> None:
    """The run is over: back to single-process values; the folder is removed."""
    from prometheus_client import values

    if os.environ.get(MULTIPROC_ENV) == str(folder):
        del os.environ[MULTIPROC_ENV]
    values.ValueClass = values.get_value_class()
    shutil.rmtree(folder, ignore_errors=True)


def _source(source: str) -> str:
    return source if source in ("dimse", "stow", "pipeline") else "other"


class DatabaseCollector(Collector):
    """Gauges computed from the index, pipeline and ledger tables at scrape time."""

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        from audit.tables import ledger_checkpoints, ledger_head
        from storage.tables import Instance

        ctx = self.ctx
        ti = Instance.__table__
        measured = time.time()
        with ctx.engine.connect() as c:
            n, size = c.execute(select(func.count(), func.coalesce(func.sum(ti.c.file_size),
                                                                    0))).one()
            head = c.execute(select(ledger_head.c.size)).scalar()
            cp = c.execute(select(ledger_checkpoints.c.size, ledger_checkpoints.c.signed_at)
                           .order_by(ledger_checkpoints.c.size.desc()).limit(1)).first()
            jobs = _job_rows(c)
        g = GaugeMetricFamily("synthnode_index_instances", "instances in the index")
        g.add_metric([], float(n))
        yield g
        g = GaugeMetricFamily("synthnode_index_bytes", "bytes of the indexed instances")
        g.add_metric([], float(size))
        yield g
        g = GaugeMetricFamily("synthnode_ledger_entries", "entries appended to the ledger "
                              "(its size)")
        g.add_metric([], float(head or 0))
        yield g
        g = GaugeMetricFamily("synthnode_ledger_checkpoint_size", "entries covered by the "
                              "last signed checkpoint")
        g.add_metric([], float(cp[0]) if cp else 0.0)
        yield g
        if cp is not None:
            g = GaugeMetricFamily("synthnode_ledger_checkpoint_age_seconds", "seconds since "
                                  "the last signed checkpoint")
            g.add_metric([], max(0.0, measured - _aware(cp[1]).timestamp()))
            yield g
        yield from _job_metrics(jobs)
        free = GaugeMetricFamily("synthnode_store_free_bytes", "free bytes on the file "
                                 "store's file system")
        try:
            free.add_metric([], float(shutil.disk_usage(ctx.store.root).free))
        except OSError:
            pass
        yield free


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _job_rows(conn: Any) -> list[tuple[str, str, str | None, str, int]]:
    """(kind, state, task, spec, attempts) of every pipeline job, or [] when the
    pipeline's tables are absent."""
    try:
        from node.pipeline.tables import jobs
    except ImportError:  # pragma: no cover - the pipeline is part of the node
        return []
    rows = conn.execute(select(jobs.c.kind, jobs.c.state, jobs.c.task, jobs.c.spec,
                               jobs.c.attempts))
    return [(r[0], r[1], r[2], r[3] or "{}", int(r[4] or 0)) for r in rows]


def _job_metrics(rows: list[tuple[str, str, str | None, str, int]]) -> Iterator[Metric]:
    by_state: dict[tuple[str, str, str], int] = {}
    by_dest: dict[tuple[str, str], int] = {}
    attempts: dict[str, int] = {}
    for kind, state, task, spec, n in rows:
        key = (kind, state, task or "")
        by_state[key] = by_state.get(key, 0) + 1
        if kind == "dispatch":
            try:
                dest = str(json.loads(spec).get("destination") or "")
            except ValueError:
                dest = ""
            by_dest[(dest, state)] = by_dest.get((dest, state), 0) + 1
            attempts[dest] = attempts.get(dest, 0) + n
    g = GaugeMetricFamily("synthnode_jobs", "pipeline jobs by kind, state and task",
                          labels=["kind", "state", "task"])
    for key, v in sorted(by_state.items()):
        g.add_metric(list(key), float(v))
    yield g
    g = GaugeMetricFamily("synthnode_dispatch_jobs", "dispatch jobs by destination and "
                          "state (state=failed: dispatch failures)",
                          labels=["destination", "state"])
    for dkey, v in sorted(by_dest.items()):
        g.add_metric(list(dkey), float(v))
    yield g
    g = GaugeMetricFamily("synthnode_dispatch_attempts", "dispatch attempts made, by "
                          "destination", labels=["destination"])
    for dest, v in sorted(attempts.items()):
        g.add_metric([dest], float(v))
    yield g


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
