"""``synthnode config check|show``."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from config.settings import check_config, redacted
from node.cli.common import ConfigOption, console, err_console, settings_from

app = typer.Typer(no_args_is_help=True)


@app.command("check")
def check(file: Path = typer.Argument(..., help="config file to validate")) -> None:
    """Validate FILE; print each bad key with its dotted path and reason (exit 2 if any)."""
    errors = check_config(file)
    if not errors:
        console.print(f"[green]OK[/green] {file}")
        return
    for e in errors:
        err_console.print(f"[red]{e.path}[/red]: {e.reason}")
    raise typer.Exit(2)


@app.command("show")
def show(config: Path | None = ConfigOption) -> None:
    """Print the effective configuration (file + environment) with secrets redacted."""
    console.print_json(json.dumps(redacted(settings_from(config))))
