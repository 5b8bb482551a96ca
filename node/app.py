"""Composition root: build the node's runtime objects from settings, recover after a crash,
start and stop the services.

Start-up order:

1. migrations (``alembic upgrade heads``) unless told not to;
2. engine, file store, index, ledger -> :class:`~node.context.NodeContext`;
3. recovery: remove orphan temp files and files the index does not reference (left by
   a crash between rename and commit), report index rows whose file is missing;
4. log the redacted effective config; ledger ``config.loaded`` and ``node.started``;
5. DIMSE server (and, when their modules exist, the other services); signed ledger
   checkpoints every ``audit.checkpoint_interval_s`` and one at stop.

Nothing here is a global: tests build as many nodes as they like in one process.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.events import Event, EventType, Outcome
from audit.patient import PatientDigester, load_or_create_patient_key
from audit.service import open_ledger_from_settings
from config.settings import Settings, effective_text, redacted
from node.atna import start_feed
from node.context import NodeContext
from node.db import make_engine, upgrade
from node.dimse.server import DimseServer
from node.ingest.ingestor import roll_back_instance
from node.observability.health import Observability, dimse_probe, workers_probe
from node.patients import PatientRefs
from storage.filestore import FileStore
from storage.index import Index

logger = logging.getLogger(__name__)

__all__ = ["Node", "RecoveryReport", "build_context", "create_node", "recover"]

NODE_ACTOR = "component:node"


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up recovery found."""

    temp_files_removed: int
    unreferenced_files_removed: int
    missing_files: tuple[str, ...]  # index rows without their file: must stay empty
    landing_confirmed: int = 0  # indexed files a crash left unconfirmed, found complete
    rolled_back: tuple[str, ...] = ()  # ... found incomplete: SOP Instance UIDs removed


def private_data_dir(data_dir: Path) -> None:
    """Everything the node writes is its own: umask 077 for this process (index, WAL,
    checkpoints, stored files, keys are created 0600, folders 0700) and the data folder
    itself 0700 (tightened, with a warning, when it was open to group or others)."""
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = data_dir.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            data_dir.chmod(0o700)
            logger.warning("data folder %s had mode %o; set to 0700", data_dir, mode)
        except OSError as exc:
            logger.warning("data folder %s has mode %o and cannot be made 0700: %s",
                           data_dir, mode, exc)


def warn_unanchored(settings: Settings) -> bool:
    """Warn loudly when no signed checkpoint leaves this host: someone with write access
    to the data folder could then truncate the ledger and the checkpoint file together
    and still pass ``audit verify``. Returns True when it warned."""
    if settings.audit.syslog_target or settings.audit.syslog.host:
        return False
    logger.warning(
        "NO OFF-NODE ANCHORING of the audit ledger: signed checkpoints stay on this host "
        "(%s). Set [audit] syslog_target (checkpoints to a remote syslog) or "
        "[audit.syslog] host (ATNA feed over TLS) so a copy lives elsewhere.",
        settings.checkpoint_file)
    return True


def build_context(settings: Settings, *, migrate: bool = True,
                  fsync: bool = True) -> NodeContext:
    """Create the shared runtime objects (no network service is started).

    Parameters
    ----------
    settings : Settings
        Validated settings.
    migrate : bool
        Apply every component's migrations first.
    fsync : bool
        File store fsync; ``False`` only for benchmarks that price durability.
    """
    private_data_dir(settings.data_dir)
    url = settings.database_url
    if migrate:
        upgrade(url)
    engine = make_engine(url, echo=settings.database.echo)
    store = FileStore(settings.store_root, min_free_bytes=settings.storage.min_free_bytes,
                      fsync=fsync)
    audit = open_ledger_from_settings(settings, engine)  # signing key created on first use
    patients = PatientRefs(
        PatientDigester(load_or_create_patient_key(settings.patient_key_file)), engine)
    audit.ledger.annotate = patients.annotate  # digests on every event naming a study
    ctx = NodeContext(settings=settings, engine=engine, store=store, index=Index(engine),
                      ledger=audit.ledger, logger=logging.getLogger("node"), audit=audit,
                      patients=patients)
    ctx.observability = Observability(ctx)  # metrics, readiness probes
    return ctx


