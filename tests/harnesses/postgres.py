"""The ``postgres`` provider over a real PostgreSQL cluster, as a protocol harness.

Each harness has its own admin role (CREATEROLE, not a superuser, as in production) and seeds
each credential with fresh roles, so tests running in parallel never share a role. Passwords
are set as SCRAM verifiers computed by libpq (``PQencryptPasswordConn``), independently of the
provider's own SCRAM code, so the server log never holds a plaintext here either.

The harness judges a key by logging in with it. It cannot read back a password the provider
set, so it remembers every value it is shown (the seeded legacy key, and whatever tests pass to
``key_accepted`` or ``observe``) and hands them to the end-of-session leak scan.
"""

from __future__ import annotations

import re
import secrets
import threading
import uuid
from typing import TYPE_CHECKING, Any, Literal

from rotator.interfaces import Secret
from rotator.testing.postgres import PostgresCluster
from tests.harnesses.base import ProviderHarness, SeededCredential
from tests.support import remember_issued

if TYPE_CHECKING:
    import psycopg

    from providers.postgres.provider import PostgresProvider

__all__ = ["PostgresHarness", "libpq_verifier"]

PASSWORD_FIELD = "PGPASSWORD"
USERNAME_FIELD = "PGUSER"
_LIVE = re.compile(r"^rotator:(\S+?)(?: seq=\d+)?$")
_ANY = re.compile(r"^rotator(?:-revoked)?:\S+")


