"""Open a state database and bring its schema to the release's alembic head.

A database whose revision this release does not know (written by a newer rotator) is refused,
never touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

from rotator.errors import PermanentError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
HEAD = "0002"
"""The newest migration of this release; a test checks it against the migrations folder. Known
here so that opening an up-to-date database does not import alembic (a tenth of a second)."""


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


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine) -> None:
    """Apply every migration up to head; refuse a database from a newer release.

    The check and the migration share one transaction that holds the database's write lock
    (SQLite's BEGIN IMMEDIATE), so two processes starting at once on a new file do not both
    try to create the tables.
    """
    if current_revision(engine) == HEAD:
        return
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    head = head_revision()
    with engine.begin() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        known = {rev.revision for rev in script.walk_revisions()}
        if current is not None and current not in known:
            raise PermanentError(
                f"the state database is at schema revision {current!r}, which this rotator "
                f"release does not know (head is {head!r}): it was written by a newer "
                "rotator; upgrade rotator instead of pointing an old one at it")
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


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
        raise PermanentError(
            f"no state store at {path}: nothing has run with this policy file yet (start "
            "`rotator run` or use `rotator rotate-now`), or `state_url` points elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def make_engine(url: str, *, create: bool = True) -> Engine:
    """An engine tuned for the backend: SQLite gets WAL, a busy timeout and write-locking BEGIN."""
    if url.startswith("sqlite"):
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
            # Take the write lock up front: two processes upgrading read locks to write locks
            # at once is how SQLite deadlocks ("database is locked") under concurrency.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)
