"""Output and input conventions shared by the ``synthnode`` listings.

* **Times in**: ``--since`` / ``--until`` take what a person types: a duration back from now
  (``90s``, ``30m``, ``24h``, ``7d``, ``2w``), ``now``, ``today``, ``yesterday`` (the start of
  that day, UTC), a date (``2026-11-01``), a date and time (``2026-11-01 08:00``) or ISO 8601
  (``2026-11-01T08:00:00Z``, ``...+01:00``); without an offset a time is UTC.
* **Times out**: ISO 8601 in UTC with ``Z`` (the ledger's form), to the second.
* **Tables**: every value whole. At the terminal's width a UID folds onto the next line (at a
  dot where it can) instead of being cut; ``--wide`` (and any output that is not a terminal:
  a pipe, a file) puts each row on one line; ``--plain`` is tab-separated with a header row;
  ``--json`` is machine-readable.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import typer

__all__ = [
    "Col",
    "JsonOption",
    "PlainOption",
    "WideOption",
    "emit",
    "fmt_time",
    "parse_time",
    "render_table",
    "time_option",
]

_DURATION = re.compile(r"^\s*(\d+)\s*(s|sec|secs|m|min|mins|h|hr|hrs|hours?|d|days?|w|weeks?)\s*$",
                       re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_HELP = "24h, 7d, yesterday, 2026-11-01, 2026-11-01T08:00Z (UTC unless an offset is given)"


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from what an administrator types (see the module docs).

    Raises
    ------
    ValueError
        naming the accepted forms.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    t = text.strip()
    low = t.lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1),
             "tomorrow": midnight + timedelta(days=1)}
    if low in named:
        return named[low]
    m = _DURATION.match(low)
    if m:
        unit = m.group(2)[0] if not m.group(2).startswith("mi") else "m"
        return now - timedelta(seconds=int(m.group(1)) * _UNIT_S[unit])
    try:
        parsed = datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time; use {TIME_HELP}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _parse_time_param(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    try:
        return parse_time(str(value))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def time_option(name: str, what: str) -> Any:
    """A typer option that yields an aware UTC datetime (or None) from human input."""
    return typer.Option(None, name, help=f"{what}: {TIME_HELP}", parser=_parse_time_param,
                        metavar="TIME")


def fmt_time(t: datetime | None) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC; a naive time is taken as UTC (SQLite returns those
    for columns written in UTC); '' for None."""
    if t is None:
        return ""
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- tables ------------------------------------------------------------------------------
JsonOption = typer.Option(False, "--json", help="machine-readable JSON")
PlainOption = typer.Option(False, "--plain", help="tab-separated lines with a header row")
WideOption = typer.Option(
    False, "--wide", help="one line per row, never folded (default when not a terminal)"
)

Wrap = Literal["none", "uid", "text"]


@dataclass(frozen=True)
class Col:
    """A table column: the row key, its header, how a long value folds (``uid``: at dots,
    ``text``: at spaces, ``none``: never) and its alignment."""

    key: str
    header: str
    wrap: Wrap = "none"
    align: Literal["left", "right"] = "left"


def _fold_uid(value: str, width: int) -> list[str]:
    out: list[str] = []
    rest = value
    while len(rest) > width:
        cut = rest.rfind(".", 0, width) + 1  # keep the dot at the end of the line
        if cut <= width // 2:
            cut = width
        out.append(rest[:cut])
        rest = rest[cut:]
    return [*out, rest]


def _fold(value: str, width: int, wrap: Wrap) -> list[str]:
    if wrap == "none" or len(value) <= width:
        return [value]
    if wrap == "uid":
        return _fold_uid(value, width)
    return textwrap.wrap(value, width, break_long_words=True, break_on_hyphens=False) or [""]


def _widths(cols: Sequence[Col], rows: Sequence[Sequence[str]], width: int | None) -> list[int]:
    natural = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    gap = 2 * (len(cols) - 1)
    if width is None or sum(natural) + gap <= width:
        return natural
    fixed = sum(n for n, c in zip(natural, cols, strict=True) if c.wrap == "none") + gap
    foldable = [i for i, c in enumerate(cols) if c.wrap != "none"]
    out = list(natural)
    for i in foldable:  # each foldable column gets at least its floor ...
        out[i] = min(natural[i], max(12, *(len(w) for w in cols[i].header.split())))
    left = width - fixed - sum(out[i] for i in foldable)
    want = {i: natural[i] - out[i] for i in foldable}
    total = sum(want.values())
    for i in foldable:  # ... and a share of the rest in proportion to what it lacks
        if left > 0 and total:
            out[i] += min(want[i], left * want[i] // total)
    return out


def render_table(cols: Sequence[Col], rows: Iterable[dict[str, Any]],
                 width: int | None = None) -> str:
    """The table as text: a header, a rule, then each row; values longer than their column
    fold onto more lines (never cut). ``width`` None: no limit (one line per row)."""
    cells = [[("" if r.get(c.key) is None else str(r.get(c.key))) for c in cols] for r in rows]
    widths = _widths(cols, cells, width)

    def line(parts: Sequence[str]) -> str:
        return "  ".join(
            p.rjust(w) if c.align == "right" else p.ljust(w)
            for p, w, c in zip(parts, widths, cols, strict=True)
        ).rstrip()

    headers = [c.header for c in cols]
    out = [line(headers), line(["─" * w for w in widths])]
    for row in cells:
        folded = [_fold(v, w, c.wrap) for v, w, c in zip(row, widths, cols, strict=True)]
        for k in range(max(len(f) for f in folded)):
            out.append(line([f[k] if k < len(f) else "" for f in folded]))
    return "\n".join(out)


def terminal_width() -> int | None:
    """The terminal's width, or None (no limit) when stdout is not a terminal."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((80, 24)).columns


def emit(cols: Sequence[Col], rows: Sequence[dict[str, Any]], *, as_json: bool = False,
         plain: bool = False, wide: bool = False,
         json_rows: Callable[[], Any] | None = None, footer: str | None = None) -> None:
    """Print a listing as a table (default), ``--plain`` TSV with a header row, or
    ``--json`` (``json_rows()`` when given, else the rows as a JSON array)."""
    if as_json:
        typer.echo(json.dumps(json_rows() if json_rows else list(rows), indent=1, default=str))
        return
    if plain:
        typer.echo("\t".join(c.key for c in cols))
        for r in rows:
            typer.echo("\t".join("" if r.get(c.key) is None
                                 else str(r.get(c.key)).replace("\t", " ") for c in cols))
        return
    typer.echo(render_table(cols, rows, None if wide else terminal_width()))
    if footer:
        typer.echo(footer)
