"""Replicas: credentials indexed by next due time (claimed on every tick), and the audit
chain's head in a row of its own (appended to in one statement on PostgreSQL).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_credentials_next_due_at", "credentials", ["next_due_at"])
    op.create_table(
        "audit_head",
        sa.Column("one", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
    )
    # The chain so far ends at the newest event (or nowhere yet).
    op.execute(
        "INSERT INTO audit_head (one, id, hash, prev_hash) "
        "SELECT 1, COALESCE(MAX(id), 0), "
        "COALESCE((SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1), ''), "
        "COALESCE((SELECT prev_hash FROM audit_events ORDER BY id DESC LIMIT 1), '') "
        "FROM audit_events")


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_index("ix_credentials_next_due_at", table_name="credentials")