def recover(ctx: NodeContext, *, remove_unreferenced: bool = True) -> RecoveryReport:
    """Start-up recovery; run before any service accepts work.

    First checks every instance whose file was not yet confirmed durable when the node
    stopped (its landing row, see :mod:`node.ingest.ingestor`): a complete file (size and
    SHA-256 as indexed) is flushed and kept; an incomplete or missing one means the sender
    never got a success, so the instance is rolled back (``instance.rolled_back`` in the
    ledger). Then removes temp files of interrupted writes and stored files no index row
    references (a crash before the commit: the sender got no success for them). Index rows
    whose file is missing are reported (logged as errors), never silently dropped.
    """
    confirmed, rolled = recover_landing(ctx)
    temp = ctx.store.sweep_temp()
    referenced = ctx.index.file_paths()
    removed = 0
    if remove_unreferenced:
        for rel in ctx.store.unreferenced(referenced):
            if ctx.store.delete(rel):
                removed += 1
        if removed:
            logger.warning("removed %d stored file(s) without an index row", removed)
    missing = tuple(sorted(p for p in referenced if not ctx.store.exists(p)))
    if missing:
        logger.error("%d indexed instance(s) have no file in the store (first: %s)",
                     len(missing), missing[0])
    return RecoveryReport(temp, removed, missing, confirmed, rolled)


def recover_landing(ctx: NodeContext) -> tuple[int, tuple[str, ...]]:
    """Settle every landing row (see :func:`recover`): (files kept, SOP UIDs rolled back)."""
    kept, rolled = 0, []
    for path, sop, sha, size in ctx.index.landing():
        try:
            complete = (ctx.store.exists(path) and ctx.store.path(path).stat().st_size == size
                        and ctx.store.sha256(path) == sha)
            if complete:
                ctx.store.flush(path)  # complete in the page cache is not yet on disk
        except OSError:
            complete = False
        if complete:
            with ctx.engine.begin() as conn:
                ctx.index.clear_landing(conn, [path])
            kept += 1
        elif roll_back_instance(ctx, path, sop, sha,
                                "file incomplete after a stop before acknowledgement"):
            rolled.append(sop)
    if rolled:
        logger.warning("rolled back %d instance(s) whose file was incomplete after a crash "
                       "(never acknowledged; the senders resend): %s", len(rolled),
                       ", ".join(rolled[:5]))
    return kept, tuple(rolled)


def _freeze_heap() -> None:
    """Move everything start-up created (modules, dictionaries, the app, ~140,000 objects)
    out of the garbage collector's reach. A full collection otherwise walks all of it,
    80-100 ms holding the interpreter lock, whenever the collector's thresholds trip under
    load and every time pynetdicom's server loop forces one (every 60 polls): every
    association stalls meanwhile (bench/results/ingest.md)."""
    gc.collect()
    gc.freeze()


