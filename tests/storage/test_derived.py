"""The on-disk cache of documents derived from stored files (storage.derived)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from storage.derived import DerivedCache


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
    # a restart keeps the documents and drops interrupted writes
    (tmp_path / "md" / ".tmp" / "x.part").write_bytes(b"half")
    again = DerivedCache(tmp_path / "md")
    assert again.get(b) == b"[2]" and list((tmp_path / "md" / ".tmp").iterdir()) == []


def test_refuses_what_is_not_a_digest(tmp_path: Path) -> None:
    cache = DerivedCache(tmp_path)
    for bad in ("../../etc/passwd", "A" * 64, _digest("a")[:63]):
        with pytest.raises(ValueError):
            cache.put(bad, b"x")
