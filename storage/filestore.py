"""Durable file store: write-to-temp, fsync, rename, fsync directory.

The store holds DICOM Part 10 files under a root folder::

    <root>/<study-dir>/<series-dir>/<sop-dir>.<digest16>.dcm
    <root>/.tmp/<random>.part          (in-flight writes; swept at start-up)

A final name carries the first 16 hex digits of the file's SHA-256, so two different
objects with the same SOP Instance UID never share a path: replacing an instance writes
the new file beside the old one, the index is switched in one transaction and only then
the old file is removed. A crash at any point leaves the index pointing at a complete
file; what it can leave behind is an unreferenced file (see :meth:`FileStore.unreferenced`)
or a temp file (see :meth:`FileStore.sweep_temp`), never a half-written indexed file.

Durability contract (docs/architecture.md). POSIX rename(2) is atomic
within one file system; fsync of the directory makes the new name durable.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_DIR = ".tmp"
TEMP_SUFFIX = ".part"
FILE_SUFFIX = ".dcm"
_UID_SAFE = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1 UID character set
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class StoreError(Exception):
    """A file store operation failed."""


class OutOfSpaceError(StoreError):
    """Not enough free space (disk full or below the configured reserve).

    Maps to C-STORE 0xA700 (PS3.4 B.2.3) and HTTP 507.
    """


@dataclass(frozen=True)
class StoredFile:
    """Facts about a file that is durably in the store."""

    rel_path: str  # relative to the store root, '/'-separated
    size: int
    sha256: str  # hex


def uid_component(uid: str) -> str:
    """A path component for a UID: the UID itself when it only uses the UID character set
    (PS3.5 9.1), otherwise ``h`` + SHA-1 hex of it (a received UID is untrusted input)."""
    uid = uid.strip().rstrip("\x00")
    if _UID_SAFE.match(uid) and len(uid) <= 64:
        return uid
    return "h" + hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()


def instance_rel_path(study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
    """The relative path of an instance file (see the module docstring)."""
    return "/".join(
        (
            uid_component(study_uid),
            uid_component(series_uid),
            f"{uid_component(sop_uid)}.{sha256[:16]}{FILE_SUFFIX}",
        )
    )


class PendingWrite:
    """A file written under its final name whose durability is being made in the
    background (:meth:`FileStore.write_async`). :meth:`wait` returns once the file's data
    and its directory entry are on disk, or raises :class:`StoreError`."""

    def __init__(self, stored: StoredFile, futures: list[Future[None]]):
        self.stored = stored
        self._futures = futures

    def wait(self) -> StoredFile:
        error: OSError | None = None
        for f in self._futures:  # wait for every flush, even after a failure
            try:
                f.result()
            except OSError as exc:
                error = error or exc
        if error is not None:
            if error.errno in _NO_SPACE:
                raise OutOfSpaceError(
                    f"out of space writing {self.stored.rel_path}: {error}") from error
            raise StoreError(f"cannot make {self.stored.rel_path} durable: {error}") from error
        return self.stored


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Durable writes of whole files under ``root``.

    Parameters
    ----------
    root : pathlib.Path
        Store folder; created if missing.
    min_free_bytes : int
        Refuse a write that would leave less free space than this on the file system
        (raises :class:`OutOfSpaceError`).
    fsync : bool
        ``False`` only for benchmarks that measure the cost of durability; never in
        production (the durability contract needs it).
    """

    def __init__(self, root: Path | str, *, min_free_bytes: int = 0, fsync: bool = True):
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_bytes)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_dir = self.root / TEMP_DIR
        self.temp_dir.mkdir(exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._dir_flush: dict[Path, Future[None]] = {}  # new folders' entry flushes

    # -- paths -------------------------------------------------------------------
    def path(self, rel_path: str) -> Path:
        """Absolute path of a stored file; refuses paths that leave the root. The check is
        lexical (``..`` collapsed, no symlink resolution: one ``lstat`` per path component
        on every ingest otherwise); the store holds no links, and every name in it is
        built by :func:`instance_rel_path` from sanitised UID components."""
        p = Path(os.path.normpath(self.root / rel_path))
        if self.root not in p.parents:
            raise StoreError(f"path outside the store: {rel_path!r}")
        return p

    def exists(self, rel_path: str) -> bool:
        return self.path(rel_path).is_file()

    # -- space -------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Free bytes available to this process on the store's file system."""
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int) -> None:
        """Raise :class:`OutOfSpaceError` if writing ``needed`` bytes would go below the
        reserve."""
        free = self.free_bytes()
        if free - needed < self.min_free_bytes:
            raise OutOfSpaceError(
                f"out of space: {free} bytes free, {needed} needed, "
                f"{self.min_free_bytes} reserved (storage.min_free_bytes)"
            )

    # -- write -------------------------------------------------------------------
    @staticmethod
    def _make_dirs(directory: Path) -> list[Path]:
        """Create ``directory`` and its missing parents, outermost first; returns the
        folders created (each one's entry in its parent still to be flushed)."""
        missing: list[Path] = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            try:
                m.mkdir()
            except FileExistsError:
                pass
        return missing[::-1]

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        for m in self._make_dirs(directory):
            if self.fsync:
                _fsync_dir(m.parent)  # the new directory entry itself must be durable
        self._known_dirs.add(directory)

    def _ensure_dir_async(self, directory: Path) -> list[Future[None]]:
        """Create ``directory`` (and missing parents) without waiting for their entries
        to reach the disk: returns the flushes to wait for. A directory another write
        created moments ago comes with that write's flush, so no writer acknowledges a
        file whose folder is not yet durable."""
        with self._pool_lock:
            pending = self._dir_flush.get(directory)
            if pending is not None:
                if not pending.done():
                    return [pending]
                del self._dir_flush[directory]
            if directory in self._known_dirs:
                return []
        missing = self._make_dirs(directory)
        futures: list[Future[None]] = []
        if self.fsync and missing:
            pool = self._sync_pool()
            futures = [pool.submit(_fsync_dir, m.parent) for m in missing]
            done: Future[None] = Future()

            def settle(_: Future[None]) -> None:
                if all(f.done() for f in futures) and not done.done():
                    errors = [f.exception() for f in futures if f.exception() is not None]
                    if errors:
                        done.set_exception(errors[0])  # type: ignore[arg-type]
                    else:
                        done.set_result(None)
            with self._pool_lock:
                self._dir_flush[directory] = done
            for f in futures:
                f.add_done_callback(settle)
        with self._pool_lock:
            self._known_dirs.add(directory)
        return futures

    def write(self, rel_path: str, chunks: bytes | Iterable[bytes]) -> StoredFile:
        """Write a file durably at ``rel_path``: temp file, fsync, rename, fsync dir.

        Writing the same content to an existing path is harmless (rename replaces it).

        Raises
        ------
        OutOfSpaceError
            Below the free-space reserve, or the file system reported ENOSPC/EDQUOT.
        StoreError
            Any other I/O failure (the temp file is removed).
        """
        parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        size = sum(len(c) for c in parts)
        self.check_space(size)
        final = self.path(rel_path)
        tmp = self.temp_dir / f"{uuid.uuid4().hex}{TEMP_SUFFIX}"
        digest = hashlib.sha256()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for c in parts:
                    digest.update(c)
                    _write_all(fd, c)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._ensure_dir(final.parent)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in _NO_SPACE:
                raise OutOfSpaceError(f"out of space writing {rel_path}: {exc}") from exc
            raise StoreError(f"cannot write {rel_path}: {exc}") from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return StoredFile(rel_path=rel_path, size=size, sha256=digest.hexdigest())

    def _sync_pool(self) -> ThreadPoolExecutor:
        pid = os.getpid()
        with self._pool_lock:  # a forked acceptor process starts its own threads
            if self._pool is None or self._pool_pid != pid:
                self._pool = ThreadPoolExecutor(max_workers=32,
                                                thread_name_prefix="store-sync")
                self._pool_pid = pid
            return self._pool

    def write_async(self, rel_path: str, data: bytes, sha256: str | None = None
                    ) -> PendingWrite:
        """Write ``data`` at ``rel_path`` now (temp file, then a hard link under the final
        name: readers only ever see the complete content) and make it durable in the
        background: fsync of the file and of its folder, overlapped with whatever the
        caller does meanwhile (the ingestor commits the index row and ledger entry). The
        caller acknowledges only after :meth:`PendingWrite.wait`.

        Because the rename may reach the disk before the data, a crash before
        ``wait`` returns can leave an incomplete file under its final name; the ingestor
        records every such file in the ``landing`` table in the transaction that indexes
        it, and start-up recovery checks each one by its SHA-256 (``node.app.recover``);
        files no index row names are removed at start-up as before.

        Raises (before anything is visible)
        ------
        OutOfSpaceError, StoreError
        """
        size = len(data)
        self.check_space(size)
        final = self.path(rel_path)
        tmp = self.temp_dir / f"{uuid.uuid4().hex}{TEMP_SUFFIX}"
        digest = sha256 or hashlib.sha256(data).hexdigest()  # the caller's, if it has it
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            _write_all(fd, data)
            dir_flushes = self._ensure_dir_async(final.parent)
            try:
                os.link(tmp, final)  # only where nothing has this name yet
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    raise
                # the name exists (the same object sent twice at once, or a file left
                # by a crash) or the file system has no hard links: durable first, then
                # an atomic replace, as :meth:`write` does
                if self.fsync:
                    os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, final)
                if self.fsync:
                    _fsync_dir(final.parent)
                return PendingWrite(StoredFile(rel_path, size, digest), dir_flushes)
            _unlink_quietly(tmp)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(tmp)
            if exc.errno in _NO_SPACE:
                raise OutOfSpaceError(f"out of space writing {rel_path}: {exc}") from exc
            raise StoreError(f"cannot write {rel_path}: {exc}") from exc
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(tmp)
            raise
        stored = StoredFile(rel_path=rel_path, size=size, sha256=digest)
        if not self.fsync:
            os.close(fd)
            return PendingWrite(stored, [])
        # two flushes in flight at once: the file system merges them into one journal
        # commit where it can (bench/results/ingest.md measures the difference)
        pool = self._sync_pool()
        return PendingWrite(stored, [pool.submit(_fsync_close, fd),
                                     pool.submit(_fsync_dir, final.parent), *dir_flushes])

    # -- read / delete -------------------------------------------------------------
    def read(self, rel_path: str) -> bytes:
        return self.path(rel_path).read_bytes()

    def sha256(self, rel_path: str) -> str:
        h = hashlib.sha256()
        with self.path(rel_path).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def flush(self, rel_path: str) -> None:
        """fsync a stored file and its folder (recovery: a file found complete after a
        crash may still be only in the page cache)."""
        if not self.fsync:
            return
        p = self.path(rel_path)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(p.parent)

    def delete(self, rel_path: str) -> bool:
        """Remove a stored file (and fsync its folder). Returns False if it was absent."""
        p = self.path(rel_path)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        if self.fsync:
            _fsync_dir(p.parent)
        return True

    # -- recovery ------------------------------------------------------------------
    def sweep_temp(self) -> int:
        """Remove every temp file left by an interrupted write. Call at start-up, before
        the node accepts associations. Returns how many were removed."""
        n = 0
        for p in self.temp_dir.iterdir():
            if p.is_file():
                _unlink_quietly(p)
                n += 1
        if n:
            if self.fsync:
                _fsync_dir(self.temp_dir)
            logger.warning("removed %d orphan temp file(s) from %s", n, self.temp_dir)
        return n

    def iter_files(self) -> Iterator[str]:
        """Every stored file's relative path (temp files excluded)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root and TEMP_DIR in dirnames:
                dirnames.remove(TEMP_DIR)
            for name in filenames:
                if name.endswith(FILE_SUFFIX):
                    yield Path(dirpath, name).relative_to(self.root).as_posix()

    def unreferenced(self, referenced: set[str]) -> list[str]:
        """Stored files not in ``referenced`` (the index's file paths): left by a crash
        between rename and index commit, or by a replace whose old file was not yet
        removed."""
        return [p for p in self.iter_files() if p not in referenced]


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
