"""pipeline outputs: build state and attempt (partial output series of a dead attempt)

An output series is recorded as ``building`` before its first instance is stored and marked
``complete`` together with its ``output.created`` ledger entry and dispatch jobs; rows that
exist before this revision were written complete, hence the server default.

Revision ID: node_0003
Revises: node_0002
Create Date: 2026-11-22 07:45:00
"""
from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "node_0003"
down_revision = "node_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pipeline_outputs") as batch:
        batch.add_column(sa.Column("state", sa.String(length=16), nullable=False,
                                   server_default="complete"))
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
    op.create_index("ix_pipeline_outputs_job", "pipeline_outputs", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_pipeline_outputs_job", table_name="pipeline_outputs")
    with op.batch_alter_table("pipeline_outputs") as batch:
        batch.drop_column("attempt")
        batch.drop_column("state")
