"""pipeline tables: jobs, dispatch acknowledgements, study state, outputs

Revision ID: node_0001
Revises:
Create Date: 2026-11-22 04:35:00
"""
from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "node_0001"
down_revision = None
branch_labels = ("node",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("rule", sa.String(length=128), nullable=True),
        sa.Column("task", sa.String(length=64), nullable=True),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.String(length=36), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["pipeline_jobs.id"],
            name=op.f("fk_pipeline_jobs_parent_id_pipeline_jobs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_jobs")),
    )
    op.create_index("ix_pipeline_jobs_state_created", "pipeline_jobs", ["state", "created_at"])
    op.create_index("ix_pipeline_jobs_study", "pipeline_jobs", ["study_uid"])
    op.create_table(
        "pipeline_dispatch_acks",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["pipeline_jobs.id"],
            name=op.f("fk_pipeline_dispatch_acks_job_id_pipeline_jobs"),
        ),
        sa.PrimaryKeyConstraint(
            "job_id", "destination", "sop_instance_uid", name=op.f("pk_pipeline_dispatch_acks")
        ),
    )
    op.create_table(
        "pipeline_studies",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("first_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("called_ae", sa.String(length=16), nullable=True),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("quiet_period_s", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("study_uid", name=op.f("pk_pipeline_studies")),
    )
    op.create_table(
        "pipeline_outputs",
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("source_series_uid", sa.String(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("output_format", sa.String(length=16), nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("watermark_payload", sa.String(length=16), nullable=True),
        sa.Column("digest", sa.String(length=71), nullable=True),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["pipeline_jobs.id"],
            name=op.f("fk_pipeline_outputs_job_id_pipeline_jobs"),
        ),
        sa.PrimaryKeyConstraint("series_uid", name=op.f("pk_pipeline_outputs")),
    )
    op.create_index("ix_pipeline_outputs_study", "pipeline_outputs", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_pipeline_outputs_study", table_name="pipeline_outputs")
    op.drop_table("pipeline_outputs")
    op.drop_table("pipeline_studies")
    op.drop_table("pipeline_dispatch_acks")
    op.drop_index("ix_pipeline_jobs_study", table_name="pipeline_jobs")
    op.drop_index("ix_pipeline_jobs_state_created", table_name="pipeline_jobs")
    op.drop_table("pipeline_jobs")
