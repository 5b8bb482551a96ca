"""Options and helpers shared by every command group."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from config.settings import DEFAULT_CONFIG, ConfigFileError, Settings, load_settings

console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(
    None,
    "--config",
    "-c",
    help="TOML config file (default: $SYNTHNODE_CONFIG or the bundled config/default.toml).",
    envvar="SYNTHNODE_CONFIG",
)


def settings_from(config: Path | None) -> Settings:
    """Load settings or exit 2 naming every bad key."""
    path = config or Path(os.environ.get("SYNTHNODE_CONFIG", DEFAULT_CONFIG))
    try:
        return load_settings(path)
    except ConfigFileError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    sys.stderr.flush()
    raise typer.Exit(code)