class Node:
    """A running node: context plus services.

    Use :func:`create_node`; then :meth:`start`, and :meth:`stop` (or :meth:`run` to
    block until a stop is requested, e.g. by SIGTERM).
    """

    def __init__(self, ctx: NodeContext, dimse: DimseServer, recovery: RecoveryReport, *,
                 role: str = "node"):
        self.ctx = ctx
        self.dimse = dimse
        self.recovery = recovery
        self.role = role  # "node" | "acceptor" (a child of a multi-process node)
        self.pipeline: Any = None  # node.pipeline.orchestrator.Pipeline (set by create_node)
        self.feed: Any = None  # audit.syslog.SyslogFeed when [audit.syslog] host is set
        self.dicomweb: Any = None  # node.dicomweb.app.DicomwebServer when [dicomweb] enabled
        self.retention: Any = None  # node.ingest.retention.InstanceRetention when set
        self.stop_requested = threading.Event()
        self._stopped = False

    @property
    def address(self) -> tuple[str, int]:
        return self.dimse.address

    def start(self) -> tuple[str, int]:
        host, port = self.dimse.start()
        if self.role == "acceptor":
            _freeze_heap()
            return host, port  # the parent process records and checkpoints
        if self.ctx.audit is not None:
            self.ctx.audit.start()  # signed checkpoints every audit.checkpoint_interval_s
        self.feed = start_feed(self.ctx)  # ATNA syslog feed, when configured
        s = self.ctx.settings
        self.ctx.ledger.append(Event(
            type=EventType.NODE_STARTED, actor=NODE_ACTOR,
            payload={"ae_title": s.dimse.ae_title, "bind_address": host, "port": port,
                     "pid": os.getpid(), "version": _version(),
                     "recovery": {"temp_files_removed": self.recovery.temp_files_removed,
                                  "unreferenced_files_removed":
                                      self.recovery.unreferenced_files_removed,
                                  "missing_files": len(self.recovery.missing_files)}},
        ))
        if self.pipeline is not None:
            self.pipeline.start()  # quiet-period timers, worker pool
        self.retention = start_retention(self.ctx)
        if self.dicomweb is not None:
            try:
                self.dicomweb.start()  # same process, same context as the DIMSE SCP
            except OSError:
                self.stop(grace_s=1.0)  # e.g. the HTTP port is taken: no half-started node
                raise
        _freeze_heap()
        return host, port

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new associations, finish in-flight stores, record ``node.stopped``."""
        if self._stopped:
            return
        self._stopped = True
        if self.dicomweb is not None:
            self.dicomweb.stop()  # finishes in-flight requests, flushes the access log
        self.dimse.stop(grace_s)
        if self.role == "acceptor":
            self.ctx.engine.dispose()
            return
        if self.retention is not None:
            self.retention.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
        try:
            self.ctx.ledger.append(Event(type=EventType.NODE_STOPPED, actor=NODE_ACTOR,
                                         payload={"pid": os.getpid()}))
        except Exception:
            logger.exception("could not record node.stopped")
        if self.ctx.audit is not None:
            self.ctx.audit.stop()  # final checkpoint covers node.stopped
        if self.feed is not None:
            self.feed.stop()  # sends what it can of the last entries; the cursor keeps the rest
        self.ctx.engine.dispose()

    def request_stop(self) -> None:
        """Thread- and signal-safe: ask :meth:`run` to stop."""
        self.stop_requested.set()

    def run(self, grace_s: float = 30.0) -> None:
        """Start if needed, block until :meth:`request_stop`, then stop gracefully."""
        try:
            _ = self.dimse.address  # raises RuntimeError until the server is started
        except RuntimeError:
            self.start()
        while not self.stop_requested.wait(0.5):
            pass
        self.stop(grace_s)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("synthnode")
    except Exception:
        return "unknown"


def config_digest(settings: Settings) -> tuple[dict[str, Any], str]:
    """The redacted effective config and the SHA-256 of its canonical JSON."""
    eff = redacted(settings)
    canon = json.dumps(eff, sort_keys=True, separators=(",", ":"), default=str)
    return eff, hashlib.sha256(canon.encode()).hexdigest()


def create_node(settings: Settings, *, services: list[Any] | None = None,
                migrate: bool = True, reuse_port: bool = False, fsync: bool = True,
                ctx: NodeContext | None = None, role: str = "node") -> Node:
    """Build a node ready to :meth:`Node.start`: migrations, context, recovery, config
    logged and recorded, DIMSE server assembled.

    ``role="acceptor"``: one acceptor process of a multi-process node (see
    :func:`serve_multi`): no migrations, no recovery (other acceptors may be writing),
    no config/start events and no checkpoints (the parent does those); binds with
    SO_REUSEPORT.
    """
    if role == "acceptor":
        ctx = ctx or build_context(settings, migrate=False, fsync=fsync)
        dimse = DimseServer(ctx, services, reuse_port=True)
        node = Node(ctx, dimse, RecoveryReport(0, 0, ()), role="acceptor")
        node.pipeline = _pipeline(ctx)  # ingest hook only; the parent runs timers and jobs
        return node
    ctx = ctx or build_context(settings, migrate=migrate, fsync=fsync)
    report = recover(ctx)
    _eff, digest = config_digest(settings)
    src = getattr(settings, "_source_file", None)
    logger.info("effective configuration (secrets redacted; from %s and the environment):\n  %s",
                src or "the defaults", effective_text(settings).replace("\n", "\n  "))
    ctx.ledger.append(Event(
        type=EventType.CONFIG_LOADED, actor=NODE_ACTOR,
        outcome=Outcome.SUCCESS,
        payload={"config_sha256": digest, "source": str(src) if src else "<defaults>",
                 "environment": settings.environment},
    ))
    warn_unanchored(settings)
    dimse = DimseServer(ctx, services, reuse_port=reuse_port)
    node = Node(ctx, dimse, report)
    node.pipeline = _pipeline(ctx)
    node.dicomweb = _dicomweb(ctx)
    if node.dicomweb is not None:  # the console's release / discard call this pipeline
        node.dicomweb.app.state.pipeline = node.pipeline
    if ctx.observability is not None:  # /readyz checks the services this node runs
        ctx.observability.add_probe("dimse", dimse_probe(dimse))
        if node.pipeline is not None:
            ctx.observability.add_probe("workers", workers_probe(node.pipeline))
            if getattr(node.pipeline, "runner", None) is not None:  # engine s / slice
                node.pipeline.runner = ctx.observability.metrics.timed_runner(
                    node.pipeline.runner)
    return node


def _dicomweb(ctx: NodeContext) -> Any:
    """The DICOMweb server (STOW / QIDO / WADO-RS), when enabled."""
    if not ctx.settings.dicomweb.enabled:
        return None
    from node.dicomweb.app import DicomwebServer

    return DicomwebServer(ctx)


def _pipeline(ctx: NodeContext) -> Any:
    """The pipeline (study completion -> engine jobs -> dispatch), when enabled."""
    if not ctx.settings.pipeline.enabled:
        return None
    from node.pipeline.orchestrator import build_pipeline

    return build_pipeline(ctx)


def start_retention(ctx: NodeContext) -> Any:
    """Instance retention (``storage.retention_days``), started; None when unset."""
    days = ctx.settings.storage.retention_days
    if days is None:
        return None
    from node.ingest.retention import InstanceRetention

    retention = InstanceRetention(ctx, days)
    retention.start()
    return retention


# -- multi-process acceptors ------------------------------------------------------------
def acceptor_main(argv: list[str] | None = None) -> None:
    """Entry point of one acceptor child: ``python -c 'from node.app import acceptor_main;
    acceptor_main()' CONFIG PORT GRACE``. Prints one ``listening`` line, serves until
    SIGTERM."""
    import signal
    import sys

    from config.settings import load_settings

    args = list(sys.argv[1:] if argv is None else argv)
    config, port, grace = args[0], int(args[1]), float(args[2])
    settings = load_settings(config if config != "-" else None)
    settings.dimse.port = port
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    if settings.log_format == "json":
        from node.observability.logs import use_json_logs

        use_json_logs()
    if settings.log_level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    parent = os.getppid()
    node = create_node(settings, role="acceptor")
    node.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.request_stop())
    _stop_when_orphaned(node, parent)
    print(f"acceptor listening pid {os.getpid()}", flush=True)
    node.run(grace_s=grace)


def _stop_when_orphaned(node: Node, parent: int, every_s: float = 1.0) -> None:
    """An acceptor whose parent died without stopping it (SIGKILL, a crash) stops too,
    finishing its in-flight stores: otherwise it keeps the shared DIMSE port and takes
    associations no parent records or restarts, beside the children of a restarted node."""
    def watch() -> None:
        while not node.stop_requested.wait(every_s):
            if os.getppid() != parent:
                logger.warning("parent process %d is gone: this acceptor stops", parent)
                node.request_stop()
                return

    threading.Thread(target=watch, name="acceptor-parent-watch", daemon=True).start()


def serve_multi(settings: Settings, config: str | None, n: int, *, grace_s: float = 30.0,
                stop: threading.Event | None = None,
                on_listening: Any = None) -> None:
    """Run a node as ``n`` acceptor processes sharing the DIMSE port (SO_REUSEPORT: the
    kernel spreads new connections over the processes, so ingest scales past one
    interpreter's GIL).

    This (parent) process applies migrations, runs recovery before any acceptor starts,
    records ``config.loaded`` / ``node.started`` / ``node.stopped`` and signs the ledger
    checkpoints; the children only serve associations. All share the database (the
    ledger serialises appends on its head row) and the file store. On ``stop`` the
    children get SIGTERM and finish their in-flight stores. A child that dies is
    restarted.
    """
    import subprocess
    import sys

    from node.observability.metrics import process_exited, start_multiprocess, stop_multiprocess

    stop = stop or threading.Event()
    # every process's counters in one per-run folder, summed on /metrics (the children
    # inherit PROMETHEUS_MULTIPROC_DIR)
    metrics_dir = start_multiprocess(settings.data_dir)
    parent = create_node(settings)  # migrations, recovery, config.loaded
    port = settings.dimse.port
    cmd = [sys.executable, "-c", "from node.app import acceptor_main; acceptor_main()",
           config or "-", str(port), str(grace_s)]

    def spawn() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        line = p.stdout.readline() if p.stdout else b""
        if b"listening" not in line:
            p.wait(10)
            raise RuntimeError(f"acceptor process failed to start (exit {p.returncode})")
        return p

    children = [spawn() for _ in range(n)]
    parent.ctx.ledger.append(Event(
        type=EventType.NODE_STARTED, actor=NODE_ACTOR,
        payload={"ae_title": settings.dimse.ae_title, "bind_address": settings.dimse.bind_address,
                 "port": port, "pid": os.getpid(), "version": _version(),
                 "acceptor_pids": [c.pid for c in children],
                 "recovery": {"temp_files_removed": parent.recovery.temp_files_removed,
                              "unreferenced_files_removed":
                                  parent.recovery.unreferenced_files_removed,
                              "missing_files": len(parent.recovery.missing_files)}},
    ))
    if parent.ctx.audit is not None:
        parent.ctx.audit.start()
    parent.feed = start_feed(parent.ctx)
    parent.retention = start_retention(parent.ctx)
    if parent.dicomweb is not None:
        parent.dicomweb.start()  # HTTP in the parent; the acceptors serve DIMSE
    if on_listening is not None:
        on_listening(settings.dimse.bind_address, port)
    try:
        while not stop.wait(0.5):
            for i, c in enumerate(children):
                if c.poll() is not None:
                    logger.error("acceptor pid %d exited with %s; restarting", c.pid,
                                 c.returncode)
                    process_exited(c.pid)
                    children[i] = spawn()
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
        for c in children:
            try:
                c.wait(grace_s + 15)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait(5)
            process_exited(c.pid)
        parent.ctx.stopping.set()
        parent.stop(grace_s=1.0)
        stop_multiprocess(metrics_dir)
