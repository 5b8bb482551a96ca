"""pipeline scheduler job store (APScheduler 3 SQLAlchemyJobStore schema)

Revision ID: node_0002
Revises: node_0001
Create Date: 2026-11-22 04:40:00
"""
from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "node_0002"
down_revision = "node_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_scheduler_jobs",
        sa.Column("id", sa.Unicode(length=191), nullable=False),
        sa.Column("next_run_time", sa.Float(precision=25), nullable=True),
        sa.Column("job_state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_scheduler_jobs")),
    )
    op.create_index(
        op.f("ix_pipeline_scheduler_jobs_next_run_time"),
        "pipeline_scheduler_jobs",
        ["next_run_time"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_pipeline_scheduler_jobs_next_run_time"), table_name="pipeline_scheduler_jobs")
    op.drop_table("pipeline_scheduler_jobs")
