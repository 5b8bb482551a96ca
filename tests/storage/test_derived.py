"""The on-disk cache of documents derived from stored files (storage.derived)."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from storage.derived import STALE_S, DerivedCache


def _digest(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def test_put_get_prune(tmp_path: Path) -> None:
    cache = DerivedCache(tmp_path / "md")
    a, b = _digest("a"), _digest("b")
    assert cache.get(a) is None and not cache.has(a)
    cache.put(a, b"[1]")
    cache.put(b, b"[2]")
    cache.put(a, b"[3]")  # rewritten whole
    assert cache.get(a) == b"[3]" and cache.get(b) == b"[2]"
    assert cache.digests() == {a, b}
    assert cache.prune({b}) == 1
    assert cache.get(a) is None and cache.get(b) == b"[2]"
    assert list((tmp_path / "md" / ".tmp").iterdir()) == []  # no temp file left
    # a restart keeps the documents and drops interrupted writes (not one another process
    # sharing the folder may have in flight)
    old, new = tmp_path / "md" / ".tmp" / "old.part", tmp_path / "md" / ".tmp" / "new.part"
    old.write_bytes(b"half")
    new.write_bytes(b"half")
    stale = time.time() - STALE_S - 1
    os.utime(old, (stale, stale))
    again = DerivedCache(tmp_path / "md")
    assert again.get(b) == b"[2]"
    assert list((tmp_path / "md" / ".tmp").iterdir()) == [new]


def test_refuses_what_is_not_a_digest(tmp_path: Path) -> None:
    cache = DerivedCache(tmp_path)
    for bad in ("../../etc/passwd", "A" * 64, _digest("a")[:63]):
        with pytest.raises(ValueError):
            cache.put(bad, b"x")
