"""WADO-RS (PS3.18 10.4): instances (multipart/related application/dicom), metadata
(application/dicom+json), bulk data and frames (application/octet-stream and the stored
compressed media types). Rendered images live in :mod:`node.dicomweb.rendered`.

Transfer syntax negotiation (PS3.18 8.7.3.5): no ``transfer-syntax`` parameter means
explicit VR little endian; ``transfer-syntax=*`` returns the stored bytes unchanged; an
uncompressed syntax is produced by transcoding (decompressing when the stored object is
compressed); any other syntax the object is not stored in is 406. Bodies stream one
instance (one file) at a time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import select

from node.context import NodeContext
from node.dicomweb.auth import Problem
from node.dicomweb.media import (
    DICOM,
    OCTET,
    MediaRange,
    multipart_end,
    multipart_part_header,
    parse_accept,
)
from storage.derived import DerivedCache
from storage.matching import InvalidQuery, QueryLevel
from storage.query import InstanceRef, retrieve_set
from storage.tables import Instance

if TYPE_CHECKING:
    from node.ingest.results import StoredInstance

__all__ = ["CHUNK", "MetadataCache", "MetadataWarmer", "Selection", "choose_dicom_ts",
           "dicom_parts", "frames_parts", "metadata_etag", "metadata_stream",
           "select_instances", "stored_body"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: smallest block of a streamed as-stored WADO-RS body (one file each when files are larger)
BATCH = 4 << 20
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)

#: Single-frame media type of each compressed transfer syntax (PS3.18 Table 8.7.3-4).
FRAME_MEDIA_TYPE = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}


@dataclass(frozen=True)
class Selection:
    """The stored instances a WADO-RS target resource names."""

    refs: list[InstanceRef]

    @property
    def studies(self) -> list[str]:
        return list(dict.fromkeys(r.study_instance_uid for r in self.refs))

    @property
    def series(self) -> list[str]:
        return list(dict.fromkeys(r.series_instance_uid for r in self.refs))

    @property
    def sops(self) -> list[str]:
        return [r.sop_instance_uid for r in self.refs]


def select_instances(ctx: NodeContext, study: str, series: str | None = None,
                     sop: str | None = None) -> Selection:
    keys = {"StudyInstanceUID": study}
    level = QueryLevel.STUDY
    if series is not None:
        keys["SeriesInstanceUID"], level = series, QueryLevel.SERIES
    if sop is not None:
        keys["SOPInstanceUID"], level = sop, QueryLevel.IMAGE
    try:
        with ctx.engine.connect() as conn:
            refs = retrieve_set(conn, level, keys)
    except InvalidQuery as exc:
        raise Problem(400, "Bad Request", str(exc)) from None
    if not refs:
        raise Problem(404, "Not Found", f"no stored {level.value.lower()} with these UIDs")
    return Selection(refs)


# -- instances -------------------------------------------------------------------------
def _producible(stored: str, wanted: str) -> bool:
    return wanted in ("*", stored) or wanted in UNCOMPRESSED


def choose_dicom_ts(accept: str | None, refs: list[InstanceRef]) -> str:
    """The transfer syntax to answer in ('*' = as stored), from the Accept header."""
    tried = False
    for r in parse_accept(accept):
        if r.type == "multipart/related":
            ptype = r.params.get("type", DICOM).lower()
            if ptype not in (DICOM, "*/*", "application/*"):
                continue
        elif not (r.matches(DICOM)):
            continue
        tried = True
        ts = r.params.get("transfer-syntax") or str(ExplicitVRLittleEndian)
        if all(_producible(x.transfer_syntax_uid, ts) for x in refs):
            return ts
    raise Problem(406, "Not Acceptable",
                  "no acceptable media type / transfer syntax can be produced" if tried else
                  'this resource is multipart/related; type="application/dicom"')


def _file_chunks(path: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _transcode(path: Any, ts: str) -> bytes:
    ds = dcmread(path)
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def stored_body(ctx: NodeContext, refs: list[InstanceRef],
                bnd: str) -> tuple[int, Iterator[memoryview]]:
    """The multipart/related body of the stored files as they are (no transcoding, no
    parsing): its exact length, from the index's file sizes, and blocks of at least
    :data:`BATCH` bytes (small files share a block: one worker-thread hop and one socket
    write per block). Each file is read straight into its block, after its part header:
    the bytes are copied once on their way from the page cache to the response."""
    heads = [multipart_part_header(bnd, f"{DICOM}; transfer-syntax={r.transfer_syntax_uid}")
             for r in refs]
    end = multipart_end(bnd)
    length = sum(map(len, heads)) + sum(r.file_size for r in refs) + len(end)

    def fill(group: list[tuple[bytes, InstanceRef]], tail: bytes) -> memoryview:
        block = bytearray(sum(len(h) + r.file_size for h, r in group) + len(tail))
        view = memoryview(block)
        pos = 0
        for head, r in group:
            view[pos:pos + len(head)] = head
            pos += len(head)
            with open(ctx.store.path(r.file_path), "rb", buffering=0) as f:
                want = r.file_size
                while want:
                    got = f.readinto(view[pos:pos + want])
                    if not got:  # the announced length would be wrong
                        raise OSError(f"stored file of {r.sop_instance_uid} is shorter "
                                      "than indexed")
                    pos, want = pos + got, want - got
        view[pos:] = tail
        return view

    def blocks() -> Iterator[memoryview]:
        group: list[tuple[bytes, InstanceRef]] = []
        n = 0
        for head, r in zip(heads, refs, strict=True):
            group.append((head, r))
            n += len(head) + r.file_size
            if n >= BATCH:
                yield fill(group, b"")
                group, n = [], 0
        yield fill(group, end)

    return length, blocks()


def dicom_parts(ctx: NodeContext, refs: list[InstanceRef],
                ts: str) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(content type, chunks) of each instance in ``ts`` ('*': as stored)."""
    for r in refs:
        path = ctx.store.path(r.file_path)
        if ts in ("*", r.transfer_syntax_uid):
            yield f"{DICOM}; transfer-syntax={r.transfer_syntax_uid}", _file_chunks(path)
        else:
            yield f"{DICOM}; transfer-syntax={ts}", iter([_transcode(path, ts)])