def libpq_verifier(conn: psycopg.Connection[Any], user: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of ``password``, computed client-side by libpq."""
    return conn.pgconn.encrypt_password(password.encode(), user.encode(),
                                        b"scram-sha-256").decode()


def marker_rid(comment: str | None) -> str | None:
    """The rotation a role's comment says its password comes from (None: none, or revoked)."""
    for line in reversed((comment or "").splitlines()):
        if _ANY.match(line):
            found = _LIVE.match(line)
            return found.group(1) if found else None
    return None


class PostgresHarness(ProviderHarness):
    """``postgres-single`` (in place: the new password kills the old at once) or
    ``postgres-alternating`` (two roles; no outage)."""

    def __init__(self, cluster: PostgresCluster,
                 strategy: Literal["single", "alternating"]) -> None:
        self.cluster = cluster
        self.strategy = strategy
        self.id = f"postgres-{strategy}"
        self.in_place = strategy == "single"
        self.uid = uuid.uuid4().hex[:8]
        self.admin_user = f"rotator_admin_{self.uid}"
        self.admin_password = secrets.token_urlsafe(24)
        self.env_var = f"ROTATOR_TEST_PG_ADMIN_PASSWORD_{self.uid.upper()}"
        self._known: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        remember_issued([self.admin_password])
        with cluster.connect_admin() as conn:
            self._create_role(conn, self.admin_user, self.admin_password,
                              "LOGIN CREATEROLE NOSUPERUSER")

    # -- what the policy file and the daemon need ----------------------------------------------

    def provider_table(self) -> dict[str, Any]:
        return {"type": "postgres", "host": self.cluster.host, "port": self.cluster.port,
                "dbname": "postgres", "admin_user": self.admin_user,
                "admin_password": {"env": self.env_var}, "sslmode": "disable",
                "connect_timeout": 5}

    def env(self) -> dict[str, str]:
        return {self.env_var: self.admin_password}

    def bad_params(self) -> tuple[dict[str, Any], str] | None:
        return {"strategy": self.strategy, "rolez": "app"}, "rolez"

    def provider(self, name: str = "postgres-test") -> PostgresProvider:
        """The provider under test, configured like ``provider_table`` (for in-process tests)."""
        from providers.postgres.provider import PostgresProvider, PostgresSettings

        table = {k: v for k, v in self.provider_table().items() if k != "type"}
        admin = Secret(self.admin_password)
        return PostgresProvider(name, PostgresSettings.model_validate(table), lambda ref: admin)

    # -- credentials ---------------------------------------------------------------------------

    def seed(self, index: int) -> SeededCredential:
        """Fresh roles for credential ``index``; the first holds a legacy password (the seeded
        key). ``alternating``'s second role exists with no password, as an operator would
        create it."""
        tag = f"{self.uid}_{index}_{secrets.token_hex(3)}"
        legacy = secrets.token_urlsafe(24)
        self.observe(tag, legacy)
        with self.cluster.connect_admin() as conn:
            if self.strategy == "single":
                role = f"app_{tag}"
                self._create_role(conn, role, legacy, "LOGIN")
                params: dict[str, Any] = {"strategy": "single", "role": role}
                roles, companions = [role], {}
            else:
                role, other = f"app_{tag}_a", f"app_{tag}_b"
                self._create_role(conn, role, legacy, "LOGIN")
                self._create_role(conn, other, None, "LOGIN")
                params = {"strategy": "alternating", "roles": [role, other],
                          "username_field": USERNAME_FIELD}
                roles, companions = [role, other], {USERNAME_FIELD: role}
        return SeededCredential(params=params, field=PASSWORD_FIELD, value=legacy,
                                key_id=f"{role}@adopted", companions=companions,
                                extra={"tag": tag, "roles": roles})

    def observe(self, tag_or_cred: str | SeededCredential, value: str) -> None:
        """Remember a password of this credential (for ``live_key_ids`` and the leak scan)."""
        tag = tag_or_cred if isinstance(tag_or_cred, str) else tag_or_cred.extra["tag"]
        with self._lock:
            self._known.setdefault(tag, set()).add(value)
        remember_issued([value])

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        """Log in with ``value`` as the role the vault names (``PGUSER``), or as any of the
        credential's roles when the vault names none."""
        self.observe(cred, value)
        role = companions.get(USERNAME_FIELD)
        roles = [role] if role else cred.extra["roles"]
        return any(self.login_ok(r, value) for r in roles)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        """``<role>@<rotation>`` for each role a password still logs into: one the harness
        knows (named by the role's marker, ``adopted`` without one), or, for a password set by
        rotator that no test showed the harness, a role whose marker is live and which has a
        password at all (read from pg_authid as the superuser)."""
        roles = cred.extra["roles"]
        with self._lock:
            known = sorted(self._known.get(cred.extra["tag"], ()))
        with self.cluster.connect_admin() as conn:
            rows = conn.execute(
                "SELECT rolname, shobj_description(oid, 'pg_authid'), rolpassword IS NOT NULL "
                "FROM pg_authid WHERE rolname = ANY(%s)", (roles,)).fetchall()
        live = set()
        for role, comment, has_password in rows:
            rid = marker_rid(comment)
            if any(self.login_ok(role, value) for value in known):
                live.add(f"{role}@{rid or 'adopted'}")
            elif rid is not None and has_password:
                live.add(f"{role}@{rid}")
        return live

    # -- helpers -------------------------------------------------------------------------------

    def login_ok(self, role: str, password: str) -> bool:
        """Whether ``role`` can log in with ``password`` right now (asked directly)."""
        import psycopg

        try:
            with psycopg.connect(self.cluster.dsn_for(role, password), connect_timeout=5) as c:
                c.execute("SELECT 1")
            return True
        except psycopg.OperationalError as exc:
            if "password authentication failed" in str(exc):
                return False
            # Not chained: psycopg's failed connection object shows the password in its repr.
            raise AssertionError(f"cannot ask PostgreSQL about role {role}: {exc}") from None

    @staticmethod
    def _create_role(conn: psycopg.Connection[Any], role: str, password: str | None,
                     options: str) -> None:
        from psycopg import sql

        if password is None:
            conn.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(role)))
        else:
            conn.execute(sql.SQL("CREATE ROLE {} " + options + " PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(libpq_verifier(conn, role, password))))
