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

import base64
import hashlib
import hmac
import logging
import re
import secrets
import string
import stringprep
import threading
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from rotator import redaction
from rotator.config import SecretRef
from rotator.errors import (
    CredentialRejected,
    PermanentError,
    RotatorError,
    TransientError,
    UnsupportedOperation,
)
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

ADOPTED = "adopted"
"""The rotation part of the key id of a password rotator did not set."""
SCRAM_ITERATIONS = 4096
"""PostgreSQL's default (``scram_iterations``); RFC 7677's minimum."""
PASSWORD_LENGTH = 40
"""Letters and digits only (about 238 bits): safe in URLs, DSNs and shell variables unquoted."""
_ALPHABET = string.ascii_letters + string.digits
_MAX_POOLED = 16
_STATEMENT_TIMEOUT = "30s"
_MAX_REMOTE_MESSAGE = 200
_MARKER = re.compile(r"^rotator:(?P<rid>\S+?)(?: seq=(?P<seq>\d+))?$")
_ANY_MARKER = re.compile(r"^rotator(?:-revoked)?:\S+")
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
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


# -- passwords and SCRAM ----------------------------------------------------------------------


def generate_password() -> str:
    """A strong random password for a role (never logged, wrapped in :class:`Secret`)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LENGTH))


def _saslprep(password: str) -> str:
    """The password as PostgreSQL prepares it before hashing (src/common/saslprep.c).

    Pure ASCII is used as is. Otherwise RFC 4013 SASLprep: map non-ASCII spaces to a space and
    drop "commonly mapped to nothing" characters, NFKC-normalise, and if the result has a
    prohibited character or breaks the bidi rules, use the original password unchanged, as
    the server (and libpq) do. A verifier hashed differently from the server's own hashing
    would never let anyone log in, so this must match it exactly.
    """
    if password.isascii():
        return password
    # Space mapping first, as PostgreSQL does: U+200B is in both tables and becomes a space.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if stringprep.in_table_c12(ch) or not stringprep.in_table_b1(ch)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    if not prepared:
        return password
    prohibited = (
        stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
        stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
        stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if any(check(ch) for ch in prepared for check in prohibited):
        return password
    if any(stringprep.in_table_d1(ch) for ch in prepared) and (
        any(stringprep.in_table_d2(ch) for ch in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        return password
    return prepared


def scram_sha256_verifier(password: str, *, salt: bytes | None = None,
                          iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677).

    ``SaltedPassword = PBKDF2-HMAC-SHA-256(SASLprep(password), salt, iterations)``,
    ``StoredKey = SHA-256(HMAC(SaltedPassword, "Client Key"))``,
    ``ServerKey = HMAC(SaltedPassword, "Server Key")``, in PostgreSQL's text form
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64). Neither key lets
    anyone log in as the role: a client must prove it knows ``ClientKey``, which only the
    password yields.
    """
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


# -- settings and params ----------------------------------------------------------------------


