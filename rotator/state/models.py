"""The state store's tables. Key ids, versions and timestamps only: never a secret value.

The alembic migrations under ``migrations/versions`` create exactly these tables; a test checks
that the two agree, so a model change without a migration fails CI.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC (SQLite has no time zones) and always hands back aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state store; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class CredentialState(Base):
    """What the store knows of one credential across rotations (policy lives in the TOML)."""

    __tablename__ = "credentials"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    agent: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(200))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_rotation_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    current_key_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    next_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True,
                                                         index=True)
    due_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    """Consecutive failed scheduled rotations: drives the retry backoff."""


class Rotation(Base):
    """One run of the protocol for one credential, from create to done (or rollback)."""

    __tablename__ = "rotations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    credential: Mapped[str] = mapped_column(String(200), index=True)
    agent: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(16))
    revoke_mode: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    requested_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    step: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    old_key_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    old_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    new_key_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    new_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manual_revoke: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Set when the old key could not be identified and must be revoked by hand."""
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RotationStep(Base):
    """A step's start and end, written before and after the step runs."""

    __tablename__ = "rotation_steps"
    __table_args__ = (Index("ix_rotation_steps_rotation", "rotation_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rotation_id: Mapped[str] = mapped_column(ForeignKey("rotations.id"))
    step: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)


class Revocation(Base):
    """An old key to revoke once ``not_before`` passes: the grace period, made durable."""

    __tablename__ = "revocations"
    __table_args__ = (Index("ix_revocations_due", "status", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rotation_id: Mapped[str] = mapped_column(ForeignKey("rotations.id"))
    credential: Mapped[str] = mapped_column(String(200), index=True)
    key_id: Mapped[str] = mapped_column(String(200))
    vault_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The vault version that held this key, to confirm the key is dead after revoking."""
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Lock(Base):
    """A lease: one holder per name until ``expires_at``; the holder renews it while working."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(250), primary_key=True)
    owner: Mapped[str] = mapped_column(String(250))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Grows by one at every acquisition (never at a renewal): the fencing token."""


class RotationEpoch(Base):
    """An epoch (lease acquisition) under which a rotation was driven: the keys that owner may
    have created carry it in their names, so a clean-up finds them and only them."""

    __tablename__ = "rotation_epochs"

    rotation_id: Mapped[str] = mapped_column(ForeignKey("rotations.id"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class AuditEvent(Base):
    """One append-only audit event; ``hash`` chains it to the event before it.

    ``hash = sha256(prev_hash + canonical JSON of the other fields)`` (see :mod:`rotator.audit`),
    so editing, deleting or reordering rows breaks the chain where it happened. ``detail`` is
    JSON text: steps, outcomes, key ids and messages, never a secret value.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_credential", "credential", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    credential: Mapped[str | None] = mapped_column(String(200), nullable=True)
    rotation_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The newest audit event's id, hash and previous hash, in one row.

    Appending an event moves this row and inserts the event; on PostgreSQL both happen in one
    statement, so the row lock that keeps the chain a single line across replicas is held only
    for that statement and the commit.
    """

    __tablename__ = "audit_head"

    one: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    """Always 1: there is one head."""
    id: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))


class KeyUsage(Base):
    """One bucket of one key's use, as the provider's usage records reported it (counts only).

    Buckets are written again on every poll that covers them (the provider's figures for a
    recent bucket grow while it fills), so a row holds the latest figures, never a sum."""

    __tablename__ = "key_usage"
    __table_args__ = (Index("ix_key_usage_credential", "credential", "start"),)

    provider: Mapped[str] = mapped_column(String(200), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    width: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    """Bucket width in seconds (60, 3600 or 86400)."""
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    credential: Mapped[str] = mapped_column(String(200))
    requests: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cost: Mapped[float | None] = mapped_column(Float, nullable=True)


class UsagePoll(Base):
    """Where the usage poll of one provider stands, shared by every replica."""

    __tablename__ = "usage_polls"

    provider: Mapped[str] = mapped_column(String(200), primary_key=True)
    polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    """When the last poll that succeeded ran."""
    next_poll_at: Mapped[datetime] = mapped_column(UTCDateTime())
    failures: Mapped[int] = mapped_column(Integer, default=0)
    """Consecutive failed polls (rate limited, provider away): the backoff grows with them."""
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Anomaly(Base):
    """A misuse rule that fired, once per ``(credential, rule, subject)``: the subject names
    what it fired on (a key, a day, a bucket), so a replica or the next poll never fires it
    again, and the action is taken exactly once."""

    __tablename__ = "anomalies"
    __table_args__ = (UniqueConstraint("credential", "rule", "subject",
                                       name="uq_anomalies_subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    credential: Mapped[str] = mapped_column(String(200), index=True)
    agent: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(200))
    key_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    rule: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(250))
    action: Mapped[str] = mapped_column(String(16))
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime())
    message: Mapped[str] = mapped_column(Text)
    rotation_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The emergency rotation a ``revoke`` action started."""


class TokenRevocation(Base):
    """Every proxy token of ``agent`` issued at or before ``revoked_at`` is refused."""

    __tablename__ = "token_revocations"

    agent: Mapped[str] = mapped_column(String(200), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
