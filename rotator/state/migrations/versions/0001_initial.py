"""Initial schema: credentials, rotations and their steps, revocations, locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from rotator.state.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(200), nullable=False),
        sa.Column("first_seen_at", UTCDateTime(), nullable=False),
        sa.Column("last_rotated_at", UTCDateTime(), nullable=True),
        sa.Column("last_rotation_id", sa.String(64), nullable=True),
        sa.Column("last_outcome", sa.String(32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("current_key_id", sa.String(200), nullable=True),
        sa.Column("next_due_at", UTCDateTime(), nullable=True),
        sa.Column("due_reason", sa.String(32), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
    )
    op.create_table(
        "rotations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("credential", sa.String(200), nullable=False),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(200), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("revoke_mode", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("old_key_id", sa.String(200), nullable=True),
        sa.Column("old_version", sa.String(64), nullable=True),
        sa.Column("new_key_id", sa.String(200), nullable=True),
        sa.Column("new_version", sa.String(64), nullable=True),
        sa.Column("manual_revoke", sa.Text(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_rotations_credential", "rotations", ["credential"])
    op.create_index("ix_rotations_status", "rotations", ["status"])
    op.create_table(
        "rotation_steps",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rotation_id", sa.String(64), sa.ForeignKey("rotations.id"), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
    )
    op.create_index("ix_rotation_steps_rotation", "rotation_steps", ["rotation_id", "id"])
    op.create_table(
        "revocations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("rotation_id", sa.String(64), sa.ForeignKey("rotations.id"), nullable=False),
        sa.Column("credential", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(200), nullable=False),
        sa.Column("vault_version", sa.String(64), nullable=True),
        sa.Column("not_before", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("done_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_revocations_due", "revocations", ["status", "not_before"])
    op.create_index("ix_revocations_credential", "revocations", ["credential"])
    op.create_table(
        "locks",
        sa.Column("name", sa.String(250), primary_key=True),
        sa.Column("owner", sa.String(250), nullable=False),
        sa.Column("acquired_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in ("locks", "revocations", "rotation_steps", "rotations", "credentials"):
        op.drop_table(table)
