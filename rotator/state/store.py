"""The state store: every fact the engine needs to resume after a crash, and nothing secret.

All writes are short transactions. Locks are leases in the ``locks`` table taken with a
conditional UPDATE-or-INSERT, which is atomic on SQLite and PostgreSQL alike, so moving to
several replicas changes the URL, not the engine.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from rotator.state import schema
from rotator.state.models import CredentialState, Lock, Revocation, Rotation, RotationStep

__all__ = ["StateStore", "lock_owner_id"]


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


class StateStore:
    """Typed operations on the state database; callers never see a Session."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = schema.make_engine(url)
        if migrate:
            schema.upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- credentials ---------------------------------------------------------------------------

    def ensure_credential(self, name: str, agent: str, provider: str, now: datetime) -> None:
        with self.session() as s:
            row = s.get(CredentialState, name)
            if row is None:
                s.add(CredentialState(name=name, agent=agent, provider=provider,
                                      first_seen_at=now, failures=0))
            elif (row.agent, row.provider) != (agent, provider):
                row.agent, row.provider = agent, provider

    def credential(self, name: str) -> CredentialState | None:
        with self.session() as s:
            return s.get(CredentialState, name)

    def credentials(self) -> list[CredentialState]:
        with self.session() as s:
            return list(s.scalars(select(CredentialState).order_by(CredentialState.name)))

    def update_credential(self, name: str, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(CredentialState).where(CredentialState.name == name).values(**fields))

    def due_credentials(self, now: datetime, names: Sequence[str], limit: int) -> list[str]:
        """Names among ``names`` whose next due time has passed, most overdue first."""
        if limit <= 0 or not names:
            return []
        with self.session() as s:
            rows = s.scalars(
                select(CredentialState.name)
                .where(CredentialState.next_due_at <= now, CredentialState.name.in_(names))
                .order_by(CredentialState.next_due_at)
                .limit(limit)
            )
            return list(rows)

    def earliest_due(self, names: Sequence[str]) -> datetime | None:
        with self.session() as s:
            return s.scalar(
                select(func.min(CredentialState.next_due_at)).where(
                    CredentialState.name.in_(names)
                )
            )

    # -- rotations -----------------------------------------------------------------------------

    def add_rotation(self, rotation: Rotation) -> None:
        with self.session() as s:
            s.add(rotation)

    def rotation(self, rotation_id: str) -> Rotation | None:
        with self.session() as s:
            return s.get(Rotation, rotation_id)

    def update_rotation(self, rotation_id: str, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(Rotation).where(Rotation.id == rotation_id).values(**fields))

    def unfinished_rotations(self, credential: str | None = None) -> list[Rotation]:
        """Rotations stopped before their grace step (crash, stop, or a failing clean-up)."""
        with self.session() as s:
            q = select(Rotation).where(Rotation.status == "running")
            if credential is not None:
                q = q.where(Rotation.credential == credential)
            return list(s.scalars(q.order_by(Rotation.started_at)))

    def rotations_in_grace(self) -> list[Rotation]:
        """Rotations whose new key is live and whose old key awaits (or just got) revocation."""
        with self.session() as s:
            return list(s.scalars(select(Rotation).where(Rotation.status == "grace")))

    def rotations(self, credential: str | None = None, limit: int = 50) -> list[Rotation]:
        with self.session() as s:
            q = select(Rotation)
            if credential is not None:
                q = q.where(Rotation.credential == credential)
            return list(s.scalars(q.order_by(Rotation.started_at.desc()).limit(limit)))

    def active_rotation_steps(self) -> dict[str, str]:
        """credential -> current step, for every rotation not yet done."""
        with self.session() as s:
            rows = s.execute(
                select(Rotation.credential, Rotation.step).where(
                    Rotation.status.in_(("running", "grace"))
                )
            )
            return {name: step for name, step in rows}

    def step_started(self, rotation_id: str, step: str, now: datetime) -> bool:
        """Record that ``step`` starts; True if an earlier attempt of it was already recorded
        (so the step must clean up after a crashed run of itself)."""
        with self.session() as s:
            earlier = s.scalar(
                select(func.count()).select_from(RotationStep).where(
                    RotationStep.rotation_id == rotation_id, RotationStep.step == step
                )
            )
            s.add(RotationStep(rotation_id=rotation_id, step=step, status="started",
                               started_at=now))
            s.execute(update(Rotation).where(Rotation.id == rotation_id).values(step=step))
            return bool(earlier)

    def step_finished(
        self, rotation_id: str, step: str, status: str, now: datetime, /,
        message: str | None = None, **rotation_fields: Any,
    ) -> None:
        """Close the step's latest record and apply ``rotation_fields`` in the same transaction."""
        with self.session() as s:
            step_id = s.scalar(
                select(func.max(RotationStep.id)).where(
                    RotationStep.rotation_id == rotation_id, RotationStep.step == step
                )
            )
            if step_id is not None:
                s.execute(update(RotationStep).where(RotationStep.id == step_id).values(
                    status=status, finished_at=now, message=message))
            if rotation_fields:
                s.execute(update(Rotation).where(Rotation.id == rotation_id).values(
                    **rotation_fields))

    def steps(self, rotation_id: str) -> list[RotationStep]:
        with self.session() as s:
            return list(s.scalars(select(RotationStep).where(
                RotationStep.rotation_id == rotation_id).order_by(RotationStep.id)))

    # -- revocations ---------------------------------------------------------------------------

    def schedule_revocation(
        self, rotation_id: str, credential: str, key_id: str, vault_version: str | None,
        not_before: datetime,
    ) -> None:
        """Idempotent: one revocation per (rotation, key)."""
        with self.session() as s:
            exists = s.scalar(select(Revocation.id).where(
                Revocation.rotation_id == rotation_id, Revocation.key_id == key_id))
            if exists is None:
                s.add(Revocation(rotation_id=rotation_id, credential=credential, key_id=key_id,
                                 vault_version=vault_version, not_before=not_before,
                                 status="pending", attempts=0))

    def revocations(self, rotation_id: str) -> list[Revocation]:
        with self.session() as s:
            return list(s.scalars(select(Revocation).where(
                Revocation.rotation_id == rotation_id).order_by(Revocation.id)))

    def pending_revocations(
        self, *, due_by: datetime | None = None, credential: str | None = None
    ) -> list[Revocation]:
        with self.session() as s:
            q = select(Revocation).where(Revocation.status == "pending")
            if due_by is not None:
                q = q.where(Revocation.not_before <= due_by)
            if credential is not None:
                q = q.where(Revocation.credential == credential)
            return list(s.scalars(q.order_by(Revocation.not_before)))

    def update_revocation(self, revocation_id: int, **fields: Any) -> None:
        with self.session() as s:
            s.execute(update(Revocation).where(Revocation.id == revocation_id).values(**fields))

    def expedite_revocations(self, credential: str, now: datetime) -> int:
        """Make every pending revocation of ``credential`` due now (emergency rotation)."""
        with self.session() as s:
            result = s.execute(update(Revocation).where(
                Revocation.credential == credential, Revocation.status == "pending",
                Revocation.not_before > now).values(not_before=now))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def count_pending_revocations(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Revocation).where(
                Revocation.status == "pending")) or 0)

    # -- locks ---------------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl: timedelta, now: datetime) -> str | None:
        """Take or renew the lease ``name``; None on success, else the current holder's id.

        A lease is free when it expired, or when its holder was a process on this host that no
        longer exists (so a restart after kill -9 resumes at once instead of waiting it out).
        """
        expires = now + ttl
        with self.session() as s:
            taken = s.execute(update(Lock).where(
                Lock.name == name, or_(Lock.owner == owner, Lock.expires_at < now)
            ).values(owner=owner, acquired_at=now, expires_at=expires))
            if taken.rowcount:  # type: ignore[attr-defined]
                return None
            holder = s.scalar(select(Lock.owner).where(Lock.name == name))
            if holder is not None and _holder_is_dead(holder):
                taken = s.execute(update(Lock).where(Lock.name == name, Lock.owner == holder)
                                  .values(owner=owner, acquired_at=now, expires_at=expires))
                if taken.rowcount:  # type: ignore[attr-defined]
                    return None
            if holder is not None:
                return holder
        try:
            with self.session() as s:
                s.add(Lock(name=name, owner=owner, acquired_at=now, expires_at=expires))
            return None
        except IntegrityError:
            with self.session() as s:
                return s.scalar(select(Lock.owner).where(Lock.name == name)) or "unknown"

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
        with self.session() as s:
            s.execute(delete(Lock).where(Lock.name == name, Lock.owner == owner))

    def lock_holder(self, name: str, now: datetime) -> str | None:
        with self.session() as s:
            row = s.get(Lock, name)
            if row is None or row.expires_at < now or _holder_is_dead(row.owner):
                return None
            return row.owner
