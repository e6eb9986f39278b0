"""Open a state database and check or bring its schema to the release's alembic head.

Upgrade policy: SQLite (one daemon, zero set-up) upgrades itself when opened; PostgreSQL (shared
by replicas) is only ever upgraded by ``rotator db upgrade``, run once, so no replica alters a
schema other replicas are using. Either way a database at another revision than this release's
head is refused with what to run, and one written by a newer release is never touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from rotator.errors import PermanentError
from rotator.state.urls import backend, safe_url, scrub_url_password

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["HEAD", "SchemaStatus", "create_at_head", "make_engine", "open_schema", "reaching",
           "require_head", "status", "upgrade"]

log = logging.getLogger("rotator.state")

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "0006"
"""The newest migration of this release; a test checks it against the migrations folder. Known
here so that opening an up-to-date database does not import alembic (a tenth of a second)."""
_UPGRADE_LOCK = 0x726F7461746F72
"""PostgreSQL advisory lock key ("rotator") serialising concurrent ``rotator db upgrade``."""
READ_ONLY = "rotator_read_only"
"""Execution option marking a connection that only reads (SQLite then begins a deferred
transaction instead of taking the write lock)."""
PG_CONNECT_TIMEOUT = 10
"""Seconds libpq waits for a connection (its default is forever) unless the URL says."""


class SchemaStatus(NamedTuple):
    revision: str | None
    head: str
    state: Literal["current", "behind", "empty", "newer"]
    """``current`` at head; ``behind`` an older revision of this release's history; ``empty``
    no rotator tables; ``newer`` a revision this release does not know (a newer rotator's)."""


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


def _revision_in(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return _revision_in(conn)


def _classify(revision: str | None) -> SchemaStatus:
    if revision == HEAD:
        return SchemaStatus(revision, HEAD, "current")
    if revision is None:
        return SchemaStatus(None, HEAD, "empty")
    state = "behind" if revision in _known_revisions() else "newer"
    return SchemaStatus(revision, HEAD, state)  # type: ignore[arg-type]


def status(engine: Engine) -> SchemaStatus:
    """Where the database's schema stands against this release (one query when current)."""
    return _classify(current_revision(engine))


def _newer_message(revision: str, where: str) -> str:
    return (f"the state database {where} is at schema revision {revision!r}, which this "
            f"rotator release does not know (it knows up to {HEAD!r}): it was written by a "
            "newer rotator; upgrade rotator instead of pointing an old one at it")


def require_head(engine: Engine, url: str) -> None:
    """Raise ``PermanentError`` saying what to run unless the schema is exactly at head."""
    found = status(engine)
    where = safe_url(url)
    if found.state == "newer":
        raise PermanentError(_newer_message(str(found.revision), where))
    if found.state == "empty":
        raise PermanentError(
            f"the state database {where} has no rotator schema yet: run `rotator db upgrade` "
            "once (from one machine or job) to create it, then start rotator")
    if found.state == "behind":
        raise PermanentError(
            f"the state database {where} is at schema revision {found.revision!r} and this "
            f"rotator needs {HEAD!r}: run `rotator db upgrade` once (it keeps every row; stop "
            "older replicas first), then start rotator")


def upgrade(engine: Engine, url: str | None = None) -> tuple[str | None, str]:
    """Apply every migration up to head; returns (revision before, revision after).

    The check and the migration share one transaction holding the database's write lock
    (SQLite's BEGIN IMMEDIATE; on PostgreSQL an advisory lock, with transactional DDL), so two
    processes upgrading at once never both migrate, and a failed migration leaves nothing
    half done. A database from a newer release is refused, never touched.
    """
    require_utf8(engine, url or str(engine.url))
    if current_revision(engine) == HEAD:
        return HEAD, HEAD
    if engine.dialect.name == "sqlite" and create_at_head(engine):
        return None, HEAD
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == HEAD:
            return HEAD, HEAD
        if current is not None and current not in _known_revisions():
            raise PermanentError(_newer_message(current, safe_url(url or str(engine.url))))
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return current, HEAD


_ALEMBIC_VERSION = ("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))")


def create_at_head(engine: Engine) -> bool:
    """A brand-new SQLite store gets the head schema directly: the tables of
    ``rotator.state.models`` (which the migrations create exactly, a test checks), the audit
    chain's head row and alembic's version stamp, all in one transaction under the write lock.
    Running the six migrations through alembic took a tenth of a second, on the first command
    a user runs. False, and nothing done, when the database already has a table (another
    process created it first, or it predates this release): alembic takes it from there."""
    from rotator.state.models import Base

    with engine.begin() as conn:  # BEGIN IMMEDIATE: one creator at a time
        if conn.execute(text("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
                        ).scalar():
            return False
        Base.metadata.create_all(conn)
        conn.execute(text("INSERT INTO audit_head (one, id, hash, prev_hash) "
                          "VALUES (1, 0, '', '')"))
        conn.execute(text(_ALEMBIC_VERSION))
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"),
                     {"head": HEAD})
    return True


def require_utf8(engine: Engine, url: str) -> None:
    """PostgreSQL must store text as UTF-8: audit events are hashed by the server from it."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        encoding = conn.execute(text("SHOW server_encoding")).scalar()
    if str(encoding).upper() not in ("UTF8", "UTF-8"):
        raise PermanentError(
            f"the state database {safe_url(url)} uses encoding {encoding}; rotator needs UTF8: "
            "create it with CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0")


def open_schema(engine: Engine, url: str, migrate: bool | None) -> None:
    """Apply the upgrade policy: ``migrate`` True upgrades, False checks, None lets the backend
    decide (SQLite upgrades itself, PostgreSQL is only checked)."""
    require_utf8(engine, url)
    if migrate is None:
        migrate = backend(url) == "sqlite"
    if not migrate:
        require_head(engine, url)
        return
    before, after = upgrade(engine, url)
    if before != after:
        log.info("state store %s: schema upgraded from %s to %s", safe_url(url),
                 before or "nothing", after)


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """Turn a failure to reach or write the database into one ``PermanentError`` line that
    names the store (password hidden) and what to check."""
    try:
        yield
    except (OSError, SQLAlchemyError, ImportError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc).split("\n")[0]
        raise PermanentError(
            f"cannot open the state store {safe_url(url)}: "
            f"{scrub_url_password(str(reason), url)}; check `state_url` in [rotator], that the "
            "database is reachable and that the directory or database is writable by "
            "rotator") from exc


class NoStateStore(PermanentError):
    """A command that only reads found no SQLite state store file: nothing has run yet."""


def _prepare_sqlite_file(url: str, create: bool) -> None:
    """Create the SQLite file owner-only (0600) before SQLite creates it world-readable; or,
    for commands that only read, refuse a file that does not exist (a wrong ``state_url``
    must not quietly become a new, empty state store)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        return
    if not create:
        raise NoStateStore(
            f"no state store at {path}: nothing has run with this policy file yet (start "
            "`rotator run` or use `rotator rotate-now`), or `state_url` points elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def make_engine(url: str, *, create: bool = True, pool_size: int | None = None) -> Engine:
    """An engine tuned for the backend: SQLite gets WAL, a busy timeout and write-locking BEGIN;
    PostgreSQL a connect timeout, an application name and a pool sized for the workers."""
    if backend(url) == "sqlite":
        _prepare_sqlite_file(url, create)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # let us issue BEGIN IMMEDIATE ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
            # Writers take the write lock up front: two processes upgrading read locks to write
            # locks at once is how SQLite deadlocks ("database is locked") under concurrency.
            # Readers (marked READ_ONLY) never upgrade, and in WAL mode need no lock at all.
            read_only = conn.get_execution_options().get(READ_ONLY)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    options: dict[str, object] = {"pool_pre_ping": True}
    if backend(url) == "postgresql":
        query = make_url(url).query
        connect_args: dict[str, object] = {}
        if "connect_timeout" not in query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
        if "application_name" not in query:
            connect_args["application_name"] = "rotator"
        options["connect_args"] = connect_args
        if pool_size is not None:
            options.update(pool_size=pool_size, max_overflow=4)
    return create_engine(url, **options)
