"""Attribute matching against the index, PS3.4 C.2.2.2, shared by C-FIND and QIDO-RS.

Input is a mapping ``keyword -> query value`` at a query level; output is a SQLAlchemy
``Select`` plus the attributes each match returns. The module knows nothing about DIMSE or
HTTP: callers turn :class:`InvalidQuery` into their own failure (0xA900 / HTTP 400).

Supported matching types (PS3.4 C.2.2.2):

* Single Value Matching (C.2.2.2.1): exact; case-sensitive except PN, which this node
  matches insensitive to ASCII case and to trailing component separators ``^`` (the
  standard allows PN matching to ignore case).
* List of UID Matching (C.2.2.2.2): ``uid1\\uid2`` on UI attributes.
* Universal Matching (C.2.2.2.3): an empty value, or a value of only ``*`` (tolerated on
  every VR, UIDs and dates included, as many SCUs send it).
* Wild Card Matching (C.2.2.2.4): ``*`` and ``?`` on AE, CS, LO, LT, PN, SH, ST, UC, UT.
* Range Matching (C.2.2.2.5): ``a-b``, ``a-``, ``-b`` on DA and TM. Times are compared at
  one-second resolution; a partial time (``hh``, ``hhmm``) as a lower bound starts at its
  first second and as an upper bound (or single value) ends at its last second.
* Multiple Value Matching (C.2.2.2.8 style): ``CT\\MR`` on CS/SH/LO/AE and numbers matches
  any of the values.
* Sequence Matching (C.2.2.2.6): the index holds no sequence attributes, so sequence keys
  are reported in :attr:`Query.unsupported` and answered zero-length.

Matching on an attribute of the query level or of a level above it is supported
(relational matching on upper levels, PS3.4 C.4.1.2.2.2 style, which QIDO-RS also needs).
Computed return keys (``NumberOfStudyRelatedInstances`` ...) are answered but never matched
(PS3.4 C.6.1.1.x lists them as return keys); a value given for them is ignored and named in
:attr:`Query.ignored`.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    exists,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from storage.tables import Instance, Patient, Series, Study

log = logging.getLogger(__name__)


class QueryLevel(str, Enum):
    """Query/Retrieve Level (0008,0052), PS3.4 C.6."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {QueryLevel.PATIENT: 0, QueryLevel.STUDY: 1, QueryLevel.SERIES: 2, QueryLevel.IMAGE: 3}

#: Unique key of each level (PS3.4 C.6.1.1 / C.6.2.1).
UNIQUE_KEYS: dict[QueryLevel, str] = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}


class InvalidQuery(ValueError):
    """A key's value cannot be used for matching (wrong form for its VR, wildcard on a UID).

    Attributes
    ----------
    keyword : str
        the offending attribute keyword ('' for the query as a whole)
    reason : str
        human-readable reason
    """

    def __init__(self, keyword: str, reason: str) -> None:
        self.keyword = keyword
        self.reason = reason
        super().__init__(f"{keyword}: {reason}" if keyword else reason)


class Computed(str, Enum):
    """How a computed return key is answered."""

    COUNT = "count"
    DISTINCT = "distinct"


@dataclass(frozen=True)
class Attribute:
    """One attribute the index can match or return.

    ``column`` is the index column for stored attributes; computed attributes have
    ``computed`` set and are evaluated per matched entity.
    """

    keyword: str
    vr: str
    level: QueryLevel
    column: Any = None
    computed: Computed | None = None
    # for computed attributes: (child level counted / listed, column listed)
    over: QueryLevel | None = None
    distinct_column: Any = None

    @property
    def matchable(self) -> bool:
        return self.computed is None or self.computed is Computed.DISTINCT


P, ST, SE, IM = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE

