"""Read API over the index for retrieve and storage commitment (PS3.4 C.4.2, C.4.3, J).

Built on :mod:`storage.matching` so C-GET / C-MOVE / WADO-RS select instances with the same
rules as C-FIND / QIDO-RS. Returns facts (UIDs, relative paths, digests); reading the files
is the caller's business through the file store.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from storage.matching import (
    UNIQUE_KEYS,
    Executor,
    InvalidQuery,
    QueryLevel,
    build_query,
    is_universal,
)
from storage.tables import Instance, Patient, Series, Study

__all__ = [
    "InstanceRef", "StudyPatient", "instances_by_uid", "patient_studies", "retrieve_set",
    "studies_of_instances", "study_patients",
]


@dataclass(frozen=True)
class InstanceRef:
    """One stored instance, as retrieve and commitment need it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    file_path: str  # relative to the store root
    file_size: int
    sha256: str


def _refs(conn: Executor, stmt: Any) -> list[InstanceRef]:
    return [InstanceRef(*row) for row in conn.execute(stmt)]


def _columns() -> tuple[Any, ...]:
    return (
        Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
        Study.study_instance_uid, Series.series_instance_uid, Instance.file_path,
        Instance.file_size, Instance.sha256,
    )


def retrieve_set(
    conn: Executor, level: QueryLevel | str, keys: Mapping[str, Any]
) -> list[InstanceRef]:
    """Instances under the entities a C-GET / C-MOVE identifier names (PS3.4 C.4.2.2.1).

    The identifier must carry the unique key of ``level`` with a value (a single value or,
    for UIDs, a list, PS3.4 C.2.2.2.2); unique keys of upper levels narrow the set. Other
    keys are ignored (relational retrieve is not offered).

    Raises
    ------
    InvalidQuery
        the unique key of ``level`` is missing or universal, or a value is malformed
    """
    level = QueryLevel(level)
    unique = UNIQUE_KEYS[level]
    if unique not in keys or is_universal(keys[unique]):
        raise InvalidQuery(
            unique, f"a {level.value} level retrieve needs {unique} (PS3.4 C.4.2.2.1)"
        )
    match_keys = {
        kw: keys[kw]
        for lvl, kw in UNIQUE_KEYS.items()
        if lvl.depth <= level.depth and kw in keys and not is_universal(keys[kw])
    }
    query = build_query(QueryLevel.IMAGE, match_keys)
    ids = query.statement.with_only_columns(Instance.id).order_by(None).scalar_subquery()
    stmt = (
        select(*_columns())
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .where(Instance.id.in_(ids))
        .order_by(Study.id, Series.id, Instance.instance_number, Instance.id)
    )
    return _refs(conn, stmt)


def instances_by_uid(conn: Executor, sop_instance_uids: Iterable[str]) -> dict[str, InstanceRef]:
    """Stored instances among ``sop_instance_uids``, keyed by SOP Instance UID."""
    uids = list(dict.fromkeys(sop_instance_uids))
    out: dict[str, InstanceRef] = {}
    for start in range(0, len(uids), 500):
        chunk = uids[start : start + 500]
        stmt = (
            select(*_columns())
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Instance.sop_instance_uid.in_(chunk))
        )
        for ref in _refs(conn, stmt):
            out[ref.sop_instance_uid] = ref
    return out


@dataclass(frozen=True)
class StudyPatient:
    """Who a stored study belongs to (for the ledger's keyed patient digests and the
    Patient participant of DICOM audit messages)."""

    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    accession_number: str | None


def study_patients(conn: Executor, study_instance_uids: Iterable[str]) -> dict[str, StudyPatient]:
    """The patient of each stored study among ``study_instance_uids``."""
    uids = list(dict.fromkeys(study_instance_uids))
    out: dict[str, StudyPatient] = {}
    for start in range(0, len(uids), 500):
        stmt = (
            select(Study.study_instance_uid, Patient.patient_id, Patient.issuer_of_patient_id,
                   Patient.patient_name, Study.accession_number)
            .join(Patient, Study.patient_pk == Patient.id)
            .where(Study.study_instance_uid.in_(uids[start:start + 500]))
        )
        for row in conn.execute(stmt):
            out[row[0]] = StudyPatient(*row)
    return out


def patient_studies(conn: Executor, patient_id: str,
                    issuer: str | None = None) -> list[tuple[str, str]]:
    """``(issuer, study_instance_uid)`` of the stored studies of ``patient_id`` (any issuer
    unless one is given)."""
    stmt = (
        select(Patient.issuer_of_patient_id, Study.study_instance_uid)
        .join(Study, Study.patient_pk == Patient.id)
        .where(Patient.patient_id == patient_id)
    )
    if issuer is not None:
        stmt = stmt.where(Patient.issuer_of_patient_id == issuer)
    return [(str(r[0] or ""), str(r[1])) for r in conn.execute(stmt)]


def studies_of_instances(conn: Executor, sop_instance_uids: Iterable[str]) -> set[str]:
    """Study Instance UIDs of the stored instances among ``sop_instance_uids``."""
    return {r.study_instance_uid for r in instances_by_uid(conn, sop_instance_uids).values()}
