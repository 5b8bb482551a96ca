"""Command group placeholder: filled in by the part of the node that owns it."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
