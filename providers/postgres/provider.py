"""PostgreSQL role passwords, rotated with psycopg 3.

Two strategies, chosen per credential in ``[credentials.params]``:

- ``single``: one role, one password. A new password kills the old one, so the provider is
  *in place*: ``generate`` makes a password without touching the server, the engine stages it
  in the vault, and only then ``apply`` sets it. Rollback ``apply``s the old password again.
- ``alternating``: two roles with the same grants (``roles = ["app_a", "app_b"]``). A rotation
  sets a new password on the role agents are *not* using, so the old role keeps working through
  the grace period; the vault field ``username_field`` (default ``PGUSER``) is written with the
  password so agents log in as the right role. ``revoke`` then scrambles the old role.

The server never sees a plaintext password: the SCRAM-SHA-256 verifier (RFC 5802/7677) is
computed here and sent as ``ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$4096:...'``, which
PostgreSQL stores as is. A statement log, ``pg_stat_statements`` or a replica's WAL therefore
hold at most a verifier, from which the password cannot be recovered.

Which rotation's password a role holds is recorded in the role's comment, in the same
transaction as the password, as a line ``rotator:<rotation id> seq=<n>`` (text an operator put
in the comment is kept). Key ids are ``<role>@<rotation id>`` (``<role>@adopted`` for a password
rotator did not set). The marker is how ``find_by_rotation``, ``revoke`` and ``identify`` tell
a role's current password from an older one without ever reading a password, and ``seq`` (one
more than the highest of the credential's roles) orders rotations without trusting clocks.
``revoke`` replaces the marker with ``rotator-revoked:<rotation id>``.

Which role an ``alternating`` rotation writes: the role agents are not using. That is the role
without a live marker when exactly one has one (``revoke`` removed it, or rotator never wrote
it), the one with the lower ``seq`` when both have one (the other holds the newer password).
When neither has one, rotator has not run yet, and the engine has just called ``identify`` on
the vault's current password if the vault has one: ``identify`` then marks the role that
password logs into as ``rotator:adopted``, so it is kept. With no marker at all (no password in
the vault, or one that logs into neither role) no agent can be using either role through the
vault: rotator takes the role without a password if the admin can see that (a superuser), else
the second of ``roles``; list the role agents use today first.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from providers.postgres.connections import Connections
from providers.postgres.markers import (
    ADOPTED,
    Marker,
    RoleState,
    live_marker,
    next_seq,
    revoked_marker,
    split_key_id,
    with_marker,
)
from providers.postgres.scram import scram_sha256_verifier
from providers.postgres.settings import PostgresParams, PostgresSettings, params_of
from rotator.errors import CredentialRejected, PermanentError, UnsupportedOperation
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretResolver,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "PostgresParams",
    "PostgresProvider",
    "PostgresSettings",
    "generate_password",
    "scram_sha256_verifier",
]

log = logging.getLogger(__name__)

PASSWORD_LENGTH = 40
"""Letters and digits only (about 238 bits): safe in URLs, DSNs and shell variables unquoted."""
_ALPHABET = string.ascii_letters + string.digits


def generate_password() -> str:
    """A strong random password for a role (never logged, wrapped in :class:`Secret`)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))


# -- the provider -----------------------------------------------------------------------------


