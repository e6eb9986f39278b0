"""Misuse monitoring: per-key usage buckets from the providers' records, where each provider's
poll stands, and the anomalies that fired (once each).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from rotator.state.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_usage",
        sa.Column("provider", sa.String(200), primary_key=True),
        sa.Column("key_id", sa.String(200), primary_key=True),
        sa.Column("width", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("start", UTCDateTime(), primary_key=True),
        sa.Column("credential", sa.String(200), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.Column("cost", sa.Float(), nullable=True),
    )
    op.create_index("ix_key_usage_credential", "key_usage", ["credential", "start"])
    op.create_table(
        "usage_polls",
        sa.Column("provider", sa.String(200), primary_key=True),
        sa.Column("polled_at", UTCDateTime(), nullable=True),
        sa.Column("next_poll_at", UTCDateTime(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.create_table(
        "anomalies",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("credential", sa.String(200), nullable=False),
        sa.Column("agent", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(200), nullable=True),
        sa.Column("rule", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(250), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("detected_at", UTCDateTime(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("rotation_id", sa.String(64), nullable=True),
        sa.UniqueConstraint("credential", "rule", "subject", name="uq_anomalies_subject"),
    )
    op.create_index("ix_anomalies_credential", "anomalies", ["credential"])


def downgrade() -> None:
    op.drop_index("ix_anomalies_credential", "anomalies")
    op.drop_table("anomalies")
    op.drop_table("usage_polls")
    op.drop_index("ix_key_usage_credential", "key_usage")
    op.drop_table("key_usage")
