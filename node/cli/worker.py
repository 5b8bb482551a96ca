"""``synthnode worker``: a Celery worker running pipeline jobs (scale-out, docs/scale_out.md)."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import typer

from node.cli.common import ConfigOption, fail, settings_from

logger = logging.getLogger(__name__)


def worker(
    config: Path | None = ConfigOption,
    queues: str = typer.Option("engine,dispatch", "--queues", "-Q",
                               help="logical queues to consume: engine (GPU work), dispatch"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, max=64,
                                    help="jobs run at the same time (threads)"),
    queue_prefix: str | None = typer.Option(
        None, "--queue-prefix", envvar="SYNTHNODE_CELERY_QUEUE_PREFIX",
        help="broker queue name prefix (several nodes on one broker)"),
    loglevel: str = typer.Option("INFO", "--loglevel"),
) -> None:
    """Consume job ids from the broker (``pipeline.broker_url``): claim each job in the
    database, run it, record the outcome. The node's context (database, ledger, store,
    model gate, watermark key) is built from the config as ``synthnode serve`` builds it."""
    from node.app import build_context
    from node.pipeline.broker import BrokerPool, WorkerRuntime, make_celery, worker_queues
    from node.pipeline.jobs import JobKind
    from node.pipeline.orchestrator import build_pipeline

    settings = settings_from(config)
    url = settings.pipeline.broker_url
    if not url:
        fail("pipeline.broker_url is not set: jobs run in the node's local worker pool")
        return
    logging.basicConfig(level=getattr(logging, loglevel.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    for noisy in ("apscheduler", "alembic", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app = make_celery(url, prefix=queue_prefix)
    try:
        names = worker_queues(app, queues.split(","))
    except ValueError as exc:
        fail(f"unknown queue: {exc} (use engine, dispatch)")
        return
    ctx = build_context(settings)  # migrations, database, store, ledger (as serve does)
    pipeline = build_pipeline(ctx)  # gated engine runner, watermark key, dispatcher
    if isinstance(pipeline.pool, BrokerPool):  # dispatch jobs queued here: publish on this app
        pipeline.pool.app = app
        pipeline.pool.queues = app.synthnode_queues  # type: ignore[attr-defined]
    app.synthnode = WorkerRuntime(  # type: ignore[attr-defined]
        store=pipeline.jobs,
        handlers={JobKind.ENGINE: pipeline.run_engine_job,
                  JobKind.DISPATCH: pipeline.run_dispatch_job},
        backoff_s=settings.pipeline.retry_backoff_s,
    )
    logger.info("worker consuming %s with concurrency %d", ",".join(names), concurrency)
    try:
        w = app.Worker(queues=names, concurrency=concurrency,
                       pool="solo" if concurrency == 1 else "threads",
                       loglevel=loglevel.upper(),
                       hostname=f"synthnode-{os.getpid()}@{socket.gethostname()}",
                       without_heartbeat=True, without_mingle=True, without_gossip=True)
        w.start()
    finally:
        pipeline.dispatcher.close()
        pipeline.tracker.shutdown()
        ctx.engine.dispose()
    raise typer.Exit(w.exitcode or 0)


def register(app: typer.Typer) -> None:
    """Add ``worker`` to the top-level app."""
    app.command("worker")(worker)
