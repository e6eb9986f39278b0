"""Connections to one PostgreSQL server for the postgres provider, with psycopg's errors
translated into :mod:`rotator.errors` at this boundary.

Admin connections (``admin_user``) come from a small pool; a login as a rotated role is a
connection of its own, closed at once (the login is the check). The admin password is resolved
on first use and again after the server refuses it, since it may itself have been rotated.
psycopg is imported when a connection is first made.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from providers.postgres.settings import PostgresSettings
from rotator import redaction
from rotator.errors import CredentialRejected, PermanentError, RotatorError, TransientError
from rotator.interfaces import Secret, SecretResolver
from rotator.plugin_support import shorten

if TYPE_CHECKING:
    import psycopg

__all__ = ["Connections"]

_MAX_POOLED = 16
_STATEMENT_TIMEOUT = "30s"
# libpq's text for failures the server or the network may get over by itself.
_TRANSIENT_CONNECT = (
    "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "the database system is not yet accepting",
    "too many clients", "too many connections", "remaining connection slots are reserved",
    "connection slots are reserved", "server closed the connection unexpectedly",
    "could not receive data", "could not send data", "timeout expired",
    "terminating connection", "the database system is not accepting connections",
)

# libpq's text for TLS set-up failures: waiting will not fix them.
_PERMANENT_CONNECT = (
    "server does not support ssl", "certificate verify failed", "root certificate file",
    "ssl error: certificate", "does not match host name", "sslmode value",
)


class Connections:
    """The admin pool and role logins of one ``[providers.NAME]``. Thread-safe: the pool and
    the cached admin password are guarded by a lock."""

    def __init__(self, name: str, settings: PostgresSettings,
                 resolve_secret: SecretResolver) -> None:
        self.name = name
        self.config = settings
        self.resolve_secret = resolve_secret
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._admin_password: Secret | None = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}/{self.config.dbname}"

    def _connect(self, user: str, password: Secret, *, admin: bool,
                 action: str) -> psycopg.Connection[Any]:
        import psycopg

        try:
            return psycopg.connect(
                host=self.config.host, port=self.config.port, dbname=self.config.dbname,
                user=user, password=password.reveal(), sslmode=self.config.sslmode,
                connect_timeout=self.config.connect_timeout, autocommit=True,
                application_name="rotator")
        except psycopg.Error as exc:
            raise self._connect_error(exc, user, admin=admin, action=action) from _scrubbed(exc)

    def _admin_secret(self) -> Secret:
        with self._lock:
            if self._admin_password is None:
                self._admin_password = self.resolve_secret(self.config.admin_password)
            return self._admin_password

    @contextmanager
    def admin(self, action: str, *, role: str | None = None
              ) -> Iterator[psycopg.Connection[Any]]:
        """A pooled admin connection; errors inside are translated and the connection dropped."""
        import psycopg

        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = self._connect(self.config.admin_user, self._admin_secret(), admin=True,
                                 action=action)
            try:
                conn.execute(f"SET statement_timeout = '{_STATEMENT_TIMEOUT}'")
            except psycopg.Error as exc:
                conn.close()
                raise self._query_error(exc, action, role) from _scrubbed(exc)
        try:
            yield conn
        except psycopg.Error as exc:
            conn.close()
            raise self._query_error(exc, action, role) from _scrubbed(exc)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < _MAX_POOLED and not conn.closed:
                self._idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()

    @contextmanager
    def login(self, role: str, secret: Secret) -> Iterator[psycopg.Connection[Any]]:
        """A connection as ``role`` with ``secret``, closed afterwards. A refused login raises
        ``CredentialRejected``, an unreachable server ``TransientError``."""
        import psycopg

        conn = self._connect(role, secret, admin=False, action=f"logging in as role {role}")
        try:
            yield conn
        except psycopg.Error as exc:
            raise self._query_error(exc, f"using the key of role {role}", role) from _scrubbed(exc)
        finally:
            conn.close()

    # -- error translation ---------------------------------------------------------------------

    def _connect_error(self, exc: Exception, user: str, *, admin: bool,
                       action: str) -> RotatorError:
        """A failed login, translated. libpq reports it as text only (no SQLSTATE): a message
        with a server ``FATAL`` that is not about load or start-up means the server refused
        this login; one without means the server could not be reached (or TLS failed)."""
        import psycopg

        detail = _server_message(exc)
        lowered = detail.lower()
        prefix = f"{self.name}: {action} on {self.where()}"
        if any(t in lowered for t in _PERMANENT_CONNECT):
            return PermanentError(f"{prefix}: {detail}; check sslmode and the server's TLS "
                                  f"set-up for [providers.{self.name}]")
        if isinstance(exc, psycopg.errors.ConnectionTimeout) or any(
                t in lowered for t in _TRANSIENT_CONNECT) or "FATAL" not in detail:
            return TransientError(f"{prefix}: {detail}")
        if "does not exist" in lowered and "database" in lowered:
            return PermanentError(f"{prefix}: {detail}; check dbname in "
                                  f"[providers.{self.name}]")
        if admin:
            with self._lock:
                self._admin_password = None  # it may have been rotated: resolve it again
            return PermanentError(
                f"{prefix}: the server refused the admin login as {user} ({detail}); check "
                f"admin_user and admin_password ({self.config.admin_password}) in "
                f"[providers.{self.name}], and pg_hba.conf")
        return CredentialRejected(f"{prefix}: the server refused the key ({detail})")

    def _query_error(self, exc: Exception, action: str, role: str | None) -> RotatorError:
        import psycopg
        from psycopg import errors as e

        state = getattr(exc, "sqlstate", None) or "no SQLSTATE"
        detail = f"{_server_message(exc)} [{state}]"
        prefix = f"{self.name}: {action}"
        if isinstance(exc, e.InsufficientPrivilege):
            return PermanentError(
                f"{prefix}: admin_user {self.config.admin_user!r} may not change role "
                f"{role or '?'} ({detail}); it needs CREATEROLE (on PostgreSQL 16 and later "
                "also ADMIN OPTION on the role), and superuser roles can only be changed by a "
                "superuser")
        if isinstance(exc, e.UndefinedObject):
            return PermanentError(f"{prefix}: {detail}; check the roles in the credential's "
                                  "params")
        if isinstance(exc, (e.SerializationFailure, e.DeadlockDetected, e.LockNotAvailable,
                            e.QueryCanceled, e.AdminShutdown, e.CannotConnectNow,
                            psycopg.OperationalError)):
            return TransientError(f"{prefix}: {detail}")
        return PermanentError(f"{prefix}: {detail}")


def _server_message(exc: BaseException) -> str:
    """The server's (or libpq's) message, without libpq's "connection to server at ...
    failed:" preamble, scrubbed and cut short. libpq never echoes a password, but the statement
    of a syntax error may be quoted, so the text goes through the redaction filter anyway."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(exc)
    text = re.sub(r"^connection failed: ", "", text)
    text = re.sub(r"connection to server at \"[^\"]*\"(?: \([^)]*\))?, port \d+ failed: ", "",
                  text)
    text = shorten(" ".join(redaction.scrub(text).split()))
    return text or type(exc).__name__


def _scrubbed(exc: Exception) -> Exception:
    """``exc`` without the failed connection psycopg attaches to it, whose ``repr`` shows the
    connection parameters, password included."""
    if hasattr(exc, "_pgconn"):
        exc._pgconn = None
    return exc
