"""The statements every rotation makes, sent straight to the database driver.

A rotation writes about fifteen short transactions (a step's end and the next one's start, the
fence's lease checks, the audit chain). Through SQLAlchemy's expression layer each statement
cost 100 to 500 microseconds of Python (building the statement, its cache key, parameter and
result processing) against 3 for the driver's own ``cursor.execute``, and on one core that was
most of what limited a fleet-wide ``rotate-now``. These few statements are therefore written
once as SQL both SQLite and PostgreSQL accept, and run on the cursor of the connection (and
inside the transaction) SQLAlchemy already holds: transactions, pooling, locking and every
other statement stay as they were.

Parameters are written ``:name``; for psycopg they become ``%(name)s``. Times are bound the
way ``rotator.state.models.UTCDateTime`` binds them (naive UTC; on SQLite the exact text
SQLAlchemy stores, since SQLite compares times as text) and read back aware.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Connection, Table

__all__ = ["DriverSQL", "from_db_time", "quoted_columns"]

T = TypeVar("T")

_PARAM = re.compile(r"(?<!:):([A-Za-z_][A-Za-z0-9_]*)")


@lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


def _sqlite_time(value: datetime) -> str:
    v = value.astimezone(UTC)
    return (f"{v.year:04d}-{v.month:02d}-{v.day:02d} {v.hour:02d}:{v.minute:02d}:"
            f"{v.second:02d}.{v.microsecond:06d}")


def from_db_time(value: Any) -> datetime | None:
    """A time column as read by the driver (SQLite text, PostgreSQL naive) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def quoted_columns(table: Table, names: Iterable[str]) -> list[str]:
    """``names`` checked against ``table``'s columns and quoted (``trigger`` is a keyword)."""
    known = table.c
    out = []
    for name in names:
        if name not in known:
            raise ValueError(f"table {table.name} has no column {name!r}")
        out.append(f'"{name}"')
    return out


class DriverSQL:
    """Runs SQL on the DBAPI cursor of a SQLAlchemy connection, for one dialect."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

    def bind(self, value: Any) -> Any:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError("naive datetime given to the state store; use aware UTC")
            if self.sqlite:
                return _sqlite_time(value)
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def run(self, conn: Connection, sql: str, params: Mapping[str, Any] | None,
            fetch: Callable[[Any], T], *, many: Sequence[Mapping[str, Any]] = ()) -> T:
        """Execute ``sql`` and return ``fetch(cursor)``. A driver error is raised the way
        SQLAlchemy raises it (``sqlalchemy.exc.OperationalError`` and so on, wrapping the
        driver's), and a connection the database dropped is invalidated, so the pool never
        hands it out again: a restart or failover of the store is survived as before."""
        dbapi_connection = conn.connection.dbapi_connection
        bound: Any = [{k: self.bind(v) for k, v in row.items()} for row in many] if many \
            else {k: self.bind(v) for k, v in (params or {}).items()}
        statement = sql if self.sqlite else _pyformat(sql)
        try:
            cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                if many:
                    cursor.executemany(statement, bound)
                else:
                    cursor.execute(statement, bound)
                return fetch(cursor)
            finally:
                cursor.close()
        except conn.dialect.loaded_dbapi.Error as exc:
            from sqlalchemy.exc import DBAPIError

            dropped = conn.dialect.is_disconnect(exc, dbapi_connection, None)
            if dropped:
                conn.invalidate(exc)
            raise DBAPIError.instance(sql, bound, exc, conn.dialect.loaded_dbapi.Error,
                                      connection_invalidated=dropped,
                                      dialect=conn.dialect) from exc

    def rows(self, conn: Connection, sql: str,
             params: Mapping[str, Any] | None = None) -> list[Sequence[Any]]:
        return self.run(conn, sql, params, lambda cursor: list(cursor.fetchall()))

    def one(self, conn: Connection, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.run(conn, sql, params, lambda cursor: cursor.fetchone())
        return None if row is None else row[0]

    def write(self, conn: Connection, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """Execute a statement that returns no rows; the number of rows it changed."""
        return self.run(conn, sql, params, lambda cursor: int(cursor.rowcount))

    def write_many(self, conn: Connection, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute one statement for each of ``rows`` (the driver prepares it once)."""
        if rows:
            self.run(conn, sql, None, lambda cursor: None, many=rows)
