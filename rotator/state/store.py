"""The state store: every fact the engine needs to resume after a crash, and nothing secret.

All writes are short transactions. Locks are leases in the ``locks`` table, taken with one
``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` (free or expired or already ours), which is atomic
on SQLite and PostgreSQL alike. Replicas pick due work with ``claim_due``: due credentials are
read ``FOR UPDATE SKIP LOCKED`` and their leases taken in the same transaction, so two replicas
never claim the same credential and never wait for each other. Moving to several replicas
changes the URL, not the engine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from rotator.errors import PermanentError, RotatorError
from rotator.protocol import PHASES, OldKeyRevocation
from rotator.state import schema
from rotator.state.audit_hash import hash_parts
from rotator.state.driver_sql import DriverSQL, from_db_time, quoted_columns
from rotator.state.models import (
    Anomaly,
    AuditEvent,
    AuditHead,
    CredentialState,
    KeyUsage,
    Lock,
    Revocation,
    Rotation,
    RotationEpoch,
    RotationStep,
    TokenRevocation,
    UsagePoll,
    UTCDateTime,
)
from rotator.state.urls import backend, safe_url, scrub_url_password

__all__ = ["COMMAND_TAG", "LockTaken", "StaleRotation", "StateStore", "describe_owner",
           "lock_owner_id"]


class DueFacts(NamedTuple):
    """A credential's row as the due gate reads it."""

    last_rotated_at: datetime | None
    first_seen_at: datetime | None
    next_due_at: datetime | None
    failures: int


class LockTaken(NamedTuple):
    """What ``StateStore.take_lock`` got: the lease's new epoch, or else who holds it."""

    epoch: int | None
    holder: str | None


class StaleRotation(RotatorError):
    """The rotation moved on without this worker (it lost its lease and another resumed it)."""

    def __init__(self, rotation_id: str, step: str) -> None:
        super().__init__(f"rotation {rotation_id} is no longer at step {step}: another worker "
                         "took it over")

M = TypeVar("M")

_NOT_RUN = frozenset(PHASES)
"""Rotation states that are not a step the engine runs (revocations record their own rows)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CREDENTIALS = CredentialState.__table__
_ROTATIONS = Rotation.__table__
_STEPS = RotationStep.__table__
_REVOCATIONS = Revocation.__table__
_LOCKS = Lock.__table__
_EPOCHS = RotationEpoch.__table__
_AUDIT = AuditEvent.__table__
_HEAD = AuditHead.__table__
_USAGE = KeyUsage.__table__
_POLLS = UsagePoll.__table__
_ANOMALIES = Anomaly.__table__
_TOKEN_REVOCATIONS = TokenRevocation.__table__


_DRIVERS = {name: DriverSQL(name) for name in ("sqlite", "postgresql")}


def _driver(conn: Connection) -> DriverSQL:
    """The driver-level SQL runner for ``conn``'s database (see rotator.state.driver_sql)."""
    return _DRIVERS[conn.dialect.name]


def _schedule_revocation(conn: Connection, rotation_id: str, credential: str,
                         revocation: OldKeyRevocation) -> None:
    """Add the pending revocation of an old key, once per (rotation, key)."""
    d = _driver(conn)
    exists = d.one(conn, "SELECT id FROM revocations WHERE rotation_id = :rid AND key_id = :key",
                   {"rid": rotation_id, "key": revocation.key_id})
    if exists is None:
        d.write(conn, "INSERT INTO revocations (rotation_id, credential, key_id, vault_version, "
                "not_before, status, attempts) VALUES (:rid, :cred, :key, :version, :not_before, "
                "'pending', 0)", {"rid": rotation_id, "cred": credential, "key": revocation.key_id,
                                  "version": revocation.vault_version,
                                  "not_before": revocation.not_before})


def _new_step(conn: Connection, rotation_id: str, step: str, now: datetime) -> int:
    return int(_driver(conn).one(
        conn, "INSERT INTO rotation_steps (rotation_id, step, status, started_at) "
        "VALUES (:rid, :step, 'started', :now) RETURNING id",
        {"rid": rotation_id, "step": step, "now": now}))


def _update_sql(table: Any, fields: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """``UPDATE table SET <fields> WHERE <where>`` and its parameters (``f_<column>``)."""
    columns = quoted_columns(table, fields)
    sets = ", ".join(f"{column} = :f_{name}" for column, name in zip(columns, fields,
                                                                        strict=True))
    return (f"UPDATE {table.name} SET {sets} WHERE {where}",
            {f"f_{name}": value for name, value in fields.items()})


def _aware(value: datetime | None) -> datetime | None:
    """A datetime read by a raw aggregate (no ``UTCDateTime`` on it) made aware UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _local_host() -> str:
    """This host's name plus its PID namespace: containers sharing a host name (host
    networking) have separate process tables, and one must never judge another's pid dead."""
    try:
        return f"{socket.gethostname()}~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def lock_owner_id(tag: str) -> str:
    """A lock owner id naming this host and process, so a dead local holder can be recognised."""
    return f"{_local_host()}:{os.getpid()}:{tag}"


