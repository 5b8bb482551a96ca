"""Where a dotted settings path is written in a TOML file (``tomllib`` keeps no line numbers).

``key_line(text, "pipeline.rules.1.match.rows")`` is the 1-based line of that key: table
headers (``[a.b]``, ``[[a.b]]`` with their array index), dotted keys and keys inside inline
tables and arrays (``match = { rows = ">=abc" }``) are followed. For a key that is not
written (a missing required key) the line of its nearest written parent is returned.
"""
from __future__ import annotations

import re

__all__ = ["key_line", "split_key"]

_ARRAY_TABLE = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]\s*(#.*)?$")
_TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_PART = r"""(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")


def split_key(dotted: str) -> list[str]:
    """TOML dotted key -> parts (quotes removed)."""
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([^.\s]+)', dotted)
    return [a or b or c for a, b, c in parts]


def _resolve(parts: list[str], arrays: dict[tuple[str, ...], int]) -> list[str]:
    """Insert the current index after every prefix that is an array of tables."""
    out: list[str] = []
    for p in parts:
        out.append(p)
        idx = arrays.get(tuple(out))
        if idx is not None:
            out.append(str(idx))
    return out


def _written(text: str) -> list[tuple[int, list[str], bool]]:
    """Every header and key line: ``(line number, full path, is_header)``."""
    out: list[tuple[int, list[str], bool]] = []
    arrays: dict[tuple[str, ...], int] = {}
    table: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if m := _ARRAY_TABLE.match(raw):
            parts = split_key(m.group(1))
            base = [*_resolve(parts[:-1], arrays), parts[-1]]
            key = tuple(base)
            arrays[key] = arrays.get(key, -1) + 1
            table = [*base, str(arrays[key])]
            out.append((n, table, True))
        elif m := _TABLE.match(raw):
            table = _resolve(split_key(m.group(1)), arrays)
            out.append((n, table, True))
        elif m := _KEY.match(raw):
            out.append((n, table + split_key(m.group(1)), False))
    return out


def key_line(text: str, path: str | list[str]) -> int | None:
    """1-based line where ``path`` (dotted, list indexes as numbers) is written, or that
    of its nearest written parent; None when nothing of it is in ``text``."""
    target = [str(p) for p in (path.split(".") if isinstance(path, str) else path)]
    best: tuple[int, int] | None = None  # (matched length, line)
    written = _written(text)
    below = [n for n, full, _ in written
             if len(full) > len(target) and full[:len(target)] == target]
    for n, full, _hdr in written:
        if len(full) <= len(target) and target[:len(full)] == full:
            if best is None or len(full) > best[0] or (len(full) == best[0] and n < best[1]):
                best = (len(full), n)
    if best is None or (best[0] < len(target) and below):
        return below[0] if below else None  # the path is a table / array written below
    length, line = best
    if length < len(target):
        # inside an inline table / array written from ``line`` on: find the key itself
        leaf = next((p for p in reversed(target[length:]) if not p.isdigit()), None)
        if leaf is not None:
            lines = text.splitlines()
            pat = re.compile(r'(^|[\s{,])("?)' + re.escape(leaf) + r'\2\s*=')
            for k in range(line - 1, len(lines)):
                if k > line - 1 and (_TABLE.match(lines[k]) or _ARRAY_TABLE.match(lines[k])):
                    break
                if pat.search(lines[k]):
                    return k + 1
    return line
