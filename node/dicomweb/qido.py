"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, at every level and
across levels, with the PS3.4 C.2.2.2 matching C-FIND uses (:mod:`storage.matching`).

Matching keys by keyword or 8-hex tag; ``*`` / ``?`` wildcards; date / time ranges; UID
lists (comma or backslash); ``includefield`` (list or ``all``); ``limit`` / ``offset``;
``fuzzymatching`` (accepted; literal matching, with a Warning header). Results stream as
application/dicom+json; no match is ``200 []``. SyntheticData (0008,001C) filters at every
level (a study / series matches when it holds a synthetic instance).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import and_, case, exists, literal, select

from node.context import NodeContext
from node.dicomweb.access import AccessRecorder
from node.dicomweb.auth import Principal, Problem
from node.dicomweb.dicomjson import keyword_of, match_json
from node.dicomweb.media import DICOM_JSON, parse_accept
from storage.matching import (
    ATTRIBUTES,
    InvalidQuery,
    Query,
    QueryLevel,
    build_query,
    is_universal,
    keywords_at,
    run,
)
from storage.synthetic import SYNTHETIC_NO, SYNTHETIC_YES
from storage.tables import Series, Study

__all__ = ["DEFAULT_KEYS", "QidoRequest", "parse_qido", "search"]

ST, SE, IM = QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

_STUDY_KEYS = ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
               "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
               "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
               "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
_SERIES_KEYS = ["Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
                "NumberOfSeriesRelatedInstances", "SeriesDate", "SeriesTime",
                "BodyPartExamined"]
_INSTANCE_KEYS = ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                  "BitsAllocated", "NumberOfFrames"]

#: Default return attributes (PS3.18 Tables 10.6.3-3 / -4 / -5), per level.
DEFAULT_KEYS: dict[QueryLevel, list[str]] = {
    ST: _STUDY_KEYS,
    SE: [*_SERIES_KEYS, "StudyInstanceUID"],
    IM: [*_INSTANCE_KEYS, "StudyInstanceUID", "SeriesInstanceUID", "Modality"],
}
#: Across levels (``/series``, ``/instances``) the upper levels' defaults come too.
ACROSS_KEYS: dict[QueryLevel, list[str]] = {
    SE: _STUDY_KEYS + _SERIES_KEYS,
    IM: _STUDY_KEYS + _SERIES_KEYS + _INSTANCE_KEYS,
}

_CONTROL = {"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching",
            "multiplevaluematching"}


@dataclasses.dataclass
class QidoRequest:
    level: QueryLevel
    keys: dict[str, Any]
    limit: int | None
    offset: int | None
    synthetic: str | None  # SyntheticData matched above the instance level
    warnings: list[str]


def _int_param(name: str, raw: str) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise Problem(400, "Bad Request", f"{name} must be an integer") from None
    if v < 0:
        raise Problem(400, "Bad Request", f"{name} must not be negative")
    return v


def _include(level: QueryLevel, value: str) -> list[str]:
    out: list[str] = []
    for f in value.split(","):
        if f.strip().lower() == "all":
            out.extend(keywords_at(level))
        elif f.strip():
            kw = keyword_of(f)
            if kw is None:
                raise Problem(400, "Bad Request", f"unknown attribute {f!r}")
            out.append(kw)
    return out


def _match_value(kw: str, values: list[str]) -> str:
    attr = ATTRIBUTES.get(kw)
    if attr is not None and attr.vr == "UI":  # UID list: comma or backslash
        parts = [u.strip() for v in values for u in v.replace(",", "\\").split("\\")]
        return "\\".join(p for p in parts if p)
    return "\\".join(values)


def parse_qido(level: QueryLevel, params: list[tuple[str, str]], path_keys: dict[str, str],
               across: bool) -> QidoRequest:
    """Turn the query string of a QIDO-RS request into matching keys."""
    include: list[str] = []
    limit = offset = None
    warnings: list[str] = []
    matched: dict[str, list[str]] = {}
    for name, value in params:
        lname = name.lower()
        if lname == "limit":
            limit = _int_param("limit", value)
        elif lname == "offset":
            offset = _int_param("offset", value)
        elif lname == "includefield":
            include.extend(_include(level, value))
        elif lname == "fuzzymatching":
            if value.lower() == "true":
                warnings.append('299 synthnode "The fuzzymatching parameter is not supported. '
                                'Only literal matching has been performed."')
        elif lname not in _CONTROL:
            kw = keyword_of(name)
            if kw is None:
                raise Problem(400, "Bad Request",
                              f"unknown attribute {name!r} (sequence matching is not offered)")
            matched.setdefault(kw, []).append(value)
    keys: dict[str, Any] = {kw: _match_value(kw, vs) for kw, vs in matched.items()}
    keys.update(path_keys)
    synthetic = None
    if level is not IM and "SyntheticData" in keys:
        raw = keys.pop("SyntheticData")
        synthetic = None if is_universal(raw) else str(raw).strip().upper()
        include.append("SyntheticData")
    for kw in list(keys):
        attr = ATTRIBUTES.get(kw)
        if (attr is None or attr.level.depth > level.depth) and not is_universal(keys[kw]):
            warnings.append(f'299 synthnode "{kw} is not a supported matching key; '
                            f'it was ignored"')
    defaults = (ACROSS_KEYS if across else DEFAULT_KEYS).get(level, DEFAULT_KEYS[level])
    for kw in [*defaults, *include]:
        keys.setdefault(kw, None)
    return QidoRequest(level, keys, limit, offset, synthetic, warnings)


