"""``synthnode config check|show``."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import typer

from config.locate import key_line
from config.sections.pipeline import PipelineSettings
from config.settings import ConfigError, check_config, effective_text, load_settings, redacted
from node.cli.common import ConfigOption, console, settings_from

app = typer.Typer(no_args_is_help=True)


def problems(file: Path) -> list[ConfigError]:
    """Every mistake in ``file``: what the settings schema rejects (unknown keys with a
    suggestion, bad values, missing keys, duplicate approver names), then what only the
    node knows (rules: unknown match keys, malformed comparisons, bad regexes, unknown
    tasks and task parameters, tasks without an installed model); each with the line it is
    on."""
    errors = check_config(file)
    if errors and not errors[0].path:  # the file itself: missing, not TOML
        return errors
    from node.pipeline.rules import rule_problems

    models_dir = None
    try:
        if not errors:
            settings = load_settings(file)
            pipeline, models_dir = settings.pipeline, settings.models_dir
        else:
            pipeline = PipelineSettings(**tomllib.loads(file.read_text())["pipeline"])
    except (KeyError, ValueError):  # no pipeline section, or it has schema errors itself
        return errors
    text = file.read_text(encoding="utf-8", errors="replace")
    return errors + [ConfigError(p.path, p.reason, key_line(text, p.path), p.hint)
                     for p in rule_problems(pipeline, models_dir)]


@app.command("check")
def check(file: Path = typer.Argument(..., help="config file to validate")) -> None:
    """Validate FILE: each mistake as FILE:LINE: key: why (did you mean ...?); exit 2 if
    there is any."""
    found = problems(file)
    if not found:
        console.print(f"[green]OK[/green] {file}", highlight=False)
        return
    for e in found:
        typer.echo(e.located(str(file)), err=True)
    typer.echo(f"{len(found)} problem(s) in {file}", err=True)
    raise typer.Exit(2)


@app.command("show")
def show(
    config: Path | None = ConfigOption,
    as_json: bool = typer.Option(False, "--json", help="as one JSON object"),
) -> None:
    """Print the effective configuration (file + environment + defaults) with secrets
    redacted: one ``key = value`` line per setting, or --json."""
    settings = settings_from(config)
    if as_json:
        console.print_json(json.dumps(redacted(settings)))
        return
    typer.echo(effective_text(settings))