COMMAND_TAG = "cmd-"
"""Starts the tag of a lock taken by a command (``rotate-now``), not by a daemon."""


def describe_owner(owner: str) -> str:
    """A lock owner id as an operator reads it: ``host pid N`` (the replica's host name, which
    is the pod's name on Kubernetes), or ``a command on host pid N`` (``rotate-now``)."""
    host, _, rest = owner.partition(":")
    pid, _, tag = rest.partition(":")
    who = f"{host.partition('~')[0]} pid {pid}" if pid.isdigit() else owner
    return f"a command on {who}" if tag.startswith(COMMAND_TAG) else who


def _holder_is_dead(owner: str) -> bool:
    """True only when the holder ran on this host and its process no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _local_host() or not pid_text.isdigit():
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


def _dialect_insert(conn: Connection) -> Any:
    """``insert`` with ``on_conflict_do_*`` for the backend (both speak ON CONFLICT)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def _take_lease(conn: Connection, name: str, owner: str, ttl: timedelta,
                now: datetime) -> int | None:
    """One atomic statement: create the lease, or take it over if it expired or is ours.
    Returns the acquisition's epoch (one more than the lease's last), or None if it is held."""
    epoch = _driver(conn).one(conn, _TAKE_LEASE, {"name": name, "owner": owner, "now": now,
                                                  "expires": now + ttl})
    return None if epoch is None else int(epoch)


_TAKE_LEASE = """
INSERT INTO locks (name, owner, acquired_at, expires_at, epoch)
VALUES (:name, :owner, :now, :expires, 1)
ON CONFLICT (name) DO UPDATE
   SET owner = excluded.owner, acquired_at = excluded.acquired_at,
       expires_at = excluded.expires_at, epoch = locks.epoch + 1
 WHERE locks.owner = :owner OR locks.expires_at < :now
RETURNING epoch"""


def _live_lease(now: datetime) -> Any:
    """EXISTS: someone holds an unexpired lease on the credential of the enclosing query."""
    return select(_LOCKS.c.name).where(_LOCKS.c.name == _CREDENTIALS.c.name,
                                       _LOCKS.c.expires_at >= now).exists()


def append_audit_in(conn: Connection, build: Callable[[int, str], dict[str, Any]]) -> int:
    """``StateStore.append_audit`` inside a write transaction the caller holds (so an event
    commits atomically with the state change it records). Call it last in the transaction:
    from here to the commit no other writer can append."""
    return append_audit_many_in(conn, [build])


def append_audit_many_in(conn: Connection,
                         builds: Sequence[Callable[[int, str], dict[str, Any]]]) -> int:
    """``append_audit_in`` for many events in the caller's transaction; returns the last id.
    On SQLite the chain is extended in Python and written with one prepared insert of every
    row and one head update (the proxy appends an event per call); on PostgreSQL each goes
    through the one-statement append."""
    if not builds:
        return 0
    if conn.dialect.name == "postgresql":
        return [_append_audit_pg(conn, build) for build in builds][-1]
    d = _driver(conn)
    head = d.rows(conn, "SELECT id, hash FROM audit_head WHERE one = 1")
    if not head:
        raise PermanentError(_NO_HEAD)
    rows = []
    last_id, last_hash = head[0]
    for build in builds:
        row = build(last_id + 1, last_hash)
        rows.append(row)
        last_id, last_hash = row["id"], row["hash"]
    d.write(conn, "UPDATE audit_head SET id = :id, hash = :hash, prev_hash = :prev_hash "
            "WHERE one = 1", {"id": last_id, "hash": last_hash,
                              "prev_hash": rows[-1]["prev_hash"]})
    d.write_many(conn, _AUDIT_INSERT, rows)
    return int(last_id)


_AUDIT_INSERT = (
    "INSERT INTO audit_events (id, at, kind, credential, rotation_id, actor, reason, detail, "
    "prev_hash, hash) VALUES (:id, :at, :kind, :credential, :rotation_id, :actor, :reason, "
    ":detail, :prev_hash, :hash)")


_NO_HEAD = ("the audit trail has no head row (table audit_head): the state store was altered "
            "by hand; run `rotator audit verify` and restore it from a backup")