_ATTRS: list[Attribute] = [
    # PATIENT (PS3.4 C.6.1.1.2)
    Attribute("PatientID", "LO", P, Patient.patient_id),
    Attribute("IssuerOfPatientID", "LO", P, Patient.issuer_of_patient_id),
    Attribute("PatientName", "PN", P, Patient.patient_name),
    Attribute("PatientBirthDate", "DA", P, Patient.patient_birth_date),
    Attribute("PatientSex", "CS", P, Patient.patient_sex),
    Attribute("NumberOfPatientRelatedStudies", "IS", P, computed=Computed.COUNT, over=ST),
    Attribute("NumberOfPatientRelatedSeries", "IS", P, computed=Computed.COUNT, over=SE),
    Attribute("NumberOfPatientRelatedInstances", "IS", P, computed=Computed.COUNT, over=IM),
    # STUDY (PS3.4 C.6.1.1.3)
    Attribute("StudyInstanceUID", "UI", ST, Study.study_instance_uid),
    Attribute("StudyDate", "DA", ST, Study.study_date),
    Attribute("StudyTime", "TM", ST, Study.study_time),
    Attribute("AccessionNumber", "SH", ST, Study.accession_number),
    Attribute("StudyID", "SH", ST, Study.study_id),
    Attribute("StudyDescription", "LO", ST, Study.study_description),
    Attribute("ReferringPhysicianName", "PN", ST, Study.referring_physician_name),
    Attribute("NumberOfStudyRelatedSeries", "IS", ST, computed=Computed.COUNT, over=SE),
    Attribute("NumberOfStudyRelatedInstances", "IS", ST, computed=Computed.COUNT, over=IM),
    Attribute("ModalitiesInStudy", "CS", ST, computed=Computed.DISTINCT, over=SE,
              distinct_column=Series.modality),
    Attribute("SOPClassesInStudy", "UI", ST, computed=Computed.DISTINCT, over=IM,
              distinct_column=Instance.sop_class_uid),
    # SERIES (PS3.4 C.6.1.1.4)
    Attribute("SeriesInstanceUID", "UI", SE, Series.series_instance_uid),
    Attribute("Modality", "CS", SE, Series.modality),
    Attribute("SeriesNumber", "IS", SE, Series.series_number),
    Attribute("SeriesDescription", "LO", SE, Series.series_description),
    Attribute("BodyPartExamined", "CS", SE, Series.body_part_examined),
    Attribute("SeriesDate", "DA", SE, Series.series_date),
    Attribute("SeriesTime", "TM", SE, Series.series_time),
    Attribute("FrameOfReferenceUID", "UI", SE, Series.frame_of_reference_uid),
    Attribute("NumberOfSeriesRelatedInstances", "IS", SE, computed=Computed.COUNT, over=IM),
    # IMAGE (PS3.4 C.6.1.1.5)
    Attribute("SOPInstanceUID", "UI", IM, Instance.sop_instance_uid),
    Attribute("SOPClassUID", "UI", IM, Instance.sop_class_uid),
    Attribute("InstanceNumber", "IS", IM, Instance.instance_number),
    Attribute("NumberOfFrames", "IS", IM, Instance.number_of_frames),
    Attribute("Rows", "US", IM, Instance.rows),
    Attribute("Columns", "US", IM, Instance.columns),
    Attribute("BitsAllocated", "US", IM, Instance.bits_allocated),
    Attribute("ContentDate", "DA", IM, Instance.content_date),
    Attribute("ContentTime", "TM", IM, Instance.content_time),
    Attribute("SyntheticData", "CS", IM, Instance.synthetic_data),
    Attribute("AvailableTransferSyntaxUID", "UI", IM, Instance.transfer_syntax_uid),
]

#: Every attribute the index can answer, by keyword.
ATTRIBUTES: dict[str, Attribute] = {a.keyword: a for a in _ATTRS}

_ENTITY_PK = {P: Patient.id, ST: Study.id, SE: Series.id, IM: Instance.id}
_PARENT_FK = {ST: Study.patient_pk, SE: Series.study_pk, IM: Instance.series_pk}
_TABLE = {P: Patient, ST: Study, SE: Series, IM: Instance}

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


# --------------------------------------------------------------------------------------------
# Wildcard expression: case-sensitive LIKE on PostgreSQL, GLOB on SQLite (whose LIKE ignores
# ASCII case). A custom element so the statement stays dialect-neutral until compiled.
# --------------------------------------------------------------------------------------------
class _Wildcard(ColumnElement[bool]):
    """``column`` matches the DICOM wildcard pattern ``pattern`` (``*`` / ``?``),
    case-sensitively."""

    inherit_cache = False  # the pattern is rendered per dialect
    type = Boolean()

    def __init__(self, column: ColumnElement[Any], pattern: str) -> None:
        self.column = column
        self.pattern = pattern


