"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related application/dicom, or
as metadata and bulk data (PS3.18 10.5.1.2: multipart/related application/dicom+json, a
first part holding a DICOM JSON array of instances, then one part per bulk data value,
each named by the ``Content-Location`` its ``BulkDataURI`` gives).

Every part goes through the node's one durable ingest path (:class:`node.ingest.ingestor.
Ingestor`, the same as C-STORE): validation, temp file + fsync + rename, one transaction
with the index rows and the ledger entry; a part is acknowledged only after that commit.
Refusals carry the C-STORE status of their reason as Failure Reason (0008,1197), mapped in
:data:`node.dimse.store.STATUS_FOR_REASON`.

A metadata + bulk data instance is rebuilt into a PS3.10 file (explicit VR little
endian; a compressed Pixel Data part, ``image/jpeg`` ... with its ``transfer-syntax``
parameter, is stored encapsulated as one frame in that syntax) and then takes the same
path. The request is read whole before the first instance is rebuilt (the metadata may
name bulk data that comes later), within ``dicomweb.max_request_bytes``.

Responses: 200 all stored; 202 some failed or stored with a warning (Warning Reason
(0008,1196)); 409 none stored; 415 not multipart/related application/dicom or
application/dicom+json; 413 body over ``dicomweb.max_request_bytes``; 400 malformed
multipart or metadata.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from audit.events import Event, EventType, Outcome
from node.context import NodeContext
from node.dicom.part10 import build_part10
from node.dicomweb.auth import Principal, Problem
from node.dicomweb.media import (
    DICOM,
    DICOM_JSON,
    OCTET,
    MultipartError,
    Part,
    parse_media_type,
    read_parts,
)
from node.dimse.status import General, Storage
from node.dimse.store import STATUS_FOR_REASON
from node.ingest.ingestor import Ingestor
from node.ingest.results import IngestError, IngestOutcome

__all__ = ["StowResult", "stow"]

log = logging.getLogger(__name__)

#: parts ingested at the same time (their commits share transactions: group commit)
PARALLEL_PARTS = 4


@dataclass
class StowItem:
    sop_class: str
    sop_instance: str
    study: str
    series: str
    failure: int | None = None
    warning: int | None = None


@dataclass
class StowResult:
    items: list[StowItem] = field(default_factory=list)

    @property
    def status(self) -> int:
        ok = [i for i in self.items if i.failure is None]
        if not ok:
            return 409
        if len(ok) < len(self.items) or any(i.warning is not None for i in ok):
            return 202
        return 200

    def body(self, base: str, study: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        studies = {i.study for i in self.items if i.failure is None and i.study}
        url_study = study or (next(iter(studies)) if len(studies) == 1 else None)
        if url_study:
            out["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{url_study}"]}
        failed = [_item(i, base, with_url=False) for i in self.items if i.failure is not None]
        refd = [_item(i, base, with_url=True) for i in self.items if i.failure is None]
        if failed:
            out["00081198"] = {"vr": "SQ", "Value": failed}
        if refd:
            out["00081199"] = {"vr": "SQ", "Value": refd}
        return out


def _item(i: StowItem, base: str, with_url: bool) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if i.sop_class:
        d["00081150"] = {"vr": "UI", "Value": [i.sop_class]}
    if i.sop_instance:
        d["00081155"] = {"vr": "UI", "Value": [i.sop_instance]}
    if i.failure is not None:
        d["00081197"] = {"vr": "US", "Value": [i.failure]}
    if with_url:
        d["00081190"] = {"vr": "UR", "Value": [
            f"{base}/studies/{i.study}/series/{i.series}/instances/{i.sop_instance}"]}
    if i.warning is not None:
        d["00081196"] = {"vr": "US", "Value": [i.warning]}
    return d


def _peek(data: bytes) -> tuple[str, str, str, str]:
    """SOP Class, SOP Instance, Study, Series UIDs of a part, as far as they can be read."""
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, force=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                    "SeriesInstanceUID"])
        meta = getattr(ds, "file_meta", None)
        cls = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "")
                  or "")
        inst = str(ds.get("SOPInstanceUID")
                   or (meta.get("MediaStorageSOPInstanceUID") if meta else "") or "")
        return cls, inst, str(ds.get("StudyInstanceUID") or ""), \
            str(ds.get("SeriesInstanceUID") or "")
    except Exception:
        return "", "", "", ""


def _with_preamble(data: bytes) -> bytes:
    """A part written as group 0002 + data set without the 128-byte preamble, 'DICM' and
    group length (pydicom's ``dcmwrite`` of a data set that has no preamble, as
    dicomweb-client sends it) is rebuilt into a PS3.10 file (same data set bytes); other
    parts pass unchanged (the ingestor judges them)."""
    if data[128:132] == b"DICM" or data[:2] != b"\x02\x00":
        return data
    pos = 0
    try:
        while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
            vr = data[pos + 4:pos + 6]
            if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
                pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
            else:
                pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
        meta = read_dataset(BytesIO(data[:pos]), is_implicit_VR=False, is_little_endian=True)
        return build_part10(data[pos:], str(meta.MediaStorageSOPClassUID),
                            str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID))
    except Exception:
        return data


def store_part(ctx: NodeContext, ingestor: Ingestor, who: Principal, part: Part,
               study: str | None) -> StowItem:
    """Ingest one part (blocking: runs in a worker thread).

    The part's UIDs are read ahead of the ingest only where a check needs them (a part of
    another media type, a request naming its study); a stored part's come from its index
    record, a refused part's are read after the refusal (its Failed SOP Sequence item)."""
    ptype = parse_media_type(part.content_type).type if part.content_type else DICOM
    if ptype != DICOM:
        item = StowItem(*_peek(part.body), failure=Storage.CANNOT_UNDERSTAND)
        _reject(ctx, who, item, "part_media_type", f"part is {ptype}, not {DICOM}")
        return item
    if study:
        item = StowItem(*_peek(part.body))
        if item.study and item.study != study:
            item.failure = Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS
            _reject(ctx, who, item, "study_mismatch",
                    "Study Instance UID differs from the request's study")
            return item
    with ctx.inflight.track():
        try:
            res = ingestor.ingest_part10(_with_preamble(part.body), peer=who.address,
                                         source="stow", actor=who.actor)
        except IngestError as exc:
            return StowItem(*_peek(part.body), failure=STATUS_FOR_REASON[exc.reason])
        except Exception:
            log.exception("STOW-RS part failed")
            return StowItem(*_peek(part.body), failure=General.PROCESSING_FAILURE)
    rec = res.record
    item = StowItem(rec.sop_class_uid, rec.sop_instance_uid, rec.study_instance_uid,
                    rec.series_instance_uid)
    if res.outcome == IngestOutcome.KEPT_FIRST:
        item.warning = Storage.ELEMENTS_DISCARDED
    return item


def _reject(ctx: NodeContext, who: Principal, item: StowItem, reason: str, detail: str) -> None:
    subject = {k: v for k, v in (("sop_uid", item.sop_instance),
                                 ("sop_class_uid", item.sop_class),
                                 ("study_uid", item.study)) if v}
    try:
        ctx.ledger.append(Event(type=EventType.INSTANCE_REJECTED, actor=who.actor,
                                outcome=Outcome.MINOR_FAILURE, subject=subject,
                                payload={"source": "stow", "peer": who.address,
                                         "reason": reason, "detail": detail,
                                         "status": item.failure}))
    except Exception:
        log.exception("could not record a STOW-RS refusal")


def _refused(ctx: NodeContext, who: Principal, p: Problem) -> Problem:
    """Record a refused STOW-RS request (no instance was read from it) and return ``p``."""
    try:
        ctx.ledger.append(Event(type=EventType.INSTANCE_REJECTED, actor=who.actor,
                                outcome=Outcome.MINOR_FAILURE,
                                payload={"source": "stow", "peer": who.address,
                                         "reason": "request_refused", "status": p.status,
                                         "detail": p.detail[:200]}))
    except Exception:
        log.exception("could not record a refused STOW-RS request")
    return p


async def stow(ctx: NodeContext, ingestor: Ingestor, who: Principal, request: Request,
               study: str | None) -> StowResult:
    """Read the request's parts as they arrive and ingest them."""
    if ctx.stopping.is_set():
        raise Problem(503, "Service Unavailable", "the node is shutting down")
    ct = parse_media_type(request.headers.get("content-type", ""))
    root_type = ct.params.get("type", DICOM).lower()
    if ct.type != "multipart/related" or root_type not in (DICOM, DICOM_JSON):
        raise _refused(ctx, who, Problem(415, "Unsupported Media Type",
                       'STOW-RS accepts multipart/related; type="application/dicom" or '
                       'type="application/dicom+json" (metadata and bulk data)'))
    bnd = ct.params.get("boundary")
    if not bnd:
        raise _refused(ctx, who, Problem(400, "Bad Request",
                                         "multipart/related without a boundary"))
    limit = ctx.settings.dicomweb.max_request_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _refused(ctx, who, Problem(413, "Content Too Large",
                                         f"the limit is {limit} bytes"))
    if root_type == DICOM_JSON:
        return await _stow_json(ctx, ingestor, who, request, study, bnd, limit)
    sem = asyncio.Semaphore(PARALLEL_PARTS)
    tasks: list[asyncio.Task[StowItem]] = []

    async def one(p: Part) -> StowItem:
        try:
            return await run_in_threadpool(store_part, ctx, ingestor, who, p, study)
        finally:
            sem.release()

    try:
        async for part in read_parts(request.stream(), bnd, limit):
            await sem.acquire()  # back-pressure: at most PARALLEL_PARTS parts being stored
            tasks.append(asyncio.create_task(one(part)))
    except OverflowError:
        await asyncio.gather(*tasks, return_exceptions=True)
        raise _refused(ctx, who, Problem(413, "Content Too Large",
                                         f"the limit is {limit} bytes")) from None
    except MultipartError as exc:
        await asyncio.gather(*tasks, return_exceptions=True)
        raise _refused(ctx, who, Problem(400, "Bad Request", str(exc))) from None
    items = list(await asyncio.gather(*tasks))
    if not items:
        raise _refused(ctx, who, Problem(400, "Bad Request", "the request holds no part"))
    return StowResult(items)


# -- metadata + bulk data (application/dicom+json) -------------------------------------
class JsonPartError(ValueError):
    """An instance of a metadata + bulk data request that cannot be rebuilt."""


def _location_key(uri: str) -> str:
    """A bulk data reference compared without scheme and host (a client may name the part
    by a relative or an absolute URI)."""
    parts = urlsplit(uri.strip())
    return parts.path + (f"?{parts.query}" if parts.query else "")


def part10_from_json(obj: dict[str, Any], bulk: dict[str, Part]) -> bytes:
    """One instance of a metadata + bulk data request as a PS3.10 file."""
    found: dict[int, Part] = {}

    def resolve(tag: str, vr: str, uri: str) -> bytes:
        part = bulk.get(uri) or bulk.get(_location_key(uri))
        if part is None:
            raise JsonPartError(f"no part with Content-Location {uri!r} (bulk data of {tag})")
        found[int(tag, 16)] = part
        return part.body

    if not isinstance(obj, dict):
        raise JsonPartError("an instance of the metadata array is not a JSON object")
    try:
        ds = Dataset.from_json(obj, bulk_data_uri_handler=resolve)
    except JsonPartError:
        raise
    except Exception as exc:
        raise JsonPartError(f"not valid DICOM JSON: {exc}") from None
    for kw in ("SOPClassUID", "SOPInstanceUID"):
        if not ds.get(kw):
            raise JsonPartError(f"the metadata has no {kw}")
    ts = str(ExplicitVRLittleEndian)
    pixel = found.get(0x7FE00010)
    if pixel is not None:
        media = parse_media_type(pixel.content_type or OCTET)
        wanted = media.params.get("transfer-syntax")
        if media.type != OCTET or (wanted and UID(wanted).is_compressed):
            if not wanted or not UID(wanted).is_compressed:
                raise JsonPartError(f"Pixel Data as {media.type} needs its transfer-syntax "
                                    "parameter (a compressed transfer syntax)")
            if int(ds.get("NumberOfFrames") or 1) != 1:
                raise JsonPartError("compressed multi-frame Pixel Data is taken as "
                                    "application/dicom only")
            ds.PixelData = encapsulate([pixel.body])  # one frame, as sent
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ts = wanted
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    try:
        write_dataset(buf, ds)
    except Exception as exc:
        raise JsonPartError(f"the metadata cannot be encoded: {exc}") from None
    return build_part10(buf.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts)


async def _stow_json(ctx: NodeContext, ingestor: Ingestor, who: Principal, request: Request,
                     study: str | None, bnd: str, limit: int) -> StowResult:
    parts: list[Part] = []
    try:
        async for part in read_parts(request.stream(), bnd, limit):
            parts.append(part)
    except OverflowError:
        raise _refused(ctx, who, Problem(413, "Content Too Large",
                                         f"the limit is {limit} bytes")) from None
    except MultipartError as exc:
        raise _refused(ctx, who, Problem(400, "Bad Request", str(exc))) from None
    meta = [p for p in parts if parse_media_type(p.content_type).type == DICOM_JSON]
    if not meta:
        raise _refused(ctx, who, Problem(400, "Bad Request",
                                         "no application/dicom+json part (the metadata)"))
    bulk: dict[str, Part] = {}
    for p in parts:
        loc = p.headers.get("content-location")
        if loc and p not in meta:
            bulk[loc.strip()] = p
            bulk.setdefault(_location_key(loc), p)
    objects: list[Any] = []
    for p in meta:
        try:
            doc = json.loads(p.body)
        except ValueError as exc:
            raise _refused(ctx, who, Problem(400, "Bad Request",
                                             f"the metadata part is not JSON: {exc}")) from None
        objects.extend(doc if isinstance(doc, list) else [doc])
    if not objects:
        raise _refused(ctx, who, Problem(400, "Bad Request", "the metadata holds no instance"))
    sem = asyncio.Semaphore(PARALLEL_PARTS)

    def one(obj: Any) -> StowItem:
        try:
            body = part10_from_json(obj, bulk)
        except JsonPartError as exc:
            item = StowItem(*_json_uids(obj))
            item.failure = Storage.CANNOT_UNDERSTAND
            _reject(ctx, who, item, "json_invalid", str(exc)[:300])
            return item
        return store_part(ctx, ingestor, who, Part({"content-type": DICOM}, body), study)

    async def guarded(obj: Any) -> StowItem:
        async with sem:
            return await run_in_threadpool(one, obj)

    return StowResult(list(await asyncio.gather(*(guarded(o) for o in objects))))


def _json_uids(obj: Any) -> tuple[str, str, str, str]:
    """SOP Class, SOP Instance, Study, Series UIDs of a DICOM JSON object, where present."""
    out = []
    for tag in ("00080016", "00080018", "0020000D", "0020000E"):
        try:
            out.append(str(obj[tag]["Value"][0]))
        except (KeyError, IndexError, TypeError):
            out.append("")
    return out[0], out[1], out[2], out[3]
