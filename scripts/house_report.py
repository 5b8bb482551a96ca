#!/usr/bin/env python3
"""Architecture hygiene report: import cycles, longest functions, ruff and mypy counts.

Run from the repository root::

    python scripts/house_report.py            # everything (ruff and mypy take a minute)
    python scripts/house_report.py --no-tools # cycles and function lengths only

Import cycles are found on the static import graph of the product packages (node, engine,
storage, audit, config). Two graphs are reported: module-level imports (including those
under ``if TYPE_CHECKING:``) and, separately, every import including the ones inside
functions (lazy imports). An import of ``pkg.mod`` counts as an edge to ``pkg.mod`` and,
because Python runs it, to every parent package ``__init__`` on the way (except the
importing module's own parents, which always run first).
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("node", "engine", "storage", "audit", "config")
ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(mod: str, level: int, name: str | None, current: str, is_pkg: bool) -> str:
    if level == 0:
        return name or ""
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(*, lazy: bool) -> dict[str, set[str]]:
    """module -> project modules it imports (module level, or everywhere with ``lazy``)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        nodes = ast.walk(tree) if lazy else _module_level(tree)
        for node in nodes:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node.level, node.module, mod, is_pkg)
                targets = [base]
                targets += [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                # the module itself and every parent package it runs
                parts = t.split(".")
                for i in range(1, len(parts) + 1):
                    cand = ".".join(parts[:i])
                    # a module's own parent packages run before it anyway: not an edge
                    if cand in mods and cand != mod and not mod.startswith(cand + "."):
                        graph[mod].add(cand)
        graph.setdefault(mod, set())
    return graph


def _module_level(tree: ast.Module):  # type: ignore[no-untyped-def]
    """Statements at module level, descending into if / try blocks (TYPE_CHECKING)."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If | ast.Try):
            stack.extend(node.body)
            stack.extend(node.orelse)
            if isinstance(node, ast.Try):
                for h in node.handlers:
                    stack.extend(h.body)
                stack.extend(node.finalbody)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def long_functions(limit: int) -> list[tuple[int, str]]:
    rows = []
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    rows.append((n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def _count(cmd: list[str]) -> dict[str, int]:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    counts: dict[str, int] = defaultdict(int)
    for line in res.stdout.splitlines():
        head = line.split(":", 1)[0]
        if ": error:" in line or (line[:1].isalpha() and ":" in line and " " in line
                                   and cmd[0] == "ruff"):
            counts[head.split("/", 1)[0]] += 1
    return dict(counts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-tools", action="store_true", help="skip ruff and mypy")
    ap.add_argument("--long", type=int, default=100, help="report functions longer than this")
    args = ap.parse_args()
    for lazy in (False, True):
        found = cycles(import_graph(lazy=lazy))
        label = "every import (lazy ones too)" if lazy else "module-level imports"
        print(f"import cycles, {label}: {len(found)}")
        for c in found:
            print("  " + " <-> ".join(c))
    rows = long_functions(args.long)
    print(f"functions longer than {args.long} lines: {len(rows)}")
    for n, where in rows:
        print(f"  {n:4d} {where}")
    if not args.no_tools:
        ruff = _count(["ruff", "check", "--output-format", "concise", *PACKAGES])
        print("ruff findings per package:", ruff or "none")
        mypy = _count(["mypy", *PACKAGES])
        print("mypy errors per package:", mypy or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
