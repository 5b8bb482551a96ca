"""Index tables: patient / study / series / instance (PS3.4 C.6 keys of each level and the
attributes PACS tools query), on their own ``MetaData`` (Alembic branch ``storage``).

String columns hold DICOM values as received (VR PN/LO/SH/CS text; DA ``YYYYMMDD``;
TM ``HHMMSS.FFFFFF``), so PS3.4 C.2.2.2 matching can be applied in SQL.
"""
from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)  # PS3.5 VR UI max length


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    # every model here is mapped to a Table (DeclarativeBase types __table__ as FromClause)
    __table__: ClassVar[Table]


metadata = Base.metadata


class Patient(Base):
    """PATIENT level; key = Patient ID (0010,0020) + Issuer of Patient ID (0010,0021)."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """STUDY level; key = Study Instance UID (0020,000D)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """SERIES level; key = Series Instance UID (0020,000E)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_date: Mapped[str | None] = mapped_column(String(8))
    series_time: Mapped[str | None] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    synthetic: Mapped[bool] = mapped_column(default=False)  # any instance SyntheticData=YES
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """IMAGE (instance) level; key = SOP Instance UID (0008,0018)."""

    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_series_number", "series_pk", "instance_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    content_date: Mapped[str | None] = mapped_column(String(8))
    content_time: Mapped[str | None] = mapped_column(String(16))
    synthetic_data: Mapped[str | None] = mapped_column(String(3))  # (0008,001C) as received
    file_path: Mapped[str] = mapped_column(String(512))  # relative to the store root
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16), default="dimse")  # dimse | stow | engine

    series: Mapped[Series] = relationship(back_populates="instances")


class Landing(Base):
    """Instances indexed before their file was confirmed durable (see
    :meth:`storage.filestore.FileStore.write_async`): a row is written in the transaction
    that indexes the instance and removed by a later transaction once the file and its
    directory entry are on disk. Start-up recovery checks every row still here."""

    __tablename__ = "landing"

    file_path: Mapped[str] = mapped_column(String(512), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