_APPEND_PG = text("""
WITH head AS (
    UPDATE audit_head
       SET id = id + 1, prev_hash = hash,
           hash = encode(sha256(convert_to(hash || :before || (id + 1)::text || :after,
                                           'UTF8')), 'hex')
     WHERE one = 1
 RETURNING id, prev_hash, hash)
INSERT INTO audit_events (id, at, kind, credential, rotation_id, actor, reason, detail,
                          prev_hash, hash)
SELECT id, :at, :kind, :credential, :rotation_id, :actor, :reason, :detail, prev_hash, hash
  FROM head
RETURNING id
""").bindparams(bindparam("at", type_=UTCDateTime()))


def _append_audit_pg(conn: Connection, build: Callable[[int, str], dict[str, Any]]) -> int:
    """Number, chain and insert the event in ONE statement: the head row's lock (taken by the
    UPDATE, which PostgreSQL re-evaluates on the newest head if another replica moved it
    meanwhile) is then held for this statement and the commit only, not across round trips
    to Python. The hash is the one :func:`rotator.state.audit_hash.event_hash` computes, made by the
    server from the parts around the id."""
    row = build(0, "")
    before, after = hash_parts(row)
    event_id = conn.execute(_APPEND_PG, {
        "before": before, "after": after, "at": row["at"], "kind": row["kind"],
        "credential": row["credential"], "rotation_id": row["rotation_id"],
        "actor": row["actor"], "reason": row["reason"], "detail": row["detail"]}).scalar()
    if event_id is None:
        raise PermanentError(_NO_HEAD)
    return int(event_id)


