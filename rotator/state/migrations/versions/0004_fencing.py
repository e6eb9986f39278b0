"""Fencing: every lease acquisition gets an epoch that only grows, and each rotation records
the epochs of the owners that drove it (their keys carry the epoch in their names, so a clean-up
can tell its own and earlier owners' keys from a newer owner's).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("locks") as batch:
        batch.add_column(sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "rotation_epochs",
        sa.Column("rotation_id", sa.String(64), sa.ForeignKey("rotations.id"),
                  primary_key=True),
        sa.Column("epoch", sa.Integer(), primary_key=True, autoincrement=False),
    )


def downgrade() -> None:
    op.drop_table("rotation_epochs")
    with op.batch_alter_table("locks") as batch:
        batch.drop_column("epoch")
