"""Command group placeholder: filled in by the part of the node that owns it."""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)
