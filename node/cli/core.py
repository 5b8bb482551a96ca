"""``synthnode serve | echo | db upgrade | studies``."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import typer

from node.cli.common import ConfigOption, console, err_console, fail, settings_from

db_app = typer.Typer(no_args_is_help=True, help="Index and ledger database.")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
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
    _setup_logging(settings.log_level)
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
    node.run(grace_s=grace)
    print("synthnode: stopped", flush=True)


def _serve_multi(settings, config: Path | None, grace: float) -> None:  # type: ignore[no-untyped-def]
    import threading

    from config.settings import DEFAULT_CONFIG
    from node.app import serve_multi

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    path = config or Path(os.environ.get("SYNTHNODE_CONFIG", DEFAULT_CONFIG))
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
    """Apply every component's migrations (``alembic upgrade heads``)."""
    from node.db import upgrade

    settings = settings_from(config)
    upgrade(settings.database_url)
    console.print("database up to date")


def studies(
    config: Path | None = ConfigOption,
    limit: int = typer.Option(50, "--limit", help="most recently updated first"),
    show_names: bool = typer.Option(False, "--names", help="also show patient names (PHI)"),
    plain: bool = typer.Option(False, "--plain", help="tab-separated lines, no table"),
) -> None:
    """List stored studies: UID, patient ID, date, modalities, series and instance counts."""
    from rich.table import Table

    from node.db import make_engine
    from storage.index import Index

    settings = settings_from(config)
    engine = make_engine(settings.database_url)
    try:
        rows = Index(engine).studies(limit=limit)
    except Exception as exc:
        err_console.print(f"[red]cannot read the index[/red]: {exc}")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    if plain:
        for r in rows:
            typer.echo("\t".join([r.study_instance_uid, r.patient_id,
                                  *([r.patient_name or ""] if show_names else []),
                                  r.study_date or "", r.accession_number or "",
                                  ",".join(r.modalities), str(r.n_series), str(r.n_instances)]))
        return
    table = Table("Study Instance UID", "Patient ID", *(["Name"] if show_names else []),
                  "Date", "Accession", "Modalities", "Series", "Instances")
    for r in rows:
        table.add_row(r.study_instance_uid, r.patient_id,
                      *([r.patient_name or ""] if show_names else []), r.study_date or "",
                      r.accession_number or "", ",".join(r.modalities), str(r.n_series),
                      str(r.n_instances))
    console.print(table)
    console.print(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("serve")(serve)
    app.command("echo")(echo)
    app.command("studies")(studies)
    app.add_typer(db_app, name="db")
