"""Documents derived from stored files (the DICOM JSON metadata of an instance ...), kept
on disk beside the store so a reader does not parse the stored file again.

Entries are content-addressed: the key is the stored file's SHA-256 (the index's
``sha256`` column), so a replaced instance (another file, another digest) can never be
answered with the old document, and one entry serves every copy of the same bytes::

    <root>/<digest[:2]>/<digest>.<suffix>
    <root>/.tmp/<random>.part             (in-flight writes)

It is a cache: an entry is written to a temp file and renamed (a reader sees a whole
document or none) but not fsynced; a lost or damaged entry is rebuilt from the stored file.
:meth:`DerivedCache.prune` removes the entries of digests the index no longer holds.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from pathlib import Path

__all__ = ["DerivedCache"]

logger = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: a temp file older than this is a write cut short, not one in flight
STALE_S = 600.0


class DerivedCache:
    """Derived documents keyed by stored-file digest under ``root`` (created if missing)."""

    def __init__(self, root: Path | str, suffix: str = "json"):
        self.root = Path(root)
        self.suffix = suffix
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        # writes cut short by a stop (older than any write in flight: several processes
        # may share a data folder)
        cutoff = time.time() - STALE_S
        for p in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
        self._dirs: set[str] = set()

    def _path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.root / digest[:2] / f"{digest}.{self.suffix}"

    def get(self, digest: str) -> bytes | None:
        try:
            return self._path(digest).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def put(self, digest: str, data: bytes) -> None:
        """Store ``data`` as the document of ``digest`` (atomic rename; last writer wins,
        both writers derive the same bytes)."""
        final = self._path(digest)
        if digest[:2] not in self._dirs:
            final.parent.mkdir(exist_ok=True)
            self._dirs.add(digest[:2])
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        tmp.write_bytes(data)
        os.replace(tmp, final)

    def discard(self, digest: str) -> None:
        try:
            self._path(digest).unlink()
        except FileNotFoundError:
            pass

    def digests(self) -> set[str]:
        out: set[str] = set()
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                out.update(p.name[:64] for p in sub.iterdir()
                           if p.name.endswith("." + self.suffix))
        return out

    def prune(self, live: set[str]) -> int:
        """Remove every entry whose digest is not in ``live``; returns how many were
        removed."""
        n = 0
        for d in self.digests() - live:
            self.discard(d)
            n += 1
        if n:
            logger.info("removed %d derived document(s) of deleted files from %s", n,
                        self.root)
        return n
