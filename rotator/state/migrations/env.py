"""Alembic environment: always run programmatically by rotator.state.schema on a connection."""

from __future__ import annotations

from alembic import context

from rotator.state.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