class StateStore:
    """Typed operations on the state database; callers never see a Session."""

    def __init__(self, url: str, *, migrate: bool | None = None, create: bool = True,
                 pool_size: int | None = None) -> None:
        """Open the store and apply the schema policy (see :mod:`rotator.state.schema`):
        ``migrate`` None upgrades SQLite and only checks PostgreSQL, True upgrades, False
        checks. ``pool_size`` sizes a PostgreSQL connection pool for that many workers."""
        self.url = url
        where = safe_url(url)
        if backend(url) not in ("sqlite", "postgresql"):
            raise PermanentError(
                f"state_url {where}: rotator's state store runs on SQLite (one daemon) or "
                "PostgreSQL (several replicas): use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB")
        with schema.reaching(url):
            self.engine = schema.make_engine(url, create=create, pool_size=pool_size)
        try:
            with schema.reaching(url):
                schema.open_schema(self.engine, url, migrate)
        except BaseException:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads begin a plain (deferred) transaction on SQLite, not the writers' BEGIN
        # IMMEDIATE: in WAL mode they then run beside the one writer instead of waiting for it.
        self._reader = self.engine.execution_options(**{schema.READ_ONLY: True})
        self._read_sessions = sessionmaker(self._reader, expire_on_commit=False)
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
        with self._read_sessions() as session:
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
        names = [c[0] for c in credentials]
        if not names:
            return
        with self.session() as s:
            known = set(s.scalars(select(CredentialState.name)
                                  .where(CredentialState.name.in_(names))))
            new = [{"name": name, "agent": agent, "provider": provider, "first_seen_at": now,
                    "failures": 0} for name, agent, provider in credentials if name not in known]
            if new:
                # Another replica starting at the same moment may add the same rows.
                insert_new = _dialect_insert(s.connection())(_CREDENTIALS)
                s.execute(insert_new.on_conflict_do_nothing(index_elements=["name"]), new)
            # Row locks (PostgreSQL), in name order so two syncs cannot deadlock: a rotation
            # finishing on another replica must not have its new due time overwritten by one
            # computed from the last rotation time read before it committed.
            rows = {r.name: r for r in s.scalars(
                select(CredentialState).where(CredentialState.name.in_(names))
                .order_by(CredentialState.name).with_for_update())}
            for name, agent, provider in credentials:
                row = rows[name]
                if (row.agent, row.provider) != (agent, provider):
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

    def never_rotated(self) -> set[str]:
        """Credentials rotator has not given a key of its own yet (no ``current_key_id``):
        only these can still hold a key they were given before rotator (an imported one)."""
        with self._reader.connect() as conn:
            return {row[0] for row in _driver(conn).rows(
                conn, "SELECT name FROM credentials WHERE current_key_id IS NULL")}

    def due_facts(self) -> dict[str, DueFacts]:
        """What the due gate needs of every credential, cheaply (a scrape of ``/metrics`` asks
        for all of them): name -> last rotation, first seen, next due time, failures."""
        with self._reader.connect() as conn:
            rows = _driver(conn).rows(conn, "SELECT name, last_rotated_at, first_seen_at, "
                                      "next_due_at, failures FROM credentials")
        # Read by the driver, each distinct time parsed once: SQLAlchemy's result processing
        # was most of this read's 40 ms at 10,000 credentials, and a fleet synced at once
        # shares its first-seen time.
        times: dict[Any, datetime | None] = {}

        def when(value: Any) -> datetime | None:
            parsed = times.get(value)
            if parsed is None and value is not None:
                parsed = times[value] = from_db_time(value)
            return parsed

        return {name: DueFacts(when(last), when(first), when(nxt), failures or 0)
                for name, last, first, nxt, failures in rows}

    def update_credential(self, name: str, **fields: Any) -> None:
        with self._tx() as conn:
            conn.execute(update(_CREDENTIALS).where(_CREDENTIALS.c.name == name)
                         .values(**fields))

    def earliest_due(self, names: Sequence[str],
                     unleased_at: datetime | None = None) -> datetime | None:
        """The earliest next due time among ``names``; with ``unleased_at``, only among those
        no worker holds at that time (the ones a tick could still claim)."""
        q = select(func.min(_CREDENTIALS.c.next_due_at)).where(_CREDENTIALS.c.name.in_(names))
        if unleased_at is not None:
            q = q.where(~_live_lease(unleased_at))
        with self._reader.connect() as conn:
            return _aware(conn.scalar(q))

    def claim_due(self, now: datetime, names: Sequence[str], limit: int, owner: str,
                  ttl: timedelta) -> dict[str, int]:
        """Take the leases of up to ``limit`` due credentials among ``names`` that no one
        holds, most overdue first; returns their names, each with its lease's epoch.

        One transaction: the due rows are locked ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite
        has one writer at a time anyway) and their leases taken before it commits, so replicas
        claiming at the same instant get disjoint sets without waiting for each other.
        """
        if limit <= 0 or not names:
            return []
        c = _CREDENTIALS.c
        q = (select(c.name).where(c.next_due_at <= now, c.name.in_(names), ~_live_lease(now))
             .order_by(c.next_due_at).limit(limit)
             .with_for_update(skip_locked=True, of=_CREDENTIALS))
        with self._tx() as conn:
            due = list(conn.scalars(q))
            taken = {name: _take_lease(conn, name, owner, ttl, now) for name in due}
            return {name: epoch for name, epoch in taken.items() if epoch is not None}

    # -- rotations -----------------------------------------------------------------------------

    def rotation(self, rotation_id: str) -> Rotation | None:
        found = self._select(Rotation, "id = :rid", {"rid": rotation_id})
        return found[0] if found else None

    def update_rotation(self, rotation_id: str, **fields: Any) -> None:
        with self._tx() as conn:
            conn.execute(update(_ROTATIONS).where(_ROTATIONS.c.id == rotation_id)
                         .values(**fields))

    def finish_rotation(self, rotation_id: str, **fields: Any) -> bool:
        """Record the end of a rotation still running or in grace; False (nothing written)
        when it already ended: another worker finished it."""
        sql, params = _update_sql(_ROTATIONS, fields,
                                  "id = :rid AND status IN ('running', 'grace')")
        with self._tx() as conn:
            return bool(_driver(conn).write(conn, sql, {**params, "rid": rotation_id}))

    def unfinished_rotations(self, credential: str | None = None) -> list[Rotation]:
        """Rotations stopped before their grace step (crash, stop, or a failing clean-up)."""
        if credential is None:
            return self._select(Rotation, "status = 'running' ORDER BY started_at", {})
        return self._select(Rotation, "status = 'running' AND credential = :credential "
                            "ORDER BY started_at", {"credential": credential})

    def rotations_in_grace(self) -> list[Rotation]:
        """Rotations whose new key is live and whose old key awaits (or just got) revocation."""
        with self._reading() as s:
            return list(s.scalars(select(Rotation).where(Rotation.status == "grace")))

    def grace_without_pending(self) -> set[str]:
        """Credentials of rotations in grace with no revocation pending: every old key is
        revoked (just before a crash or a stop) and only the finish remains."""
        r, v = _ROTATIONS.c, _REVOCATIONS.c
        pending = select(v.id).where(v.rotation_id == r.id, v.status == "pending").exists()
        with self._reader.connect() as conn:
            return set(conn.scalars(select(r.credential).where(r.status == "grace", ~pending)))

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

    def start_rotation(self, rotation: Rotation, epoch: int) -> int:
        """Record a new rotation, driven under lease ``epoch``, and the start of its first
        step; returns that step's row id."""
        values = {c.name: getattr(rotation, c.name) for c in _ROTATIONS.columns}
        columns = ", ".join(quoted_columns(_ROTATIONS, values))
        marks = ", ".join(f":{name}" for name in values)
        with self._tx() as conn:
            d = _driver(conn)
            d.write(conn, f"INSERT INTO rotations ({columns}) VALUES ({marks})", values)
            d.write(conn, "INSERT INTO rotation_epochs (rotation_id, epoch) VALUES (:rid, :epoch)",
                    {"rid": rotation.id, "epoch": epoch})
            return _new_step(conn, rotation.id, rotation.step, rotation.started_at)

    def join_rotation(self, rotation_id: str, epoch: int) -> list[int]:
        """Record that the owner of lease ``epoch`` drives ``rotation_id`` from now on (before
        it calls any plugin for it); returns every epoch the rotation was driven under, in
        order. A rotation started before epochs existed gets epoch 0 first: its keys carry the
        bare rotation id."""
        with self._tx() as conn:
            known = set(conn.scalars(select(_EPOCHS.c.epoch).where(
                _EPOCHS.c.rotation_id == rotation_id)))
            if not known:
                conn.execute(insert(_EPOCHS).values(rotation_id=rotation_id, epoch=0))
                known.add(0)
            if epoch not in known:
                conn.execute(insert(_EPOCHS).values(rotation_id=rotation_id, epoch=epoch))
                known.add(epoch)
        return sorted(known)

    def rotation_epochs(self, rotation_id: str) -> list[int]:
        """The epochs ``rotation_id`` was driven under (see ``join_rotation``), in order."""
        with self._reader.connect() as conn:
            return sorted(row[0] for row in _driver(conn).rows(
                conn, "SELECT epoch FROM rotation_epochs WHERE rotation_id = :rid",
                {"rid": rotation_id}))

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
        also: Callable[[Connection], None] | None = None,
        credential: tuple[str, Mapping[str, Any]] | None = None,
        revocation: OldKeyRevocation | None = None, **rotation_fields: Any,
    ) -> int | None:
        """Close a step and, in the same transaction, record the rotation's new fields, the
        start of ``next_step`` (if it is a step that runs), the credential's new fields
        (``credential``: its name and fields) and an old key's revocation to schedule
        (idempotent: a re-run schedules it once). Returns the new step row id.

        Raises ``StaleRotation`` (and records nothing) if the rotation is no longer running at
        ``expect_step``: another worker took it over, so this one must stop touching it.
        """
        rotation_fields["step"] = next_step if next_step is not None else expect_step
        move, params = _update_sql(_ROTATIONS, rotation_fields,
                                   "id = :rid AND step = :expect AND status = 'running'")
        params.update(rid=rotation_id, expect=expect_step)
        with self._tx() as conn:
            d = _driver(conn)
            if not d.write(conn, move, params):
                raise StaleRotation(rotation_id, expect_step)
            d.write(conn, "UPDATE rotation_steps SET status = :status, finished_at = :now, "
                    "message = :message WHERE id = :row",
                    {"status": step_status, "now": now, "message": message, "row": step_row})
            new_row = None
            if next_step is not None and next_step not in _NOT_RUN:
                new_row = _new_step(conn, rotation_id, next_step, now)
            if credential is not None:
                name, fields = credential
                if revocation is not None:
                    _schedule_revocation(conn, rotation_id, name, revocation)
                if fields:
                    sql, values = _update_sql(_CREDENTIALS, fields, "name = :name")
                    d.write(conn, sql, {**values, "name": name})
            if also is not None:
                also(conn)  # the step's audit event, in the same commit; last (see append)
            return new_row

    def record_revocation(self, revocation_id: int, rotation_id: str, started: datetime,
                          now: datetime, *, ok: bool, message: str,
                          retry_at: datetime | None = None, handed_over: bool = False
                          ) -> None:
        """A revocation attempt's outcome and its step row, in one transaction.
        ``handed_over``: the key is shared and another credential's revocation will kill it."""
        values: dict[str, Any] = {}
        if ok:
            values.update(status="handed_over" if handed_over else "done", done_at=now,
                          last_error=None)
        else:
            values["last_error"] = message
            if retry_at is not None:
                values["not_before"] = retry_at
        sql, params = _update_sql(_REVOCATIONS, values, "id = :id")
        sql = sql.replace(" SET ", " SET attempts = attempts + 1, ", 1)
        with self._tx() as conn:
            d = _driver(conn)
            d.write(conn, sql, {**params, "id": revocation_id})
            d.write(conn, "INSERT INTO rotation_steps (rotation_id, step, status, started_at, "
                    "finished_at, message) VALUES (:rid, 'revoke', :status, :started, :now, "
                    ":message)", {"rid": rotation_id, "status": "succeeded" if ok else "failed",
                                  "started": started, "now": now, "message": message})

    def steps(self, rotation_id: str) -> list[RotationStep]:
        return self._select(RotationStep, "rotation_id = :rid ORDER BY id", {"rid": rotation_id})

    # -- revocations ---------------------------------------------------------------------------

    def revocations(self, rotation_id: str) -> list[Revocation]:
        return self._select(Revocation, "rotation_id = :rid ORDER BY id", {"rid": rotation_id})

    def pending_revocations(
        self, *, due_by: datetime | None = None, credential: str | None = None,
        key_id: str | None = None,
    ) -> list[Revocation]:
        where = ["status = 'pending'"]
        if due_by is not None:
            where.append("not_before <= :due_by")
        if credential is not None:
            where.append("credential = :credential")
        if key_id is not None:
            where.append("key_id = :key_id")
        params = {"due_by": due_by, "credential": credential, "key_id": key_id}
        return self._select(Revocation, " AND ".join(where) + " ORDER BY not_before",
                            {k: v for k, v in params.items() if v is not None})

    def _select(self, model: type[M], where: str, params: Mapping[str, Any]) -> list[M]:
        """Rows of ``model``'s table matching ``where`` (SQL, ORDER BY allowed), as detached
        instances, read by the driver (see rotator.state.driver_sql): the engine asks for
        revocations and unfinished rotations several times per rotation."""
        table = model.__table__  # type: ignore[attr-defined]
        names = [c.name for c in table.columns]
        times = {c.name for c in table.columns if isinstance(c.type, UTCDateTime)}
        columns = ", ".join(quoted_columns(table, names))
        with self._reader.connect() as conn:
            rows = _driver(conn).rows(conn, f"SELECT {columns} FROM {table.name} WHERE {where}",
                                      params)
        return [model(**{name: from_db_time(value) if name in times else value
                         for name, value in zip(names, row, strict=True)}) for row in rows]

    def expedite_revocations(self, credential: str, now: datetime) -> int:
        """Make every pending revocation of ``credential`` due now (emergency rotation)."""
        with self.session() as s:
            result = s.execute(update(Revocation).where(
                Revocation.credential == credential, Revocation.status == "pending",
                Revocation.not_before > now).values(not_before=now))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def count_pending_revocations(self) -> int:
        with self._reading() as s:
            return int(s.scalar(select(func.count()).select_from(Revocation).where(
                Revocation.status == "pending")) or 0)

    # -- locks ---------------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl: timedelta, now: datetime) -> str | None:
        """Take the lease ``name``; None on success, else the current holder's id."""
        return self.take_lock(name, owner, ttl, now).holder

    def take_lock(self, name: str, owner: str, ttl: timedelta, now: datetime) -> LockTaken:
        """Take the lease ``name``: its new epoch, or who holds it.

        A lease is free when it expired, or when its holder was a process on this host that no
        longer exists (so a restart after kill -9 resumes at once instead of waiting it out).
        """
        locks = _LOCKS
        with self._tx() as conn:
            epoch = _take_lease(conn, name, owner, ttl, now)
            if epoch is not None:
                return LockTaken(epoch, None)
            holder = conn.scalar(select(locks.c.owner).where(locks.c.name == name))
            if holder is not None and _holder_is_dead(holder):
                epoch = conn.execute(update(locks).where(
                    locks.c.name == name, locks.c.owner == holder).values(
                    owner=owner, acquired_at=now, expires_at=now + ttl,
                    epoch=locks.c.epoch + 1).returning(locks.c.epoch)).scalar()
                if epoch is not None:
                    return LockTaken(epoch, None)
            return LockTaken(None, holder or "unknown")

    def holds_lock(self, name: str, owner: str, epoch: int, now: datetime) -> bool:
        """Whether ``owner`` still holds the lease ``name`` acquired as ``epoch``, unexpired at
        ``now``, as the store sees it (the fence a plugin call is checked against)."""
        with self._reader.connect() as conn:
            return _driver(conn).one(
                conn, "SELECT 1 FROM locks WHERE name = :name AND owner = :owner AND "
                "epoch = :epoch AND expires_at >= :now",
                {"name": name, "owner": owner, "epoch": epoch, "now": now}) is not None

    def live_leases(self, now: datetime) -> set[str]:
        """Names whose lease someone holds at ``now`` (a dead local holder's counts as free)."""
        return set(self.lease_holders(now))

    def lease_holders(self, now: datetime) -> dict[str, str]:
        """Name -> owner id of every lease someone holds at ``now`` (see ``live_leases``)."""
        with self._reader.connect() as conn:
            rows = conn.execute(select(_LOCKS.c.name, _LOCKS.c.owner)
                                .where(_LOCKS.c.expires_at >= now)).all()
        return {name: owner for name, owner in rows if not _holder_is_dead(owner)}

    def renew_locks(self, names: Sequence[str], owner: str, ttl: timedelta,
                    now: datetime) -> set[str]:
        """Extend the leases ``owner`` still holds; returns the names it has lost.

        Only live leases are extended: one released (or expired) while this renewal was on its
        way stays released, instead of coming back to life and blocking every other worker
        for a whole ``ttl``.
        """
        if not names:
            return set()
        locks = _LOCKS
        with self._tx() as conn:
            renewed = conn.execute(
                update(locks).where(locks.c.name.in_(names), locks.c.owner == owner,
                                    locks.c.expires_at >= now)
                .values(expires_at=now + ttl).returning(locks.c.name))
            held = set(renewed.scalars())
        return set(names) - held

    def unlock(self, name: str, owner: str) -> None:
        """Release the lease; the row stays (expired) so the next lock is a single UPDATE."""
        with self._tx() as conn:
            _driver(conn).write(conn, "UPDATE locks SET expires_at = :epoch WHERE name = :name "
                                "AND owner = :owner",
                                {"epoch": _EPOCH, "name": name, "owner": owner})

    def lock_holder(self, name: str, now: datetime) -> str | None:
        with self.session() as s:
            row = s.get(Lock, name)
            if row is None or row.expires_at < now or _holder_is_dead(row.owner):
                return None
            return row.owner

    # -- health --------------------------------------------------------------------------------

    def schema_status(self) -> schema.SchemaStatus:
        """Where the schema stands against this release (a replica of another release may have
        run ``rotator db upgrade`` since this process opened the store)."""
        return schema.status(self.engine)

    def require_head(self) -> None:
        """Raise ``PermanentError`` saying what to run unless the schema is this release's."""
        schema.require_head(self.engine, self.url)

    def database_time(self) -> datetime | None:
        """The PostgreSQL server's clock (None on SQLite, which shares this host's), to check
        that replicas' clocks agree well enough for leases measured in them."""
        if self.engine.dialect.name != "postgresql":
            return None
        with self.engine.connect() as conn:
            return conn.scalar(text("SELECT clock_timestamp()"))

    @staticmethod
    def is_unreachable(exc: BaseException) -> bool:
        """Whether ``exc`` says the database could not be reached or dropped the connection (a
        restart, a failover, a network cut), as opposed to a bug: nothing to fix in rotator,
        the same work succeeds once it is back."""
        from sqlalchemy.exc import InterfaceError, OperationalError

        return isinstance(exc, OperationalError | InterfaceError)

    def describe_error(self, exc: BaseException) -> str:
        """A one-line description of a database error, safe to log or serve."""
        first = str(exc).split("\n")[0] if str(exc) else type(exc).__name__
        return scrub_url_password(first, self.url)[:300]

    # -- usage monitoring ----------------------------------------------------------------------

    def save_usage(self, provider: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write usage buckets (``key_id, credential, start, width, requests, tokens, cost``)
        of ``provider``, replacing the figures of buckets already held: a provider's count for
        a recent bucket grows until the bucket is over."""
        self._upsert_usage(provider, rows, lambda new: {
            "requests": new.requests, "tokens": new.tokens, "cost": new.cost})

    def add_usage(self, provider: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Add counts (``key_id, credential, start, width, requests``) to usage buckets of
        ``provider``: the credential proxy's replicas each add the calls they forwarded."""
        self._upsert_usage(
            provider, [{"tokens": None, "cost": None, **row} for row in rows],
            lambda new: {"requests": func.coalesce(_USAGE.c.requests, 0) + new.requests})

    def _upsert_usage(self, provider: str, rows: Sequence[Mapping[str, Any]],
                      figures: Callable[[Any], dict[str, Any]]) -> None:
        """Insert buckets, or update a held one's ``figures(excluded)`` and credential."""
        if not rows:
            return
        table = _USAGE
        with self._tx() as conn:
            stmt = _dialect_insert(conn)(table)
            stmt = stmt.on_conflict_do_update(
                index_elements=[table.c.provider, table.c.key_id, table.c.width, table.c.start],
                set_={**figures(stmt.excluded), "credential": stmt.excluded.credential})
            conn.execute(stmt, [{"provider": provider, **row} for row in rows])

    def usage(self, *, credentials: Sequence[str] | None = None, since: datetime,
              width: int | None = None, key_ids: Sequence[str] | None = None,
              provider: str | None = None) -> list[KeyUsage]:
        """Buckets starting at ``since`` or later, oldest first: rows with the attributes of
        :class:`KeyUsage` (read through Core: a poll reads a week of buckets of every key)."""
        t = _USAGE
        q = select(t).where(t.c.start >= since)
        if credentials is not None:
            q = q.where(t.c.credential.in_(list(credentials)))
        if width is not None:
            q = q.where(t.c.width == width)
        if key_ids is not None:
            q = q.where(t.c.key_id.in_(list(key_ids)))
        if provider is not None:
            q = q.where(t.c.provider == provider)
        with self._reader.connect() as conn:
            return list(conn.execute(q.order_by(t.c.start)))  # type: ignore[arg-type]

    def prune_usage(self, before: datetime) -> int:
        """Drop buckets that start before ``before`` (the retention)."""
        with self._tx() as conn:
            result = conn.execute(_USAGE.delete().where(_USAGE.c.start < before))
            return int(result.rowcount or 0)

    def count_usage_rows(self) -> int:
        with self._reading() as s:
            return int(s.scalar(select(func.count()).select_from(KeyUsage)) or 0)

    def usage_poll(self, provider: str) -> UsagePoll | None:
        with self._reading() as s:
            return s.get(UsagePoll, provider)

    def set_usage_poll(self, provider: str, **fields: Any) -> None:
        """Create or update where ``provider``'s poll stands."""
        table = _POLLS
        values = {"next_poll_at": fields.get("next_poll_at"), "failures": 0, **fields}
        with self._tx() as conn:
            stmt = _dialect_insert(conn)(table).values(provider=provider, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.provider],
                                                    set_=fields))

    def record_anomaly(self, **fields: Any) -> int | None:
        """Insert an anomaly; its id, or None if this ``(credential, rule, subject)`` fired
        already (here or on another replica): the caller then takes no action."""
        table = _ANOMALIES
        with self._tx() as conn:
            stmt = _dialect_insert(conn)(table).values(**fields)
            stmt = stmt.on_conflict_do_nothing(
                index_elements=[table.c.credential, table.c.rule, table.c.subject])
            return conn.execute(stmt.returning(table.c.id)).scalar()

    def update_anomaly(self, anomaly_id: int, **fields: Any) -> None:
        with self._tx() as conn:
            conn.execute(update(_ANOMALIES).where(_ANOMALIES.c.id == anomaly_id)
                         .values(**fields))

    def anomalies(self, *, credential: str | None = None,
                  since: datetime | None = None) -> list[Anomaly]:
        with self._reading() as s:
            q = select(Anomaly)
            if credential is not None:
                q = q.where(Anomaly.credential == credential)
            if since is not None:
                q = q.where(Anomaly.detected_at >= since)
            return list(s.scalars(q.order_by(Anomaly.id)))

    def reschedule_revocation(self, revocation_id: int, not_before: datetime) -> None:
        """Move a pending revocation's due time (``revoke_when = "quiet"``: sooner)."""
        with self._tx() as conn:
            conn.execute(update(_REVOCATIONS).where(_REVOCATIONS.c.id == revocation_id,
                                                    _REVOCATIONS.c.status == "pending")
                         .values(not_before=not_before))

    # -- proxy tokens --------------------------------------------------------------------------

    def revoke_tokens(self, agent: str, at: datetime, reason: str | None = None) -> None:
        """Refuse every proxy token of ``agent`` issued at or before ``at``."""
        table = _TOKEN_REVOCATIONS
        with self._tx() as conn:
            stmt = _dialect_insert(conn)(table).values(agent=agent, revoked_at=at, reason=reason)
            conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.agent],
                                                    set_={"revoked_at": at, "reason": reason}))

    def token_revocations(self) -> dict[str, datetime]:
        """Agent -> the time before which its proxy tokens are refused."""
        with self._reader.connect() as conn:
            return {agent: at for agent, at in conn.execute(
                select(_TOKEN_REVOCATIONS.c.agent, _TOKEN_REVOCATIONS.c.revoked_at))}

    # -- audit trail ---------------------------------------------------------------------------

    def append_audit(self, build: Callable[[int, str], dict[str, Any]]) -> int:
        """Append one audit event in ONE write transaction and return its id.

        Inserts ``build(next_id, prev_hash)`` (the column values, ``id`` and ``prev_hash``
        included) after the chain's head and moves the head to it. SQLite's BEGIN IMMEDIATE,
        and on PostgreSQL the head row's lock, make this atomic across threads, processes and
        replicas, so two writers can never chain onto the same event. Ids are assigned here,
        consecutively, so a gap in ids always means a deleted event.
        """
        with self._tx() as conn:
            return append_audit_in(conn, build)

    def append_audit_many(self, builds: Sequence[Callable[[int, str], dict[str, Any]]]
                          ) -> None:
        """``append_audit`` for many events, in one write transaction."""
        with self._tx() as conn:
            append_audit_many_in(conn, builds)

    def audit_events(self, *, after_id: int = 0, since: datetime | None = None,
                     credential: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` audit events with ``id > after_id``, in id order, as column dicts."""
        q = select(_AUDIT).where(_AUDIT.c.id > after_id)
        if since is not None:
            q = q.where(_AUDIT.c.at >= since)
        if credential is not None:
            q = q.where(_AUDIT.c.credential == credential)
        with self._reader.connect() as conn:
            return [dict(row._mapping) for row in
                    conn.execute(q.order_by(_AUDIT.c.id).limit(limit))]
