"""The policy-file models of the postgres provider: ``[providers.NAME]`` and the params.

Validated by ``rotator check``, so a misspelt role, an unknown ``sslmode`` or a strategy without
its roles is reported with its file and line before anything touches a server.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from rotator.interfaces import CredentialInfo, PluginSettings, SecretRef
from rotator.plugin_support import params_as

__all__ = ["PostgresParams", "PostgresSettings", "params_of"]

_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


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


def params_of(credential: CredentialInfo) -> PostgresParams:
    """The credential's params as :class:`PostgresParams` (validated again if given raw)."""
    return params_as(credential, PostgresParams, "postgres")
