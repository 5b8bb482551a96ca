"""landing: instances indexed before their file was confirmed durable

Revision ID: storage_0002
Revises: storage_0001
Create Date: 2026-12-07 15:30:00
"""
from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = 'storage_0002'
down_revision = 'storage_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('landing',
    sa.Column('file_path', sa.String(length=512), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('file_size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('file_path', name=op.f('pk_landing'))
    )


def downgrade() -> None:
    op.drop_table('landing')