# -- metadata --------------------------------------------------------------------------
def metadata_etag(refs: list[InstanceRef], base: str) -> str:
    h = hashlib.sha256(base.encode())
    for r in refs:
        h.update(r.sha256.encode())
    return f'"{h.hexdigest()[:32]}"'


def _instance_url(base: str, r: InstanceRef) -> str:
    return (f"{base}/studies/{r.study_instance_uid}/series/{r.series_instance_uid}"
            f"/instances/{r.sop_instance_uid}")


def instance_json(path: Any, r: InstanceRef, base: str) -> dict[str, Any]:
    """One instance's metadata: every attribute, values over 1 KiB (and Pixel Data) as
    BulkDataURI."""
    url = _instance_url(base, r)
    ds = dcmread(path, stop_before_pixels=True)

    def bulk(elem: DataElement) -> str:
        return f"{url}/bulkdata/{elem.tag:08X}"

    obj = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk)
    if ds.get("Rows"):  # an image: its Pixel Data (not read) as bulk data
        compressed = UID(r.transfer_syntax_uid).is_compressed
        vr = "OB" if compressed or int(ds.get("BitsAllocated") or 16) <= 8 else "OW"
        obj["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    return obj


class MetadataCache:
    """Encoded metadata of stored instances, keyed by the stored file's SHA-256
    (content-addressed: a replaced instance has another digest), with the server's URL
    left as a placeholder so one document serves every host name it is reached by
    (X-Forwarded-Host / -Proto are applied per request).

    Three tiers: recently read documents in memory, every built document on disk
    (:class:`storage.derived.DerivedCache`, survives restarts), else built from the stored
    file (pydicom, ~1-3 ms per instance) and written to both."""

    BASE = b"\x00base\x00"
    _BASE_IN_JSON = b"\\u0000base\\u0000"

    def __init__(self, disk: DerivedCache | None = None, size: int = 4096):
        self.size = size
        self.disk = disk
        self._d: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def build(self, ctx: NodeContext, r: InstanceRef) -> bytes:
        obj = instance_json(ctx.store.path(r.file_path), r, self.BASE.decode())
        data = json.dumps(obj, separators=(",", ":")).encode()
        if self.disk is not None:
            try:
                self.disk.put(r.sha256, data)
            except OSError:
                log.warning("could not keep the metadata of %s on disk", r.sop_instance_uid,
                            exc_info=True)
        return data

    def get(self, ctx: NodeContext, r: InstanceRef) -> bytes:
        with self._lock:
            hit = self._d.get(r.sha256)
            if hit is not None:
                self._d.move_to_end(r.sha256)
                return hit
        data = self.disk.get(r.sha256) if self.disk is not None else None
        if data is None:
            data = self.build(ctx, r)
        with self._lock:
            self._d[r.sha256] = data
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return data

    def warm(self, ctx: NodeContext, r: InstanceRef) -> bool:
        """Build the on-disk document of ``r`` unless it exists; True if built."""
        if self.disk is None or self.disk.has(r.sha256):
            return False
        self.build(ctx, r)
        return True


def metadata_stream(ctx: NodeContext, refs: list[InstanceRef], base: str,
                    done: Callable[[int], None], cache: MetadataCache) -> Iterator[bytes]:
    n = 0
    b = json.dumps(base)[1:-1].encode()  # as it appears inside a JSON string
    try:
        yield b"["
        for r in refs:
            data = cache.get(ctx, r)
            yield (b"," if n else b"") + data.replace(MetadataCache._BASE_IN_JSON, b)
            n += 1
        yield b"]"
    finally:
        done(n)


class MetadataWarmer:
    """Builds the metadata documents of newly stored instances in a background thread
    (``dicomweb.metadata_warm``), so the first WADO-RS metadata read of a series
    concatenates documents instead of parsing every file.

    Stays off the store path: the ``on_instance_stored`` hook only appends to a bounded
    queue (a full queue drops: that instance is built on its first read), and the thread
    works only once no store has arrived and no HTTP request has run for ``quiet_s``, so it
    does not compete for the interpreter with a burst of C-STORE / STOW-RS or with
    readers."""

    def __init__(self, ctx: NodeContext, cache: MetadataCache, quiet_s: float = 0.3,
                 maxsize: int = 100_000):
        self.ctx, self.cache, self.quiet_s = ctx, cache, quiet_s
        self._q: queue.Queue[InstanceRef] = queue.Queue(maxsize)
        self._last = 0.0
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.built = 0

    def request_started(self) -> None:
        """An HTTP request began: the thread pauses until none is running for ``quiet_s``
        (it would otherwise take the interpreter lock from the request's threads)."""
        with self._busy_lock:
            self._busy += 1
        self._last = time.monotonic()

    def request_ended(self) -> None:
        with self._busy_lock:
            self._busy -= 1
        self._last = time.monotonic()

    def _wait_quiet(self) -> bool:
        """Block until nothing was stored or served for ``quiet_s``; False when stopping."""
        while True:
            wait = self._last + self.quiet_s - time.monotonic()
            if self._busy > 0:
                wait = max(wait, self.quiet_s)
            if wait <= 0:
                return True
            if self._stop.wait(wait):
                return False

    def offer(self, info: StoredInstance) -> None:
        """The ``on_instance_stored`` hook: O(1), never blocks, never raises."""
        rec = info.record
        self._last = time.monotonic()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(InstanceRef(
                rec.sop_instance_uid, rec.sop_class_uid, rec.transfer_syntax_uid,
                rec.study_instance_uid, rec.series_instance_uid, rec.file_path,
                rec.file_size, rec.sha256))

    def start(self) -> None:
        self.ctx.on_instance_stored.append(self.offer)
        self._thread = threading.Thread(target=self._run, name="metadata-warmer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.ctx.on_instance_stored.remove(self.offer)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def idle(self) -> bool:
        """Nothing waiting to be built (tests, benchmarks)."""
        return self._q.unfinished_tasks == 0

    def _prune(self) -> None:
        """Drop the documents of files the index no longer holds (deleted, replaced)."""
        if self.cache.disk is None:
            return
        try:
            with self.ctx.engine.connect() as conn:
                live = set(conn.execute(select(Instance.sha256)).scalars())
            self.cache.disk.prune(live)
        except Exception:
            log.exception("could not prune the metadata cache")

    def _run(self) -> None:
        self._prune()
        while not self._stop.is_set():
            try:
                r = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if not self._wait_quiet():
                    return
                if self.cache.warm(self.ctx, r):
                    self.built += 1
            except FileNotFoundError:
                pass  # replaced or deleted since
            except Exception:
                log.exception("could not build the metadata of %s", r.sop_instance_uid)
            finally:
                self._q.task_done()


# -- bulk data -------------------------------------------------------------------------
def _find(ds: Dataset, tag: int) -> DataElement | None:
    if tag in ds:
        return ds[tag]
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found = _find(item, tag)
                if found is not None:
                    return found
    return None


def bulkdata(ctx: NodeContext, r: InstanceRef, tag_hex: str) -> tuple[bytes, str]:
    """The value of one bulk data element (the first with this tag, top level first) and
    the transfer syntax it is encoded in."""
    try:
        tag = int(tag_hex, 16)
    except ValueError:
        raise Problem(400, "Bad Request", "bulk data is addressed by an 8-hex tag") from None
    ds = dcmread(ctx.store.path(r.file_path))
    elem = _find(ds, tag)
    if elem is None or not isinstance(elem.value, bytes | bytearray):
        raise Problem(404, "Not Found", f"no bulk data element {tag_hex}")
    return bytes(elem.value), str(ds.file_meta.TransferSyntaxUID)


def octet_acceptable(accept: str | None) -> MediaRange | None:
    for r in parse_accept(accept):
        if r.type == "multipart/related":
            if r.params.get("type", OCTET).lower() in (OCTET, "*/*", "application/*"):
                return r
        elif r.matches(OCTET):
            return r
    return None


# -- frames ----------------------------------------------------------------------------
def parse_frames(raw: str) -> list[int]:
    try:
        nums = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise Problem(400, "Bad Request", "frame numbers are positive integers") from None
    if not nums or min(nums) < 1:
        raise Problem(400, "Bad Request", "frame numbers start at 1")
    return nums


def _frame_accept(accept: str | None, stored_ts: str) -> tuple[bool, str]:
    """(answer compressed as stored?, part media type)."""
    native = FRAME_MEDIA_TYPE.get(stored_ts)
    for r in parse_accept(accept):
        mt = r.params.get("type", OCTET).lower() if r.type == "multipart/related" else r.type
        ts = r.params.get("transfer-syntax")
        if native and (mt == native or (ts in ("*", stored_ts) and mt in (OCTET, "*/*"))):
            return True, native if mt != OCTET else OCTET
        if mt in (OCTET, "*/*", "application/*"):
            if ts in (None, "*", str(ExplicitVRLittleEndian)) or ts == stored_ts:
                return False, OCTET
    raise Problem(406, "Not Acceptable", "frames are available as application/octet-stream"
                  + (f" or {native}" if native else ""))


def frames_parts(ctx: NodeContext, r: InstanceRef, numbers: list[int],
                 accept: str | None) -> tuple[list[tuple[str, bytes]], str]:
    """Each requested frame's (content type, bytes); the response part type."""
    stored = r.transfer_syntax_uid
    as_stored, media = _frame_accept(accept, stored)
    ds = dcmread(ctx.store.path(r.file_path))
    if "PixelData" not in ds:
        raise Problem(404, "Not Found", "the instance has no pixel data")
    n = int(ds.get("NumberOfFrames") or 1)
    if max(numbers) > n:
        raise Problem(404, "Not Found", f"the instance has {n} frame(s)")
    compressed = UID(stored).is_compressed
    if compressed and as_stored:
        frames = list(generate_frames(ds.PixelData, number_of_frames=n))
        return [(f"{media}; transfer-syntax={stored}", frames[i - 1]) for i in numbers], media
    if not compressed and UID(stored) != ExplicitVRBigEndian:
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
        size = int(ds.Rows) * int(ds.Columns) * spp * bits // 8
        data = ds.PixelData
        out = [data[(i - 1) * size:i * size] for i in numbers]
    else:
        arr = ds.pixel_array
        if n == 1:
            arr = arr[None]
        out = [arr[i - 1].astype(arr.dtype.newbyteorder("<")).tobytes() for i in numbers]
    ct = f"{OCTET}; transfer-syntax={ExplicitVRLittleEndian}"
    return [(ct, bytes(b)) for b in out], OCTET