def dicom_to_like(pattern: str, escape: str = "!") -> str:
    """Translate a DICOM wildcard value to a SQL LIKE pattern (``*``->``%``, ``?``->``_``)."""
    out = []
    for ch in pattern:
        if ch in ("%", "_", escape):
            out.append(escape + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def dicom_to_glob(pattern: str) -> str:
    """Translate a DICOM wildcard value to a SQLite GLOB pattern (only ``[`` needs quoting)."""
    return pattern.replace("[", "[[]")


@compiles(_Wildcard)
def _wildcard_default(element: _Wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    col = compiler.process(element.column, **kw)
    pat = compiler.process(literal(dicom_to_like(element.pattern)), **kw)
    return f"{col} LIKE {pat} ESCAPE '!'"


@compiles(_Wildcard, "sqlite")
def _wildcard_sqlite(element: _Wildcard, compiler: SQLCompiler, **kw: Any) -> str:
    col = compiler.process(element.column, **kw)
    pat = compiler.process(literal(dicom_to_glob(element.pattern)), **kw)
    return f"{col} GLOB {pat}"


# --------------------------------------------------------------------------------------------
# Value parsing
# --------------------------------------------------------------------------------------------
def _values(raw: Any) -> list[str]:
    """Split a query value into its values (backslash-separated or a sequence), stripped."""
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        items = [str(v) for v in raw]
    else:
        items = str(raw).split("\\")
    return [v.strip() for v in items]


def is_universal(raw: Any) -> bool:
    """PS3.4 C.2.2.2.3: zero-length value, or only ``*``."""
    return all(v in ("", "*") for v in _values(raw))


def _has_wildcard(v: str) -> bool:
    return "*" in v or "?" in v


def _check_date(keyword: str, v: str) -> str:
    v = v.replace(".", "") if len(v) == 10 else v  # ACR-NEMA YYYY.MM.DD, tolerated
    if not _DA.match(v):
        raise InvalidQuery(keyword, f"date value must be YYYYMMDD (PS3.5 DA), got {v!r}")
    return v


def _time_bounds(keyword: str, v: str) -> tuple[str, str]:
    """(first second, last second) of a possibly partial TM value, as ``HHMMSS``."""
    m = _TM.match(v.replace(":", ""))
    if not m:
        raise InvalidQuery(
            keyword, f"time value must be HH[MM[SS[.F{{1,6}}]]] (PS3.5 TM), got {v!r}"
        )
    hh, mm, ss = m.group(1), m.group(2), m.group(3)
    lo = hh + (mm or "00") + (ss or "00")
    hi = hh + (mm or "59") + (ss or "59")
    if int(hh) > 23 or int(mm or 0) > 59 or int(ss or 0) > 60:
        raise InvalidQuery(keyword, f"time value out of range, got {v!r}")
    return lo, hi


def _norm_time(col: Any) -> ColumnElement[Any]:
    """Stored TM as ``HHMMSS`` (pads partial values; drops the fraction)."""
    return func.substr(func.coalesce(col, "") + literal("000000"), 1, 6)


def _int(keyword: str, v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise InvalidQuery(keyword, f"integer value expected, got {v!r}") from None


# --------------------------------------------------------------------------------------------
# Conditions per VR
# --------------------------------------------------------------------------------------------
def _string_condition(attr: Attribute, col: Any, vals: list[str]) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    pn = attr.vr == "PN"
    for v in vals:
        if v == "":
            continue
        if pn:
            v = v.lower() if _has_wildcard(v) else v.rstrip("^").lower()
            stored = func.lower(func.coalesce(col, ""))
            if _has_wildcard(v):
                conds.append(stored.like(dicom_to_like(v), escape="!"))
            else:
                conds.append(func.rtrim(stored, "^") == v)
        elif _has_wildcard(v):
            if attr.vr not in WILDCARD_VRS:
                raise InvalidQuery(attr.keyword, f"wildcards are not allowed for VR {attr.vr}")
            conds.append(_Wildcard(func.coalesce(col, ""), v))
        else:
            conds.append(col == v)
    return or_(*conds) if conds else false()


def _uid_condition(attr: Attribute, col: Any, vals: list[str]) -> ColumnElement[bool]:
    uids = [v for v in vals if v]
    for u in uids:
        if _has_wildcard(u):
            raise InvalidQuery(attr.keyword, "wildcards are not allowed in UIDs (PS3.4 C.2.2.2.4)")
        if len(u) > 64 or not re.fullmatch(r"[0-9.]+", u):
            raise InvalidQuery(attr.keyword, f"not a valid UID (PS3.5 9.1): {u!r}")
    return col == uids[0] if len(uids) == 1 else col.in_(uids)


def _date_condition(attr: Attribute, col: Any, vals: list[str]) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    for v in vals:
        if v == "":
            continue
        if "-" in v:
            lo, _, hi = v.partition("-")
            parts: list[ColumnElement[bool]] = [col.is_not(None), col != ""]
            if lo:
                parts.append(col >= _check_date(attr.keyword, lo))
            if hi:
                parts.append(col <= _check_date(attr.keyword, hi))
            if not lo and not hi:
                raise InvalidQuery(attr.keyword, "a range needs at least one bound")
            conds.append(and_(*parts))
        else:
            conds.append(col == _check_date(attr.keyword, v))
    return or_(*conds) if conds else false()


def _time_condition(attr: Attribute, col: Any, vals: list[str]) -> ColumnElement[bool]:
    conds: list[ColumnElement[bool]] = []
    stored = _norm_time(col)
    for v in vals:
        if v == "":
            continue
        parts: list[ColumnElement[bool]] = [col.is_not(None), col != ""]
        if "-" in v:
            lo, _, hi = v.partition("-")
            if not lo and not hi:
                raise InvalidQuery(attr.keyword, "a range needs at least one bound")
            if lo:
                parts.append(stored >= _time_bounds(attr.keyword, lo)[0])
            if hi:
                parts.append(stored <= _time_bounds(attr.keyword, hi)[1])
        else:
            first, last = _time_bounds(attr.keyword, v)
            parts += [stored >= first, stored <= last]
        conds.append(and_(*parts))
    return or_(*conds) if conds else false()


def _number_condition(attr: Attribute, col: Any, vals: list[str]) -> ColumnElement[bool]:
    nums = [_int(attr.keyword, v) for v in vals if v]
    return col == nums[0] if len(nums) == 1 else col.in_(nums)


def _condition(attr: Attribute, col: Any, raw: Any) -> ColumnElement[bool]:
    vals = _values(raw)
    if attr.vr == "UI":
        return _uid_condition(attr, col, vals)
    if attr.vr == "DA":
        return _date_condition(attr, col, vals)
    if attr.vr == "TM":
        return _time_condition(attr, col, vals)
    if attr.vr in ("IS", "US", "UL", "SS", "SL"):
        return _number_condition(attr, col, vals)
    return _string_condition(attr, col, vals)


# --------------------------------------------------------------------------------------------
# Query construction
# --------------------------------------------------------------------------------------------
def _descendant_chain(top: QueryLevel, bottom: QueryLevel) -> list[QueryLevel]:
    order = [P, ST, SE, IM]
    return order[order.index(top) + 1 : order.index(bottom) + 1]


def _count_expr(level: QueryLevel, over: QueryLevel) -> Any:
    chain = _descendant_chain(level, over)
    stmt = select(func.count(_ENTITY_PK[over])).select_from(_TABLE[over])
    for lower, upper in pairwise(reversed(chain)):
        stmt = stmt.join(_TABLE[upper], _PARENT_FK[lower] == _ENTITY_PK[upper])
    stmt = stmt.where(_PARENT_FK[chain[0]] == _ENTITY_PK[level])
    return stmt.correlate(_TABLE[level]).scalar_subquery()


def _distinct_match(level: QueryLevel, attr: Attribute, raw: Any) -> ColumnElement[bool]:
    """EXISTS a descendant whose listed column matches (e.g. ModalitiesInStudy = CT\\MR)."""
    assert attr.over is not None  # table invariant
    chain = _descendant_chain(level, attr.over)
    stmt = select(literal(1)).select_from(_TABLE[attr.over])
    for lower, upper in pairwise(reversed(chain)):
        stmt = stmt.join(_TABLE[upper], _PARENT_FK[lower] == _ENTITY_PK[upper])
    cond = _condition(attr, attr.distinct_column, raw)
    stmt = stmt.where(_PARENT_FK[chain[0]] == _ENTITY_PK[level], cond)
    return exists(stmt.correlate(_TABLE[level]))


@dataclass(frozen=True)
class Query:
    """A matching query, ready to run.

    Attributes
    ----------
    level : QueryLevel
    statement : Select
        returns one row per matching entity; columns labelled by keyword, plus ``_pk``
    return_keys : tuple of str
        keywords answered for each match, in request order (the level's unique key first
        if it was not requested)
    unsupported : tuple of str
        requested keys the index cannot match or return (answered zero-length / None)
    ignored : tuple of str
        keys given a non-universal value that this node does not match on (computed keys)
    """

    level: QueryLevel
    statement: Select[Any]
    return_keys: tuple[str, ...]
    unsupported: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    distinct_keys: tuple[str, ...] = field(default=())


def build_query(
    level: QueryLevel | str,
    keys: Mapping[str, Any],
    *,
    limit: int | None = None,
    offset: int | None = None,
) -> Query:
    """Build the matching query for ``keys`` at ``level`` (PS3.4 C.2.2.2, C.4.1.3.1).

    Parameters
    ----------
    level
        query level; keys of this level and of the levels above it are matched
    keys
        attribute keyword -> query value (``str`` in DICOM encoding with ``\\`` between
        values, a list of values, an ``int``, or ``None`` / ``''`` for universal matching)
    limit, offset
        optional paging (QIDO-RS ``limit`` / ``offset``)

    Raises
    ------
    InvalidQuery
        a value is not valid for its attribute's VR
    """
    level = QueryLevel(level)
    unique = UNIQUE_KEYS[level]
    return_keys = ([unique] if unique not in keys else []) + list(keys)
    shape = _shape(level, tuple(return_keys))
    ignored: list[str] = []
    where: list[ColumnElement[bool]] = []
    for kw in return_keys:
        raw = keys.get(kw)
        if kw in shape.unsupported or is_universal(raw):
            continue  # universal (a lone '*' is tolerated on every VR)
        attr = ATTRIBUTES[kw]
        if attr.computed is Computed.COUNT:
            ignored.append(kw)
        elif attr.computed is Computed.DISTINCT:
            where.append(_distinct_match(attr.level, attr, raw))
        else:
            where.append(_condition(attr, attr.column, raw))
    if shape.unsupported:
        log.debug("keys not in the index (answered empty): %s", shape.unsupported)
    return Query(level, _paged(shape.statement, level, where, limit, offset),
                 shape.return_keys, shape.unsupported, tuple(ignored), shape.distinct_keys)


@functools.lru_cache(maxsize=256)
def _shape(level: QueryLevel, return_keys: tuple[str, ...]) -> Query:
    """What a query returns, whatever it matches: the level's tables joined, the columns
    (related counts included) and which keys are unsupported or listed per study. Built
    once per (level, keys): statements are immutable, the conditions are added per call."""
    order = [P, ST, SE, IM][: level.depth + 1]
    stmt = select(_ENTITY_PK[level].label("_pk")).select_from(_TABLE[level])
    for lower, upper in pairwise(reversed(order)):
        stmt = stmt.join(_TABLE[upper], _PARENT_FK[lower] == _ENTITY_PK[upper])
    if level.depth >= ST.depth:
        stmt = stmt.add_columns(Study.id.label("_study_pk"))
    unsupported: list[str] = []
    distinct: list[str] = []
    for kw in return_keys:
        attr = ATTRIBUTES.get(kw)
        if attr is None or attr.level.depth > level.depth:
            unsupported.append(kw)
        elif attr.computed is Computed.COUNT:
            stmt = stmt.add_columns(_count_expr(attr.level, attr.over).label(kw))  # type: ignore[arg-type]
        elif attr.computed is Computed.DISTINCT:
            distinct.append(kw)
        else:
            stmt = stmt.add_columns(attr.column.label(kw))
    return Query(level, stmt, return_keys, tuple(unsupported), (), tuple(distinct))


def _paged(stmt: Select[Any], level: QueryLevel, where: list[ColumnElement[bool]],
           limit: int | None, offset: int | None) -> Select[Any]:
    """``stmt`` restricted by ``where``, in key order, paged."""
    pk = _ENTITY_PK[level]
    if not offset:
        stmt = stmt.where(and_(*where)) if where else stmt
        return stmt.order_by(pk) if limit is None else stmt.order_by(pk).limit(limit)
    # page on the keys alone, then compute the returned columns (related counts ...) for
    # that page only: an OFFSET over the full statement evaluates them for every skipped
    # row too (PostgreSQL does)
    order = [P, ST, SE, IM][: level.depth + 1]
    page = select(pk).select_from(_TABLE[level])
    for lower, upper in pairwise(reversed(order)):
        page = page.join(_TABLE[upper], _PARENT_FK[lower] == _ENTITY_PK[upper])
    if where:
        page = page.where(and_(*where))
    page = page.order_by(pk).offset(offset)
    if limit is not None:
        page = page.limit(limit)
    return stmt.where(pk.in_(page.scalar_subquery())).order_by(pk)


Executor = Connection | Session


def _distinct_values(
    conn: Executor, attr: Attribute, study_pks: Sequence[int]
) -> dict[int, list[str]]:
    stmt = _distinct_statement(attr.keyword)
    out: dict[int, list[str]] = {}
    for chunk_start in range(0, len(study_pks), 500):
        chunk = list(study_pks[chunk_start : chunk_start + 500])
        for spk, value in conn.execute(stmt, {"study_pks": chunk}):
            if value != "":
                out.setdefault(spk, []).append(value)
    for v in out.values():
        v.sort()
    return out


@functools.cache
def _distinct_statement(keyword: str) -> Select[Any]:
    """(study key, value) of the listed attribute ``keyword`` under the studies bound as
    ``study_pks``."""
    attr = ATTRIBUTES[keyword]
    assert attr.over is not None and attr.distinct_column is not None
    stmt = select(Series.study_pk, attr.distinct_column).distinct()
    if attr.over is IM:
        stmt = stmt.select_from(Instance).join(Series, Instance.series_pk == Series.id)
    return stmt.where(Series.study_pk.in_(bindparam("study_pks", expanding=True)),
                      attr.distinct_column.is_not(None))


def run(conn: Executor, query: Query, *, batch: int = 200) -> Iterator[dict[str, Any]]:
    """Execute ``query``; yield one ``{keyword: value}`` per match.

    Values are ``str`` / ``int`` as stored, ``None`` for absent or unsupported attributes,
    and a sorted ``list[str]`` for multi-valued computed keys (ModalitiesInStudy ...).
    Results are fetched ``batch`` rows at a time, so a caller that stops early (a
    cancelled C-FIND) does not materialise the rest.
    """
    result = conn.execute(query.statement)
    while True:
        rows = result.fetchmany(batch)
        if not rows:
            return
        extra: dict[str, dict[int, list[str]]] = {}
        if query.distinct_keys:
            spks = sorted({r._mapping["_study_pk"] for r in rows})
            for kw in query.distinct_keys:
                extra[kw] = _distinct_values(conn, ATTRIBUTES[kw], spks)
        for row in rows:
            m = row._mapping
            out: dict[str, Any] = {}
            for kw in query.return_keys:
                if kw in extra:
                    out[kw] = extra[kw].get(m["_study_pk"], [])
                elif kw in m:
                    out[kw] = m[kw]
                else:
                    out[kw] = None
            yield out


def find(
    conn: Executor,
    level: QueryLevel | str,
    keys: Mapping[str, Any],
    *,
    limit: int | None = None,
    offset: int | None = None,
) -> list[dict[str, Any]]:
    """Convenience: :func:`build_query` then :func:`run`, all matches as a list."""
    return list(run(conn, build_query(level, keys, limit=limit, offset=offset)))


def keywords_at(level: QueryLevel | str) -> list[str]:
    """Keywords matchable or returnable at ``level`` (its own and upper levels')."""
    lvl = QueryLevel(level)
    return [a.keyword for a in _ATTRS if a.level.depth <= lvl.depth]


__all__ = [
    "ATTRIBUTES",
    "UNIQUE_KEYS",
    "WILDCARD_VRS",
    "Attribute",
    "InvalidQuery",
    "Query",
    "QueryLevel",
    "build_query",
    "dicom_to_glob",
    "dicom_to_like",
    "find",
    "is_universal",
    "keywords_at",
    "run",
]