def _check_role_name(value: str, key: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{key} is empty: give the name of an existing PostgreSQL role")
    if len(value.encode("utf-8")) > 63:
        raise ValueError(f"{key} {value!r} is longer than 63 bytes, PostgreSQL's limit for a "
                         "role name")
    if "\x00" in value:
        raise ValueError(f"{key} contains a NUL character")
    if value.startswith("pg_"):
        raise ValueError(f"{key} {value!r}: names starting with pg_ are PostgreSQL's own "
                         "roles and cannot be rotated")
    return value


class PostgresSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "postgres"``: the server and the admin role."""

    # A password typed into the file by mistake must not come back in the error about it.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str = Field(min_length=1, description="Server host name, address or socket dir.")
    port: int = Field(default=5432, ge=1, le=65535)
    dbname: str = Field(default="postgres", min_length=1,
                        description="Database the admin and the rotated roles connect to.")
    admin_user: str = Field(description="A role with CREATEROLE (or a superuser).")
    admin_password: SecretRef = Field(
        description="Reference to the admin role's password: {vault, path, field}, {env} or "
                    "{file}.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = (
        "prefer")
    connect_timeout: int = Field(default=10, ge=1, le=300,
                                 description="Seconds to wait for a connection.")

    @field_validator("sslmode", mode="before")
    @classmethod
    def _sslmode(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in _SSLMODES:
            raise ValueError(f"sslmode {value!r} is not a libpq sslmode: use one of "
                             f"{', '.join(_SSLMODES)} (default prefer)")
        return value

    @field_validator("admin_user")
    @classmethod
    def _admin_user(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("admin_user is empty: give a role with CREATEROLE (or a "
                             "superuser) that may change the rotated roles' passwords")
        return value


class PostgresParams(PluginSettings):
    """``[credentials.params]`` of a credential rotated by a ``postgres`` provider.

    ``strategy = "single"`` with ``role``; or ``strategy = "alternating"`` with
    ``roles = ["app_a", "app_b"]`` and optionally ``username_field`` (default ``PGUSER``).
    """

    strategy: Literal["single", "alternating"] = Field(
        description='"single" (one role; a short outage while agents reload) or "alternating" '
                    "(two roles; no outage)")
    role: str | None = Field(default=None, validate_default=True)
    roles: tuple[str, ...] | None = Field(default=None, validate_default=True)
    username_field: str | None = Field(default=None, validate_default=True)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> Any:
        if value not in ("single", "alternating"):
            raise ValueError(
                f'strategy {value!r} is unknown: use "single" (one role, set role = "...") or '
                '"alternating" (two roles, set roles = ["app_a", "app_b"])')
        return value

    @field_validator("role")
    @classmethod
    def _role(cls, value: str | None, info: ValidationInfo) -> str | None:
        strategy = info.data.get("strategy")
        if strategy == "single" and value is None:
            raise ValueError('strategy "single" needs role = "<the role whose password is '
                             'rotated>"')
        if strategy == "alternating" and value is not None:
            raise ValueError('role is for strategy "single"; with strategy "alternating" give '
                             'the two roles as roles = ["app_a", "app_b"]')
        return None if value is None else _check_role_name(value, "role")

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: tuple[str, ...] | None,
               info: ValidationInfo) -> tuple[str, ...] | None:
        strategy = info.data.get("strategy")
        if strategy == "alternating" and value is None:
            raise ValueError('strategy "alternating" needs roles = ["app_a", "app_b"]: two '
                             "roles with the same grants, agents logging in as either")
        if strategy == "single" and value is not None:
            raise ValueError('roles is for strategy "alternating"; with strategy "single" give '
                             'one role as role = "..."')
        if value is None:
            return None
        if len(value) != 2:
            raise ValueError(f"roles must name exactly two roles (got {len(value)}): "
                             'roles = ["app_a", "app_b"]')
        checked = tuple(_check_role_name(v, "roles entry") for v in value)
        if checked[0] == checked[1]:
            raise ValueError(f"roles names {checked[0]!r} twice: give two different roles, so "
                             "one keeps working while the other gets a new password")
        return checked

    @field_validator("username_field")
    @classmethod
    def _username_field(cls, value: str | None, info: ValidationInfo) -> str | None:
        strategy = info.data.get("strategy")
        if strategy == "single" and value is not None:
            raise ValueError('username_field is for strategy "alternating" (the vault field '
                             "telling agents which role to log in as); remove it")
        if strategy != "alternating":
            return value
        value = "PGUSER" if value is None else value.strip()
        if not value:
            raise ValueError('username_field is empty: name the vault field for the role '
                             'name (default "PGUSER")')
        return value

    @property
    def all_roles(self) -> tuple[str, ...]:
        if self.roles is not None:
            return self.roles
        assert self.role is not None
        return (self.role,)


# -- role markers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Marker:
    """What a role's comment says about its password."""

    rid: str
    """The rotation whose password the role holds (``adopted`` for one rotator found there)."""
    seq: int


@dataclass(frozen=True)
class _RoleState:
    name: str
    comment: str | None

    @property
    def marker(self) -> _Marker | None:
        """The role's live ``rotator:`` marker; None if it has none (or was revoked)."""
        for line in reversed((self.comment or "").splitlines()):
            if _ANY_MARKER.match(line):
                found = _MARKER.match(line)
                if found is None:
                    return None  # the last rotator line says revoked
                return _Marker(found["rid"], int(found["seq"] or 0))
        return None

    @property
    def revoked(self) -> bool:
        return self.marker is None and any(
            line.startswith("rotator-revoked:") for line in (self.comment or "").splitlines())


def _with_marker(comment: str | None, marker: str) -> str:
    """``comment`` with its rotator line replaced by ``marker``; other text is kept."""
    kept = [line for line in (comment or "").splitlines() if not _ANY_MARKER.match(line)]
    return "\n".join([*kept, marker])


def split_key_id(key_id: str) -> tuple[str | None, str]:
    """``(role, rotation id)`` of ``<role>@<rotation id>``; ``(None, key_id)`` without ``@``."""
    role, sep, rid = key_id.rpartition("@")
    return (role, rid) if sep and role else (None, key_id)


def _params(credential: CredentialInfo) -> PostgresParams:
    params = credential.params
    if isinstance(params, PostgresParams):
        return params
    if isinstance(params, Mapping):
        return PostgresParams.model_validate(dict(params))
    raise PermanentError(
        f"{credential.name}: params are not postgres provider params ({type(params).__name__})")


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
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._admin_password: Secret | None = None

    @property
    def config(self) -> PostgresSettings:
        return cast(PostgresSettings, self.settings)

    # -- in place: generate and apply ----------------------------------------------------------

    def generate(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """A new random password for the role this rotation writes; nothing changes on the
        server (``alternating`` reads the roles' markers to pick the role)."""
        params = _params(credential)
        if params.strategy == "single":
            role = self._rotated_role(params.all_roles[0])
        else:
            role = self._rotated_role(self._pick_free_role(credential, params))
        return NewKey(key_id=f"{role}@{rotation_id}", secret=Secret(generate_password()))

    def apply(self, credential: CredentialInfo, key: NewKey) -> None:
        """Make ``key`` the password of the role its id names, and mark the role with the key's
        rotation, in one transaction. Idempotent; also how rollback puts an old key back (its
        id names an older rotation, or ``adopted``)."""
        params = _params(credential)
        role, rid = split_key_id(key.key_id)
        if role is None:
            role = self._role_of_bare_key(credential, params, key)
        if role not in params.all_roles:
            raise PermanentError(
                f"{self.name}: key {key.key_id} names role {role!r}, which is not one of "
                f"{credential.name}'s roles ({', '.join(params.all_roles)})")
        self._rotated_role(role)
        verifier = scram_sha256_verifier(key.secret.reveal())
        with self._admin(f"setting the password of role {role}", role=role) as conn, \
                conn.transaction():
            states = self._lock_and_read(conn, params.all_roles)
            if role not in states:
                raise PermanentError(
                    f"{self.name}: role {role!r} does not exist on {self._where()}; create it "
                    f"or fix params of {credential.name}")
            seq = 1 + max((s.marker.seq for s in states.values() if s.marker), default=0)
            marker = f"rotator:{rid}" + (f" seq={seq}" if params.strategy == "alternating" else "")
            self._set_password(conn, role, verifier, _with_marker(states[role].comment, marker))
        log.info("%s: role %s now holds key %s", self.name, role, key.key_id)

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """``alternating`` only: ``generate`` then ``apply``. ``single`` refuses, because a
        password set before the vault holds it would be the only working key and exist only
        in this process's memory: the engine uses ``generate``/``apply`` for it."""
        params = _params(credential)
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
        params = _params(credential)
        role = split_key_id(key_id)[0] if key_id else None
        candidates = (role,) if role in params.all_roles else params.all_roles
        rejected: CredentialRejected | None = None
        for candidate in candidates:
            assert candidate is not None
            try:
                with self._login(candidate, secret) as conn:
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
        params = _params(credential)
        role, rid = split_key_id(key_id)
        if role is None or role not in params.all_roles:
            log.info("%s: key %s is not a key of %s's roles; nothing to revoke", self.name,
                     key_id, credential.name)
            return
        self._rotated_role(role)
        with self._admin(f"revoking key {key_id}", role=role) as conn:
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
                                   _with_marker(state.comment, f"rotator-revoked:{rid}"))
        log.info("%s: revoked key %s (role %s has a new random password)", self.name, key_id,
                 role)

    def _holds(self, state: _RoleState | None, role: str, rid: str, key_id: str) -> bool:
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
        params = _params(credential)
        with self._admin("reading the roles' markers") as conn:
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
        params = _params(credential)
        named = (companions or {}).get(params.username_field or "")
        candidates = (named,) if named in params.all_roles else params.all_roles
        found: list[tuple[str, _Marker | None]] = []
        for role in candidates:
            assert role is not None
            try:
                with self._login(role, secret) as conn:
                    row = conn.execute(
                        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles "
                        "WHERE rolname = current_user").fetchone()
            except CredentialRejected:
                continue
            found.append((role, _RoleState(role, row[0] if row else None).marker))
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
        params = _params(credential)
        return (params.username_field,) if params.username_field else ()

    def companions(self, credential: CredentialInfo, key_id: str) -> Mapping[str, str]:
        """``{username_field: role}`` for ``alternating``: agents log in as the key's role."""
        params = _params(credential)
        if not params.username_field:
            return {}
        role = split_key_id(key_id)[0]
        if role not in params.all_roles:
            raise PermanentError(f"{self.name}: key {key_id} names no role of {credential.name}")
        assert role is not None
        return {params.username_field: role}

    def check_access(self) -> None:
        """Log in as the admin and confirm it may change passwords (CREATEROLE or superuser)."""
        with self._admin("checking the admin role") as conn:
            row = conn.execute("SELECT rolsuper, rolcreaterole FROM pg_roles "
                               "WHERE rolname = current_user").fetchone()
            version = conn.info.server_version
        if not row or not (row[0] or row[1]):
            raise PermanentError(
                f"{self.name}: admin_user {self.config.admin_user!r} can log in to "
                f"{self._where()} but may not change other roles' passwords: "
                f"ALTER ROLE {self.config.admin_user} CREATEROLE (or use a superuser)")
        if not row[0] and version >= 160000:
            log.info("%s: PostgreSQL %d: admin_user %s also needs ADMIN OPTION on each rotated "
                     "role (GRANT <role> TO %s WITH ADMIN OPTION)", self.name, version // 10000,
                     self.config.admin_user, self.config.admin_user)

    def warm_up(self) -> None:
        import psycopg  # noqa: F401

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- choosing and marking roles ------------------------------------------------------------

    def _pick_free_role(self, credential: CredentialInfo, params: PostgresParams) -> str:
        """The role agents are not using (rules in the module docstring)."""
        roles = params.all_roles
        with self._admin("reading the roles' markers") as conn:
            states = self._read_roles(conn, roles)
            without = [] if any(s.marker for s in states.values()) else (
                self._without_password(conn, roles))
        missing = [r for r in roles if r not in states]
        if missing:
            raise PermanentError(
                f"{self.name}: role {missing[0]!r} of {credential.name} does not exist on "
                f"{self._where()}; create it with the same grants as the other role")
        marked = {r: states[r].marker for r in roles if states[r].marker is not None}
        if len(marked) == 1:
            return next(r for r in roles if r not in marked)
        if len(marked) == 2:
            return min(roles, key=lambda r: cast(_Marker, marked[r]).seq)
        return without[0] if len(without) == 1 else roles[1]

    def _mark_adopted(self, credential: CredentialInfo, params: PostgresParams,
                      role: str) -> None:
        """Record that ``role`` holds the vault's current, adopted password (in use)."""
        with self._admin(f"marking role {role} as in use", role=role) as conn, \
                conn.transaction():
            states = self._lock_and_read(conn, params.all_roles)
            state = states.get(role)
            if state is None or state.marker is not None:
                return
            seq = 1 + max((s.marker.seq for s in states.values() if s.marker), default=0)
            marker = f"rotator:{ADOPTED} seq={seq}"
            conn.execute(self._comment_sql(role, _with_marker(state.comment, marker)))
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
                with self._login(role, key.secret):
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
                    roles: Sequence[str]) -> dict[str, _RoleState]:
        """The comment of each of ``roles`` that exists."""
        rows = conn.execute(
            "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
            "WHERE rolname = ANY(%s)", (list(roles),)).fetchall()
        return {name: _RoleState(name, comment) for name, comment in rows}

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
                       roles: Sequence[str]) -> dict[str, _RoleState]:
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

    # -- connections ---------------------------------------------------------------------------

    def _where(self) -> str:
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
    def _admin(self, action: str, *, role: str | None = None
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
    def _login(self, role: str, secret: Secret) -> Iterator[psycopg.Connection[Any]]:
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
        prefix = f"{self.name}: {action} on {self._where()}"
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
    text = " ".join(redaction.scrub(text).split())
    if len(text) > _MAX_REMOTE_MESSAGE:
        text = text[:_MAX_REMOTE_MESSAGE] + "..."
    return text or type(exc).__name__


def _scrubbed(exc: Exception) -> Exception:
    """``exc`` without the failed connection psycopg attaches to it, whose ``repr`` shows the
    connection parameters, password included."""
    if hasattr(exc, "_pgconn"):
        exc._pgconn = None
    return exc
