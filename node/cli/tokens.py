"""``synthnode tokens``: bearer tokens of the DICOMweb server (``[[dicomweb.tokens]]``).

The config keeps only a token's SHA-256; the token itself is printed once, here.
"""
from __future__ import annotations

from pathlib import Path

import typer

from node.cli.common import config_path, console, fail

app = typer.Typer(no_args_is_help=True)

SCOPES = ("store", "read", "audit", "admin")


def _toml_entry(name: str, digest: str, scopes: list[str]) -> str:
    quoted = ", ".join(f'"{s}"' for s in scopes)
    return (f'\n[[dicomweb.tokens]]\nname = "{name}"\ntoken_sha256 = "{digest}"\n'
            f"scopes = [{quoted}]\n")


@app.command("create")
def create(
    name: str = typer.Argument(..., help="who holds the token (recorded as token:NAME)"),
    scopes: str = typer.Option("read", "--scopes", "-s",
                               help="comma-separated: store, read, audit, admin"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="append the entry to this config file (else print it)"),
) -> None:
    """Make a random bearer token; print it once and the config entry holding its hash."""
    from node.dicomweb.auth import new_token

    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SCOPES]
    if not wanted or bad:
        fail(f"scopes must be among {', '.join(SCOPES)} (got {scopes!r})", 2)
    if '"' in name or "\\" in name or not name.strip():
        fail("token name must be non-empty, without quotes or backslashes", 2)
    token, digest = new_token()
    entry = _toml_entry(name, digest, wanted)
    path = config_path(config)
    if path is not None:
        from config.settings import ConfigFileError, load_settings

        before = path.read_text() if path.exists() else ""
        path.write_text(before + entry)
        try:
            load_settings(path)
        except ConfigFileError as exc:
            path.write_text(before)
            fail(f"{path}: the entry would make the config invalid: {exc}")
        console.print(f"added token {name!r} to {path} (restart the node to use it)")
    else:
        print(entry.strip())
    print(f"token: {token}")
    console.print("keep the token secret: it is shown only now; the config holds its hash",
                  style="dim")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="tokens", help="DICOMweb bearer tokens.")