def _with_synthetic(query: Query, level: QueryLevel, value: str) -> Query:
    """A study / series matches SyntheticData=YES when one of its instances is synthetic
    (the index flags the series), NO when one is not."""
    want = value == SYNTHETIC_YES
    cond: Any
    if level is SE:
        cond = Series.synthetic.is_(want)
    else:
        cond = exists(select(Series.id).where(and_(Series.study_pk == Study.id,
                                                   Series.synthetic.is_(want))))
    return dataclasses.replace(query, statement=query.statement.where(cond))


def _synthetic_column(query: Query, level: QueryLevel) -> Query:
    """Return SyntheticData for a study / series: YES when it holds a synthetic instance."""
    flag: Any = Series.synthetic if level is SE else exists(
        select(Series.id).where(and_(Series.study_pk == Study.id, Series.synthetic.is_(True))))
    col = case((flag, literal(SYNTHETIC_YES)), else_=literal(SYNTHETIC_NO))
    return dataclasses.replace(query, statement=query.statement.add_columns(
        col.label("SyntheticData")))


def check_accept(accept: str | None) -> None:
    for r in parse_accept(accept):
        if r.matches(DICOM_JSON) or r.type == "application/json":
            return
    raise Problem(406, "Not Acceptable", "QIDO-RS answers application/dicom+json")


def _url(base: str, m: dict[str, Any], level: QueryLevel) -> str | None:
    study = m.get("StudyInstanceUID")
    if not study:
        return None
    url = f"{base}/studies/{study}"
    if level.depth >= SE.depth and m.get("SeriesInstanceUID"):
        url += f"/series/{m['SeriesInstanceUID']}"
    if level is IM and m.get("SOPInstanceUID"):
        url += f"/instances/{m['SOPInstanceUID']}"
    return url


def search(ctx: NodeContext, recorder: AccessRecorder, who: Principal, req: QidoRequest,
           base: str, path: str) -> Iterator[bytes]:
    """The JSON array of matches, streamed; records the read when done."""
    return _stream(ctx, recorder, who, req, build(req), base, path)


def build(req: QidoRequest) -> Query:
    """The index query a QIDO-RS request runs (bench/bench_qido_index.py reads its plan)."""
    try:
        query = build_query(req.level, req.keys, limit=req.limit, offset=req.offset)
    except InvalidQuery as exc:
        raise Problem(400, "Bad Request", str(exc)) from None
    if req.synthetic is not None:
        query = _with_synthetic(query, req.level, req.synthetic)
    if req.level is not IM and "SyntheticData" in query.return_keys:
        query = _synthetic_column(query, req.level)
    return query


#: matches encoded together (one json.dumps call each)
_ENCODE_BATCH = 64


def _encoded(objs: list[dict[str, Any]], before: int) -> bytes:
    """``objs`` as the next members of the JSON array (``before`` members already sent)."""
    body = json.dumps(objs, separators=(",", ":")).encode()[1:-1]
    return b"," + body if before else body


def _stream(ctx: NodeContext, recorder: AccessRecorder, who: Principal, req: QidoRequest,
            query: Query, base: str, path: str) -> Iterator[bytes]:
    started = time.monotonic()
    studies: list[str] = []
    n = 0
    status = 200
    try:
        yield b"["
        objs: list[dict[str, Any]] = []
        with ctx.engine.connect() as conn:
            for m in run(conn, query):
                obj = match_json(m)
                url = _url(base, m, req.level)
                if url:
                    obj["00081190"] = {"vr": "UR", "Value": [url]}
                    obj = dict(sorted(obj.items()))
                objs.append(obj)
                s = m.get("StudyInstanceUID")
                if s and (not studies or studies[-1] != s):
                    studies.append(s)
                if len(objs) == _ENCODE_BATCH:
                    yield _encoded(objs, n)
                    n, objs = n + len(objs), []
        if objs:
            yield _encoded(objs, n)
            n += len(objs)
        yield b"]"
    except Exception:
        status = 500
        raise
    finally:
        recorder.record(actor=who.actor, service="QIDO-RS", kind=req.level.value.lower(),
                        path=path, address=who.address, studies=studies, count=n,
                        status=status,
                        extra={"level": req.level.value,
                               "keys": sorted(k for k, v in req.keys.items()
                                              if not is_universal(v)),
                               "matches": n,
                               "duration_ms": int((time.monotonic() - started) * 1000)})
