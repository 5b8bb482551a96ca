"""Pipeline tables on their own ``MetaData`` (Alembic branch ``node``, rev ``node_0001``).

* ``pipeline_jobs``: engine and dispatch jobs with an explicit state machine (see
  :mod:`node.pipeline.jobs`): the database is the truth about a job; a broker, if any, only carries
  job ids.
* ``pipeline_dispatch_acks``: every instance a destination acknowledged, per job: a job
  resumed after a restart never sends an acknowledged instance again.
* ``pipeline_studies``: per-study completion state (quiet period, re-open generation, the
  AE titles of the association that delivered it, for routing).
* ``pipeline_outputs``: the synthetic series the node produced (loop guard, replace policy,
  lineage). A row is written with state ``building`` (and the job attempt) before the
  series' first instance is stored and becomes ``complete`` in the transaction that records
  ``output.created`` and the dispatch jobs (``node_0003``): a series still ``building`` when
  its attempt died is a partial one, discarded by the next attempt (``output.discarded``).
* ``pipeline_scheduler_jobs``: APScheduler's persistent job store (quiet-period timers survive
  a restart); the schema is APScheduler 3's ``SQLAlchemyJobStore`` table, versioned here.
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Unicode,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}
UID = String(64)

metadata = MetaData(naming_convention=NAMING)

jobs = Table(
    "pipeline_jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),  # engine | dispatch
    Column("state", String(16), nullable=False),  # queued running succeeded failed cancelled
    Column("study_uid", UID, nullable=True),
    Column("series_uid", UID, nullable=True),
    Column("rule", String(128), nullable=True),
    Column("task", String(64), nullable=True),
    Column("spec", Text, nullable=False, default="{}"),  # JSON: params, format, destinations
    Column("seed", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("error", Text, nullable=True),
    Column("result", Text, nullable=True),  # JSON
    Column("parent_id", String(36), ForeignKey("pipeline_jobs.id"), nullable=True),
    Column("generation", Integer, nullable=False, default=0),
    Column("worker", String(128), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("not_before", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Index("ix_pipeline_jobs_state_created", "state", "created_at"),
    Index("ix_pipeline_jobs_study", "study_uid"),
)

dispatch_acks = Table(
    "pipeline_dispatch_acks",
    metadata,
    Column("job_id", String(36), ForeignKey("pipeline_jobs.id"), primary_key=True),
    Column("destination", String(128), primary_key=True),
    Column("sop_instance_uid", UID, primary_key=True),
    Column("acknowledged_at", DateTime(timezone=True), nullable=False),
)

studies = Table(
    "pipeline_studies",
    metadata,
    Column("study_uid", UID, primary_key=True),
    Column("state", String(16), nullable=False),  # open | complete
    Column("generation", Integer, nullable=False, default=0),
    Column("first_instance_at", DateTime(timezone=True), nullable=False),
    Column("last_instance_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    Column("instances", Integer, nullable=False, default=0),
    Column("called_ae", String(16), nullable=True),
    Column("calling_ae", String(16), nullable=True),
    Column("quiet_period_s", Integer, nullable=True),
)

outputs = Table(
    "pipeline_outputs",
    metadata,
    Column("series_uid", UID, primary_key=True),
    Column("job_id", String(36), ForeignKey("pipeline_jobs.id"), nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("source_series_uid", UID, nullable=False),
    Column("generation", Integer, nullable=False, default=0),
    Column("output_format", String(16), nullable=False),
    Column("instances", Integer, nullable=False),
    Column("watermark_payload", String(16), nullable=True),
    Column("digest", String(71), nullable=True),  # sha256:<hex> over the instances' digests
    Column("held", Boolean, nullable=False, default=False),  # quality gate
    Column("superseded", Boolean, nullable=False, default=False),  # replace policy
    Column("created_at", DateTime(timezone=True), nullable=False),
    # building (instances being stored) | complete (output.created + dispatch jobs written)
    Column("state", String(16), nullable=False, server_default="complete"),
    Column("attempt", Integer, nullable=True),  # the job attempt that built it
    Index("ix_pipeline_outputs_study", "study_uid"),
    Index("ix_pipeline_outputs_job", "job_id"),
)

scheduler_jobs = Table(
    "pipeline_scheduler_jobs",
    metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)
