"""The state store: every fact the engine needs to resume after a crash, and nothing secret.

All writes are short transactions. Locks are leases in the ``locks`` table taken with a
conditional UPDATE-or-INSERT, which is atomic on SQLite and PostgreSQL alike, so moving to
several replicas changes the URL, not the engine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from rotator.errors import PermanentError, RotatorError
from rotator.state import schema
from rotator.state.models import (
    AuditEvent,
    CredentialState,
    Lock,
    Revocation,
    Rotation,
    RotationStep,
)

__all__ = ["StaleRotation", "StateStore", "lock_owner_id"]


class StaleRotation(RotatorError):
    """The rotation moved on without this worker (it lost its lease and another resumed it)."""

    def __init__(self, rotation_id: str, step: str) -> None:
        super().__init__(f"rotation {rotation_id} is no longer at step {step}: another worker "
                         "took it over")

_NOT_RUN = frozenset({"revoke", "done"})
"""Rotation states that are not a step run by ``_drive`` (revocations record their own rows)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CREDENTIALS = CredentialState.__table__
_ROTATIONS = Rotation.__table__
_STEPS = RotationStep.__table__
_REVOCATIONS = Revocation.__table__
_LOCKS = Lock.__table__
_AUDIT = AuditEvent.__table__


def _new_step(conn: Connection, rotation_id: str, step: str, now: datetime) -> int:
    result = conn.execute(insert(_STEPS).values(rotation_id=rotation_id, step=step,
                                                status="started", started_at=now))
    return int(result.inserted_primary_key[0])