class PostgresProvider(Provider):
    """Rotates role passwords on one PostgreSQL server (``single`` or ``alternating``).

    ``capabilities.in_place`` is True for the whole type (capabilities belong to the provider
    class, not to a credential): the engine calls ``generate`` then ``apply`` for both
    strategies. For ``alternating`` that is just as safe, because ``generate`` picks the role
    agents are not using and ``apply`` never touches the other one, so the old password lives
    through the grace period until ``revoke``. ``create`` works for ``alternating`` too.

    Thread-safe: admin connections come from a small pool guarded by a lock; each ``verify``
    and ``identify`` logs in on a connection of its own (the login is the check).
    """

    type_name: ClassVar[str] = "postgres"
    settings_model: ClassVar[type[PluginSettings]] = PostgresSettings
    params_model: ClassVar[type[PluginSettings]] = PostgresParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True, in_place=True)

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._db = Connections(name, self.config, resolve_secret)

    @property
    def config(self) -> PostgresSettings:
        return cast(PostgresSettings, self.settings)

    # -- in place: generate and apply ----------------------------------------------------------

    def generate(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """A new random password for the role this rotation writes; nothing changes on the
        server (``alternating`` reads the roles' markers to pick the role)."""
        params = params_of(credential)
        if params.strategy == "single":
            role = self._rotated_role(params.all_roles[0])
        else:
            role = self._rotated_role(self._pick_free_role(credential, params))
        return NewKey(key_id=f"{role}@{rotation_id}", secret=Secret(generate_password()))

    def apply(self, credential: CredentialInfo, key: NewKey) -> None:
        """Make ``key`` the password of the role its id names, and mark the role with the key's
        rotation, in one transaction. Idempotent; also how rollback puts an old key back (its
        id names an older rotation, or ``adopted``)."""
        params = params_of(credential)
        role, rid = split_key_id(key.key_id)
        if role is None:
            role = self._role_of_bare_key(credential, params, key)
        if role not in params.all_roles:
            raise PermanentError(
                f"{self.name}: key {key.key_id} names role {role!r}, which is not one of "
                f"{credential.name}'s roles ({', '.join(params.all_roles)})")
        self._rotated_role(role)
        verifier = scram_sha256_verifier(key.secret.reveal())
        with self._db.admin(f"setting the password of role {role}", role=role) as conn, \
                conn.transaction():
            states = self._lock_and_read(conn, params.all_roles)
            if role not in states:
                raise PermanentError(
                    f"{self.name}: role {role!r} does not exist on {self._db.where()}; create it "
                    f"or fix params of {credential.name}")
            seq = next_seq(states.values()) if params.strategy == "alternating" else None
            self._set_password(conn, role, verifier,
                               with_marker(states[role].comment, live_marker(rid, seq)))
        log.info("%s: role %s now holds key %s", self.name, role, key.key_id)

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """``alternating`` only: ``generate`` then ``apply``. ``single`` refuses, because a
        password set before the vault holds it would be the only working key and exist only
        in this process's memory: the engine uses ``generate``/``apply`` for it."""
        params = params_of(credential)
        if params.strategy == "single":
            raise UnsupportedOperation(
                f"{self.name}: strategy \"single\" changes the role's only password in place; "
                "the engine calls generate() and apply() for it, never create()")
        key = self.generate(credential, rotation_id)
        self.apply(credential, key)
        return key

    # -- the rest of the contract --------------------------------------------------------------

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """Log in as the key's role with ``secret`` and run ``SELECT 1``.

        The role comes from ``key_id``; without one, ``single`` uses its role and
        ``alternating`` accepts a login as either role.
        """
        params = params_of(credential)
        role = split_key_id(key_id)[0] if key_id else None
        candidates = (role,) if role in params.all_roles else params.all_roles
        rejected: CredentialRejected | None = None
        for candidate in candidates:
            assert candidate is not None
            try:
                with self._db.login(candidate, secret) as conn:
                    conn.execute("SELECT 1")
                return
            except CredentialRejected as exc:
                rejected = exc
        assert rejected is not None
        raise rejected

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Give the key's role a random password nobody knows, if the role still holds that
        key (its marker names the key's rotation; ``adopted`` also matches a role rotator never
        marked). Otherwise a newer rotation has replaced it already: success."""
        params = params_of(credential)
        role, rid = split_key_id(key_id)
        if role is None or role not in params.all_roles:
            log.info("%s: key %s is not a key of %s's roles; nothing to revoke", self.name,
                     key_id, credential.name)
            return
        self._rotated_role(role)
        with self._db.admin(f"revoking key {key_id}", role=role) as conn:
            # Usually a newer key has replaced it already: one read, no lock, no transaction.
            if not self._holds(self._read_roles(conn, [role]).get(role), role, rid, key_id):
                return
            verifier = scram_sha256_verifier(generate_password())
            with conn.transaction():
                state = self._lock_and_read(conn, params.all_roles).get(role)
                if not self._holds(state, role, rid, key_id):
                    return
                assert state is not None
                self._set_password(conn, role, verifier,
                                   with_marker(state.comment, revoked_marker(rid)))
        log.info("%s: revoked key %s (role %s has a new random password)", self.name, key_id,
                 role)

    def _holds(self, state: RoleState | None, role: str, rid: str, key_id: str) -> bool:
        """Whether ``role`` still holds the key of rotation ``rid`` (see ``revoke``)."""
        if state is None:
            log.info("%s: role %s no longer exists; key %s is gone", self.name, role, key_id)
            return False
        marker = state.marker
        holds = (marker.rid == rid) if marker else (rid == ADOPTED and not state.revoked)
        if not holds:
            log.info("%s: role %s no longer holds key %s; nothing to revoke", self.name, role,
                     key_id)
        return holds

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """``<role>@<rotation_id>`` for each of the credential's roles marked with exactly that
        rotation (a revoked role's marker no longer counts)."""
        params = params_of(credential)
        with self._db.admin("reading the roles' markers") as conn:
            states = self._read_roles(conn, params.all_roles)
        return [f"{s.name}@{rotation_id}" for s in states.values()
                if s.marker is not None and s.marker.rid == rotation_id]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """Log in with ``secret`` and name the key by the role's marker: ``<role>@<rotation>``,
        or ``<role>@adopted`` for a password rotator did not set; None if it logs into none
        of the credential's roles, or into both (never guess).

        ``alternating``: the role comes from the ``username_field`` companion when the vault
        has it, else both are tried. An adopted role is marked ``rotator:adopted`` so that the
        next rotation writes the other role (see the module docstring).
        """
        params = params_of(credential)
        named = (companions or {}).get(params.username_field or "")
        candidates = (named,) if named in params.all_roles else params.all_roles
        found: list[tuple[str, Marker | None]] = []
        for role in candidates:
            assert role is not None
            try:
                with self._db.login(role, secret) as conn:
                    row = conn.execute(
                        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles "
                        "WHERE rolname = current_user").fetchone()
            except CredentialRejected:
                continue
            found.append((role, RoleState(role, row[0] if row else None).marker))
        if len(found) != 1:
            if found:
                log.warning("%s: the current key of %s logs into several roles; not guessing",
                            self.name, credential.name)
            return None
        role, marker = found[0]
        if marker is not None:
            return f"{role}@{marker.rid}"
        if params.strategy == "alternating":
            self._mark_adopted(credential, params, role)
        return f"{role}@{ADOPTED}"

    def companion_fields(self, credential: CredentialInfo) -> tuple[str, ...]:
        params = params_of(credential)
        return (params.username_field,) if params.username_field else ()

    def companions(self, credential: CredentialInfo, key_id: str) -> Mapping[str, str]:
        """``{username_field: role}`` for ``alternating``: agents log in as the key's role."""
        params = params_of(credential)
        if not params.username_field:
            return {}
        role = split_key_id(key_id)[0]
        if role not in params.all_roles:
            raise PermanentError(f"{self.name}: key {key_id} names no role of {credential.name}")
        assert role is not None
        return {params.username_field: role}

    def check_access(self) -> None:
        """Log in as the admin and confirm it may change passwords (CREATEROLE or superuser)."""
        with self._db.admin("checking the admin role") as conn:
            row = conn.execute("SELECT rolsuper, rolcreaterole FROM pg_roles "
                               "WHERE rolname = current_user").fetchone()
            version = conn.info.server_version
        if not row or not (row[0] or row[1]):
            raise PermanentError(
                f"{self.name}: admin_user {self.config.admin_user!r} can log in to "
                f"{self._db.where()} but may not change other roles' passwords: "
                f"ALTER ROLE {self.config.admin_user} CREATEROLE (or use a superuser)")
        if not row[0] and version >= 160000:
            log.info("%s: PostgreSQL %d: admin_user %s also needs ADMIN OPTION on each rotated "
                     "role (GRANT <role> TO %s WITH ADMIN OPTION)", self.name, version // 10000,
                     self.config.admin_user, self.config.admin_user)

    def warm_up(self) -> None:
        import psycopg  # noqa: F401

    def close(self) -> None:
        self._db.close()

    # -- choosing and marking roles ------------------------------------------------------------

    def _pick_free_role(self, credential: CredentialInfo, params: PostgresParams) -> str:
        """The role agents are not using (rules in the module docstring)."""
        roles = params.all_roles
        with self._db.admin("reading the roles' markers") as conn:
            states = self._read_roles(conn, roles)
            without = [] if any(s.marker for s in states.values()) else (
                self._without_password(conn, roles))
        missing = [r for r in roles if r not in states]
        if missing:
            raise PermanentError(
                f"{self.name}: role {missing[0]!r} of {credential.name} does not exist on "
                f"{self._db.where()}; create it with the same grants as the other role")
        marked = {r: states[r].marker for r in roles if states[r].marker is not None}
        if len(marked) == 1:
            return next(r for r in roles if r not in marked)
        if len(marked) == 2:
            return min(roles, key=lambda r: cast(Marker, marked[r]).seq)
        return without[0] if len(without) == 1 else roles[1]

    def _mark_adopted(self, credential: CredentialInfo, params: PostgresParams,
                      role: str) -> None:
        """Record that ``role`` holds the vault's current, adopted password (in use)."""
        with self._db.admin(f"marking role {role} as in use", role=role) as conn, \
                conn.transaction():
            states = self._lock_and_read(conn, params.all_roles)
            state = states.get(role)
            if state is None or state.marker is not None:
                return
            marker = live_marker(ADOPTED, next_seq(states.values()))
            conn.execute(self._comment_sql(role, with_marker(state.comment, marker)))
        log.info("%s: role %s holds the adopted key of %s; the next rotation writes the other",
                 self.name, role, credential.name)

    def _role_of_bare_key(self, credential: CredentialInfo, params: PostgresParams,
                          key: NewKey) -> str:
        """The role for a key id without one (the engine's ``adopted`` rollback): ``single``'s
        role; for ``alternating`` the role the password still logs into."""
        if params.strategy == "single":
            return params.all_roles[0]
        for role in params.all_roles:
            try:
                with self._db.login(role, key.secret):
                    return role
            except CredentialRejected:
                continue
        raise PermanentError(
            f"{self.name}: cannot tell which of {', '.join(params.all_roles)} key "
            f"{key.key_id} belongs to (it logs into neither); set it by hand")

    def _rotated_role(self, role: str) -> str:
        if role == self.config.admin_user:
            raise PermanentError(
                f"{self.name}: role {role!r} is admin_user itself; rotating it would lock the "
                "provider out. Rotate the admin password with another provider entry")
        return role

    # -- SQL -----------------------------------------------------------------------------------

    @staticmethod
    def _read_roles(conn: psycopg.Connection[Any],
                    roles: Sequence[str]) -> dict[str, RoleState]:
        """The comment of each of ``roles`` that exists."""
        rows = conn.execute(
            "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
            "WHERE rolname = ANY(%s)", (list(roles),)).fetchall()
        return {name: RoleState(name, comment) for name, comment in rows}

    @staticmethod
    def _without_password(conn: psycopg.Connection[Any], roles: Sequence[str]) -> list[str]:
        """Those of ``roles`` that have no password; empty unless the admin is a superuser
        (only superusers may read pg_authid, and PostgreSQL checks that even for a query
        branch that would not run, hence the separate question)."""
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                           ).fetchone()
        if not row or not row[0]:
            return []
        rows = conn.execute("SELECT rolname FROM pg_authid WHERE rolname = ANY(%s) "
                            "AND rolpassword IS NULL", (list(roles),)).fetchall()
        return [name for (name,) in rows]

    def _lock_and_read(self, conn: psycopg.Connection[Any],
                       roles: Sequence[str]) -> dict[str, RoleState]:
        """Take the credential's transaction-scoped advisory locks (in a fixed order, so two
        replicas cannot deadlock), then read its roles: the markers read stay true until
        commit."""
        for role in sorted(roles):
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         (f"rotator-role:{role}",))
        return self._read_roles(conn, roles)

    @staticmethod
    def _comment_sql(role: str, comment: str) -> Any:
        from psycopg import sql

        return sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role),
                                                           sql.Literal(comment))

    def _set_password(self, conn: psycopg.Connection[Any], role: str, verifier: str,
                      comment: str) -> None:
        """ALTER ROLE with the verifier (utility statements take no bind parameters, so it is
        a quoted literal) and the marker, in the caller's transaction."""
        from psycopg import sql

        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role),
                                                                   sql.Literal(verifier)))
        conn.execute(self._comment_sql(role, comment))
