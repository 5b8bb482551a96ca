"""synthnode node: DIMSE services, ingest, routing, jobs, series builder, dispatch,
scheduler wiring, CLI and the composition root.

The project installs five top-level packages (``node``, ``engine``, ``storage``, ``audit``,
``config``; docs/architecture.md says why they stay top-level). Generic names collide: a
``config`` from another distribution earlier on ``sys.path`` would silently replace ours.
Importing ``node`` therefore checks, without importing them, that the four others are the
siblings installed with it, and names the intruder if not.
"""
from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

#: the packages the node imports, all installed beside it by the synthnode distribution
SIBLINGS = ("config", "storage", "audit", "engine")


def _check_siblings() -> None:
    here = Path(__file__).resolve().parent.parent
    for name in SIBLINGS:
        try:
            spec = find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or origin.parent.parent != here:
            where = origin.parent if origin is not None else "nowhere"
            raise ImportError(
                f"synthnode: the top-level package {name!r} is taken from {where}, not from "
                f"{here / name} where synthnode installed it (another distribution with a "
                f"package named {name!r} is earlier on sys.path). Install synthnode in its "
                "own virtual environment.")


_check_siblings()