def lock_owner_id(tag: str) -> str:
    """A lock owner id naming this host and process, so a dead local holder can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def _holder_is_dead(owner: str) -> bool:
    """True only when the holder ran on this host and its process no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def append_audit_in(conn: Connection, build: Callable[[int, str], dict[str, Any]]) -> int:
    """``StateStore.append_audit`` inside a write transaction the caller holds (so an event
    commits atomically with the state change it records)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE")
    last = conn.execute(select(_AUDIT.c.id, _AUDIT.c.hash)
                        .order_by(_AUDIT.c.id.desc()).limit(1)).first()
    next_id = (last.id + 1) if last is not None else 1
    conn.execute(insert(_AUDIT).values(**build(next_id, last.hash if last else "")))
    return next_id


class StateStore:
    """Typed operations on the state database; callers never see a Session."""

    def __init__(self, url: str, *, migrate: bool = True, create: bool = True) -> None:
        self.url = url
        where = make_url(url).render_as_string(hide_password=True)
        try:
            self.engine = schema.make_engine(url, create=create)
            if migrate:
                schema.upgrade(self.engine)
        except (OSError, SQLAlchemyError, ImportError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc).split("\n")[0]
            raise PermanentError(
                f"cannot open the state store {where}: {reason}; check `state_url` in "
                "[rotator] and that the directory exists and is writable by rotator") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite takes one writer at a time and makes the others sleep in its busy handler
        # (up to 100 ms a try); queueing this process's threads on a lock instead is far
        # faster. Other processes still meet SQLite's own lock and busy timeout.
        self._serial: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if url.startswith("sqlite") else contextlib.nullcontext())

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._serial, self._sessions.begin() as session:
            yield session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        """A read-only session outside the writers' queue: SQLite in WAL mode (and PostgreSQL)
        lets readers run beside the one writer, so reads need not wait for writes."""
        with self._sessions() as session:
            yield session

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A Core transaction, for the writes every rotation makes (half the CPU of the ORM,
        and so half the time the SQLite write lock is held)."""
        with self._serial, self.engine.begin() as conn:
            yield conn

    # -- credentials ---------------------------------------------------------------------------

    def sync_credentials(
        self, credentials: Sequence[tuple[str, str, str]], now: datetime,
        next_due: Callable[[CredentialState], tuple[datetime | None, str] | None],
    ) -> None:
        """In one transaction: add (name, agent, provider) rows not yet known, and set each
        credential's next due time to ``next_due(row)`` unless it returns None."""
        with self.session() as s:
            names = [c[0] for c in credentials]
            rows = {r.name: r for r in s.scalars(
                select(CredentialState).where(CredentialState.name.in_(names)))}
            for name, agent, provider in credentials:
                row = rows.get(name)
                if row is None:
                    row = CredentialState(name=name, agent=agent, provider=provider,
                                          first_seen_at=now, failures=0)
                    s.add(row)
                elif (row.agent, row.provider) != (agent, provider):
                    row.agent, row.provider = agent, provider
                due = next_due(row)
                if due is not None and (row.next_due_at, row.due_reason) != due:
                    row.next_due_at, row.due_reason = due

    def credential(self, name: str) -> CredentialState | None:
        with self._reading() as s:
            return s.get(CredentialState, name)

    def credentials(self) -> list[CredentialState]:
        with self._reading() as s:
            return list(s.scalars(select(CredentialState).order_by(CredentialState.name)))

    def update_credential(self, name: str, **fields: Any) -> None:
        with self._tx() as conn:
            conn.execute(update(_CREDENTIALS).where(_CREDENTIALS.c.name == name)
                         .values(**fields))

    def due_credentials(self, now: datetime, names: Sequence[str], limit: int) -> list[str]:
        """Names among ``names`` whose next due time has passed, most overdue first."""
        if limit <= 0 or not names:
            return []
        with self._reading() as s:
            rows = s.scalars(
                select(CredentialState.name)
                .where(CredentialState.next_due_at <= now, CredentialState.name.in_(names))
                .order_by(CredentialState.next_due_at)
                .limit(limit)
            )
            return list(rows)

    def earliest_due(self, names: Sequence[str]) -> datetime | None:
        with self._reading() as s:
            return s.scalar(
                select(func.min(CredentialState.next_due_at)).where(
                    CredentialState.name.in_(names)
                )
            )

    # -- rotations -----------------------------------------------------------------------------

    def rotation(self, rotation_id: str) -> Rotation | None:
        with self._reading() as s:
            return s.get(Rotation, rotation_id)

    def update_rotation(self, rotation_id: str, **fields: Any) -> None:
        with self._tx() as conn:
            conn.execute(update(_ROTATIONS).where(_ROTATIONS.c.id == rotation_id)
                         .values(**fields))

    def unfinished_rotations(self, credential: str | None = None) -> list[Rotation]:
        """Rotations stopped before their grace step (crash, stop, or a failing clean-up)."""
        with self._reading() as s:
            q = select(Rotation).where(Rotation.status == "running")
            if credential is not None:
                q = q.where(Rotation.credential == credential)
            return list(s.scalars(q.order_by(Rotation.started_at)))

    def rotations_in_grace(self) -> list[Rotation]:
        """Rotations whose new key is live and whose old key awaits (or just got) revocation."""
        with self._reading() as s:
            return list(s.scalars(select(Rotation).where(Rotation.status == "grace")))

    def rotations(self, credential: str | None = None, limit: int = 50) -> list[Rotation]:
        with self._reading() as s:
            q = select(Rotation)
            if credential is not None:
                q = q.where(Rotation.credential == credential)
            return list(s.scalars(q.order_by(Rotation.started_at.desc()).limit(limit)))

    def active_rotation_steps(self) -> dict[str, str]:
        """credential -> current step, for every rotation not yet done."""
        with self._reading() as s:
            rows = s.execute(
                select(Rotation.credential, Rotation.step, Rotation.status).where(
                    Rotation.status.in_(("running", "grace"))
                )
            )
            # A rotation in its grace period waits for the old key's revocation time.
            return {name: "grace" if status == "grace" else step for name, step, status in rows}

    def start_rotation(self, rotation: Rotation) -> int:
        """Record a new rotation and the start of its first step; returns that step's row id."""
        values = {c.name: getattr(rotation, c.name) for c in _ROTATIONS.columns}
        with self._tx() as conn:
            conn.execute(insert(_ROTATIONS).values(**values))
            return _new_step(conn, rotation.id, rotation.step, rotation.started_at)

    def resume_step(self, rotation_id: str, step: str, now: datetime) -> int:
        """The step row to close when a resumed rotation runs ``step`` again (reusing the row a
        crash left open, so the history shows one row per attempt that really ran)."""
        with self._tx() as conn:
            row = conn.scalar(select(_STEPS.c.id).where(
                _STEPS.c.rotation_id == rotation_id, _STEPS.c.step == step,
                _STEPS.c.status == "started").order_by(_STEPS.c.id.desc()).limit(1))
            return row if row is not None else _new_step(conn, rotation_id, step, now)

    def step_transition(
        self, rotation_id: str, step_row: int, step_status: str, now: datetime,
        message: str | None = None, next_step: str | None = None, /, *, expect_step: str,
        also: Callable[[Connection], None] | None = None, **rotation_fields: Any,
    ) -> int | None:
        """Close a step and, in the same transaction, record the rotation's new fields and the
        start of ``next_step`` (if it is a step that runs). Returns the new step row id.

        Raises ``StaleRotation`` (and records nothing) if the rotation is no longer running at
        ``expect_step``: another worker took it over, so this one must stop touching it.
        """
        with self._tx() as conn:
            rotation_fields["step"] = next_step if next_step is not None else expect_step
            moved = conn.execute(update(_ROTATIONS).where(
                _ROTATIONS.c.id == rotation_id, _ROTATIONS.c.step == expect_step,
                _ROTATIONS.c.status == "running").values(**rotation_fields))
            if not moved.rowcount:
                raise StaleRotation(rotation_id, expect_step)
            conn.execute(update(_STEPS).where(_STEPS.c.id == step_row).values(
                status=step_status, finished_at=now, message=message))
            if also is not None:
                also(conn)  # e.g. the step's audit event, in the same commit
            if next_step is None or next_step in _NOT_RUN:
                return None
            return _new_step(conn, rotation_id, next_step, now)

    def enter_grace(self, rotation_id: str, credential: str, now: datetime,
                    revocation: tuple[str, str | None, datetime] | None,
                    **credential_fields: Any) -> None:
        """The new key is live: schedule the old key's revocation (key id, vault version, not
        before) idempotently and update the credential, in one transaction."""
        revs = _REVOCATIONS
        with self._tx() as conn:
            if revocation is not None:
                key_id, version, not_before = revocation
                exists = conn.scalar(select(revs.c.id).where(
                    revs.c.rotation_id == rotation_id, revs.c.key_id == key_id))
                if exists is None:
                    conn.execute(insert(revs).values(
                        rotation_id=rotation_id, credential=credential, key_id=key_id,
                        vault_version=version, not_before=not_before, status="pending",
                        attempts=0))
            conn.execute(update(_CREDENTIALS).where(_CREDENTIALS.c.name == credential)
                         .values(**credential_fields))

    def record_revocation(self, revocation_id: int, rotation_id: str, started: datetime,
                          now: datetime, *, ok: bool, message: str,
                          retry_at: datetime | None = None) -> None:
        """A revocation attempt's outcome and its step row, in one transaction."""
        revs = _REVOCATIONS
        values: dict[str, Any] = {"attempts": revs.c.attempts + 1}
        if ok:
            values.update(status="done", done_at=now, last_error=None)
        else:
            values["last_error"] = message
            if retry_at is not None:
                values["not_before"] = retry_at
        with self._tx() as conn:
            conn.execute(update(revs).where(revs.c.id == revocation_id).values(**values))
            conn.execute(insert(_STEPS).values(
                rotation_id=rotation_id, step="revoke", status="succeeded" if ok else "failed",
                started_at=started, finished_at=now, message=message))

    def steps(self, rotation_id: str) -> list[RotationStep]:
        with self._reading() as s:
            return list(s.scalars(select(RotationStep).where(
                RotationStep.rotation_id == rotation_id).order_by(RotationStep.id)))

    # -- revocations ---------------------------------------------------------------------------

    def revocations(self, rotation_id: str) -> list[Revocation]:
        with self._reading() as s:
            return list(s.scalars(select(Revocation).where(
                Revocation.rotation_id == rotation_id).order_by(Revocation.id)))

    def pending_revocations(
        self, *, due_by: datetime | None = None, credential: str | None = None
    ) -> list[Revocation]:
        with self._reading() as s:
            q = select(Revocation).where(Revocation.status == "pending")
            if due_by is not None:
                q = q.where(Revocation.not_before <= due_by)
            if credential is not None:
                q = q.where(Revocation.credential == credential)
            return list(s.scalars(q.order_by(Revocation.not_before)))

    def expedite_revocations(self, credential: str, now: datetime) -> int:
        """Make every pending revocation of ``credential`` due now (emergency rotation)."""
        with self.session() as s:
            result = s.execute(update(Revocation).where(
                Revocation.credential == credential, Revocation.status == "pending",
                Revocation.not_before > now).values(not_before=now))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def credential_times(self) -> list[tuple[str, datetime | None, datetime | None]]:
        """``(name, last_rotated_at, next_due_at)`` of every credential, cheaply (for
        ``/metrics``, which reads them on every scrape)."""
        c = _CREDENTIALS.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(c.name, c.last_rotated_at, c.next_due_at)).all()
        return [(name, last, nxt) for name, last, nxt in rows]

    def count_pending_revocations(self) -> int:
        with self._reading() as s:
            return int(s.scalar(select(func.count()).select_from(Revocation).where(
                Revocation.status == "pending")) or 0)

    # -- locks ---------------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl: timedelta, now: datetime) -> str | None:
        """Take or renew the lease ``name``; None on success, else the current holder's id.

        A lease is free when it expired, or when its holder was a process on this host that no
        longer exists (so a restart after kill -9 resumes at once instead of waiting it out).
        """
        locks = _LOCKS
        values = {"owner": owner, "acquired_at": now, "expires_at": now + ttl}
        with self._tx() as conn:
            taken = conn.execute(update(locks).where(
                locks.c.name == name, or_(locks.c.owner == owner, locks.c.expires_at < now)
            ).values(**values))
            if taken.rowcount:
                return None
            holder = conn.scalar(select(locks.c.owner).where(locks.c.name == name))
            if holder is not None and _holder_is_dead(holder):
                taken = conn.execute(update(locks).where(
                    locks.c.name == name, locks.c.owner == holder).values(**values))
                if taken.rowcount:
                    return None
            if holder is not None:
                return holder
        try:
            with self._tx() as conn:
                conn.execute(insert(locks).values(name=name, **values))
            return None
        except IntegrityError:
            with self._tx() as conn:
                return conn.scalar(select(locks.c.owner).where(locks.c.name == name)) \
                    or "unknown"

    def renew_locks(self, names: Sequence[str], owner: str, ttl: timedelta,
                    now: datetime) -> set[str]:
        """Extend the leases ``owner`` still holds; returns the names it has lost."""
        if not names:
            return set()
        with self.session() as s:
            s.execute(update(Lock).where(Lock.name.in_(names), Lock.owner == owner)
                      .values(expires_at=now + ttl))
            held = set(s.scalars(select(Lock.name).where(Lock.name.in_(names),
                                                          Lock.owner == owner)))
        return set(names) - held

    def unlock(self, name: str, owner: str) -> None:
        """Release the lease; the row stays (expired) so the next lock is a single UPDATE."""
        with self._tx() as conn:
            conn.execute(update(_LOCKS).where(_LOCKS.c.name == name, _LOCKS.c.owner == owner)
                         .values(expires_at=_EPOCH))

    def lock_holder(self, name: str, now: datetime) -> str | None:
        with self.session() as s:
            row = s.get(Lock, name)
            if row is None or row.expires_at < now or _holder_is_dead(row.owner):
                return None
            return row.owner

    # -- audit trail ---------------------------------------------------------------------------

    def append_audit(self, build: Callable[[int, str], dict[str, Any]]) -> int:
        """Append one audit event in ONE write transaction and return its id.

        Reads the latest event's id and hash, then inserts ``build(next_id, prev_hash)`` (the
        column values, ``id`` and ``prev_hash`` included). SQLite's BEGIN IMMEDIATE, and on
        PostgreSQL a table lock, make read-then-insert atomic across threads, processes and
        replicas, so two writers can never chain onto the same event. Ids are assigned here,
        consecutively, so a gap in ids always means a deleted event.
        """
        with self._tx() as conn:
            return append_audit_in(conn, build)

    def audit_events(self, *, after_id: int = 0, since: datetime | None = None,
                     credential: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` audit events with ``id > after_id``, in id order, as column dicts."""
        q = select(_AUDIT).where(_AUDIT.c.id > after_id)
        if since is not None:
            q = q.where(_AUDIT.c.at >= since)
        if credential is not None:
            q = q.where(_AUDIT.c.credential == credential)
        with self._serial, self.engine.connect() as conn:
            return [dict(row._mapping) for row in
                    conn.execute(q.order_by(_AUDIT.c.id).limit(limit))]
