"""``synthnode serve | echo | db upgrade | studies``."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import typer

from node.cli.common import (
    ConfigOption,
    config_path,
    console,
    fail,
    open_engine,
    settings_from,
)
from node.cli.output import Col, JsonOption, PlainOption, WideOption, emit

db_app = typer.Typer(no_args_is_help=True, help="Index and ledger database.")


def _setup_logging(level: str, fmt: str = "text") -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
    if fmt == "json":
        from node.observability.logs import use_json_logs

        use_json_logs()
    # pynetdicom logs every PDU at INFO; keep it to warnings unless debugging
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # APScheduler logs every timer run at INFO (the quiet-period sweep runs every 10 s)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)


def serve(
    config: Path | None = ConfigOption,
    port: int | None = typer.Option(None, "--port", help="override dimse.port"),
    no_migrate: bool = typer.Option(False, "--no-migrate", help="do not apply migrations"),
    grace: float = typer.Option(30.0, "--grace", help="seconds to finish work on SIGTERM"),
) -> None:
    """Run the node: migrations, recovery, DIMSE SCP; SIGTERM/SIGINT stop it gracefully
    (new associations refused, in-flight stores finished)."""
    settings = settings_from(config)
    if port is not None:
        settings.dimse.port = port
    if no_migrate:
        open_engine(settings, config).dispose()  # refuse an unmigrated database in one line
    _setup_logging(settings.log_level, settings.log_format)
    if config_path(config) is None:
        logging.getLogger("node").info(
            "no --config: bundled defaults, data in %s (copy %s, edit it and pass --config "
            "to choose)", settings.data_dir, _default_config())
    if settings.dimse.acceptor_processes > 1:
        _serve_multi(settings, config, grace)
        return
    from node.app import create_node

    try:
        node = create_node(settings, migrate=not no_migrate)
        host, bound = node.start()
    except OSError as exc:
        fail(f"cannot start: {exc}")
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.request_stop())
    # one line on stdout that scripts and tests can wait for
    print(f"synthnode: listening {settings.dimse.ae_title}@{host}:{bound} pid {os.getpid()}",
          flush=True)
    if node.dicomweb is not None:
        print(f"synthnode: DICOMweb {node.dicomweb.url}/studies", flush=True)
    node.run(grace_s=grace)
    print("synthnode: stopped", flush=True)


def _default_config() -> Path:
    from config.settings import DEFAULT_CONFIG

    return DEFAULT_CONFIG


def _serve_multi(settings, config: Path | None, grace: float) -> None:  # type: ignore[no-untyped-def]
    import threading

    from node.app import serve_multi

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    path = config_path(config) or _default_config()
    # the acceptor children load the same file: give them the data folder chosen here
    os.environ.setdefault("SYNTHNODE_DATA_DIR", str(settings.data_dir))
    n = settings.dimse.acceptor_processes

    def listening(host: str, port: int) -> None:
        print(f"synthnode: listening {settings.dimse.ae_title}@{host}:{port} pid {os.getpid()} "
              f"({n} acceptor processes)", flush=True)

    serve_multi(settings, str(path), n, grace_s=grace, stop=stop, on_listening=listening)
    print("synthnode: stopped", flush=True)


def echo(
    host: str = typer.Argument(..., help="peer host"),
    port: int = typer.Argument(..., help="peer port"),
    aet: str = typer.Argument(..., help="peer (called) AE title"),
    calling: str = typer.Option("SYNTHNODE-CLI", "--calling", help="our (calling) AE title"),
    timeout: float = typer.Option(10.0, "--timeout"),
) -> None:
    """C-ECHO a DICOM peer (PS3.4 Annex A); exit 0 on success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        fail(f"association with {aet}@{host}:{port} "
             f"{'rejected' if assoc.is_rejected else 'failed'}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        fail("no C-ECHO response")
    if code != 0:
        fail(f"C-ECHO status 0x{code:04X}")
    console.print(f"C-ECHO {aet}@{host}:{port}: success")


@db_app.command("upgrade")
def db_upgrade(config: Path | None = ConfigOption) -> None:
    """Apply every component's migrations (``alembic upgrade heads``); creates the SQLite
    file and the data folder when they do not exist."""
    from node.db import redact_url, upgrade

    settings = settings_from(config)
    try:
        upgrade(settings.database_url)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        fail(f"cannot migrate the database at {redact_url(settings.database_url)}: {first}")
    console.print(f"database up to date ({redact_url(settings.database_url)})", highlight=False)


STUDY_COLS = [
    Col("study_uid", "Study Instance UID", "uid"),
    Col("patient_id", "Patient ID", "uid"),
    Col("date", "Date"),
    Col("accession", "Accession", "uid"),
    Col("modalities", "Modalities", "text"),
    Col("series", "Series", align="right"),
    Col("instances", "Instances", align="right"),
]


def studies(
    config: Path | None = ConfigOption,
    limit: int = typer.Option(50, "--limit", min=1, help="most recently updated first"),
    show_names: bool = typer.Option(False, "--names", help="also show patient names (PHI)"),
    plain: bool = PlainOption,
    wide: bool = WideOption,
    as_json: bool = JsonOption,
) -> None:
    """List stored studies: UID, patient ID, date, accession, modalities, series and
    instance counts (most recently updated first)."""
    from storage.index import Index

    settings = settings_from(config)
    engine = open_engine(settings, config)
    try:
        found = Index(engine).studies(limit=limit)
    finally:
        engine.dispose()
    rows = [{"study_uid": r.study_instance_uid, "patient_id": r.patient_id,
             **({"patient_name": r.patient_name or ""} if show_names else {}),
             "date": r.study_date or "", "accession": r.accession_number or "",
             "modalities": ",".join(r.modalities), "series": r.n_series,
             "instances": r.n_instances} for r in found]
    cols = list(STUDY_COLS)
    if show_names:
        cols.insert(2, Col("patient_name", "Name", "text"))
    emit(cols, rows, as_json=as_json, plain=plain, wide=wide,
         footer=f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("serve")(serve)
    app.command("echo")(echo)
    app.command("studies")(studies)
    app.add_typer(db_app, name="db")
