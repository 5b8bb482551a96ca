"""File store: durable writes, digests, out-of-space, recovery helpers, path safety."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from storage.filestore import (
    FileStore,
    OutOfSpaceError,
    StoreError,
    instance_rel_path,
    uid_component,
)


def test_write_read_digest(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "store")
    data = os.urandom(100_000)
    rel = instance_rel_path("1.2.3", "1.2.3.4", "1.2.3.4.5", hashlib.sha256(data).hexdigest())
    stored = fs.write(rel, [data[:10], data[10:]])
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size == len(data)
    assert fs.read(rel) == data and fs.exists(rel)
    assert rel.startswith("1.2.3/1.2.3.4/1.2.3.4.5.") and rel.endswith(".dcm")
    assert list(fs.iter_files()) == [rel]
    assert not list(fs.temp_dir.iterdir())
    # rewriting the same path with the same bytes is harmless
    fs.write(rel, data)
    assert fs.read(rel) == data and list(fs.iter_files()) == [rel]
    assert fs.delete(rel) and not fs.exists(rel) and not fs.delete(rel)


def test_untrusted_uids_never_escape(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "store")
    for bad in ("../../etc", "a/b", "..", "1.2.3\x00", "x" * 80):
        comp = uid_component(bad)
        assert "/" not in comp and comp not in ("", ".", "..")
    rel = instance_rel_path("../..", "/abs", "..", "0" * 64)
    fs.write(rel, b"ok")
    assert fs.path(rel).is_relative_to(fs.root)
    with pytest.raises(StoreError):
        fs.path("../outside.dcm")


def test_reserve_gives_out_of_space(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "store")
    fs.min_free_bytes = fs.free_bytes() + 1
    with pytest.raises(OutOfSpaceError):
        fs.write("a/b.dcm", b"data")
    assert not list(fs.iter_files()) and not list(fs.temp_dir.iterdir())


def test_enospc_maps_to_out_of_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (ENOSPC from write(2)) is OutOfSpaceError, and the temp file goes."""
    fs = FileStore(tmp_path / "store")
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutOfSpaceError):
        fs.write("a/b.dcm", b"data")
    monkeypatch.setattr(os, "write", real_write)
    assert not list(fs.temp_dir.iterdir()) and not list(fs.iter_files())


def test_sweep_and_unreferenced(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "store")
    (fs.temp_dir / "dead.part").write_bytes(b"half")
    fs.write("s/x/a.dcm", b"a")
    fs.write("s/x/b.dcm", b"b")
    assert fs.sweep_temp() == 1 and not list(fs.temp_dir.iterdir())
    assert fs.unreferenced({"s/x/a.dcm"}) == ["s/x/b.dcm"]


def test_constructor_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileStore(tmp_path, min_free_bytes=-1)
