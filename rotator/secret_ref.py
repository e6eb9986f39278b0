"""``SecretRef``: where a secret the daemon itself needs can be read, never the secret.

Plugins declare their secret-bearing settings with it (an admin key, a token), so it belongs to
the plugin contract rather than to the policy loader: import it from ``rotator.interfaces``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = [
    "CONTROL_CHARS",
    "SECRETS_NEVER_HERE",
    "SECRET_REF_HINT",
    "SecretRef",
    "check_vault_field",
    "check_vault_path",
]

_VAULT_PATH_EXAMPLE = "a vault path like agents/research-agent/openai"
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_vault_path(value: str) -> str:
    """A path inside a vault: relative segments, no control characters, no traversal.

    Messages never repeat the value (it may be something pasted in by mistake).
    """
    if not value:
        raise ValueError(f"path must not be empty: write {_VAULT_PATH_EXAMPLE}")
    if CONTROL_CHARS.search(value):
        raise ValueError("path must not contain control characters (NUL, tabs, newlines): "
                         f"write {_VAULT_PATH_EXAMPLE}")
    if value.startswith("/"):
        raise ValueError("path must not start with /: it is relative to the vault's mount; "
                         f"write {_VAULT_PATH_EXAMPLE}")
    segments = value.split("/")
    if any(s in (".", "..") for s in segments):
        raise ValueError(f'path must not contain "." or ".." segments: write '
                         f"{_VAULT_PATH_EXAMPLE}")
    if "" in segments:
        raise ValueError("path must not contain empty segments (// or a trailing /): write "
                         f"{_VAULT_PATH_EXAMPLE}")
    return value


def check_vault_field(value: str) -> str:
    if not value:
        raise ValueError("field must name a key inside the vault secret, like "
                         "OPENAI_API_KEY")
    if CONTROL_CHARS.search(value):
        raise ValueError("field must not contain control characters (NUL, tabs, newlines): "
                         "name a key inside the vault secret, like OPENAI_API_KEY")
    return value



SECRET_REF_HINT = (
    "use { vault = ..., path = ..., field = ... } or { env = ... } or { file = ... }"
)
SECRETS_NEVER_HERE = f"secrets never go in the policy file: {SECRET_REF_HINT}"


class SecretRef(BaseModel):
    """Where a secret the daemon itself needs (an admin key, a token) can be read.

    Secrets never go in the policy file, only references to them: ``{ vault, path, field }``
    (a secret in one of the ``[vaults]``), ``{ env }`` (an environment variable) or ``{ file }``
    (a file, e.g. a mounted Kubernetes secret). Exactly one form must be given. ``str()`` names
    the reference, never a value, so it is safe in messages. Plugins use it as the type of any
    secret-bearing setting; ``rotator check`` then also confirms that ``vault`` names a vault.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    vault: str | None = None
    path: str | None = None
    field: str | None = None
    env: str | None = None
    file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_string_is_a_secret(cls, data: Any) -> Any:
        if isinstance(data, str):
            # Never echo the value: it may be the secret itself.
            raise ValueError(SECRETS_NEVER_HERE)
        return data

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else check_vault_path(value)

    @field_validator("field")
    @classmethod
    def _field(cls, value: str | None) -> str | None:
        return None if value is None else check_vault_field(value)

    @model_validator(mode="after")
    def _exactly_one_form(self) -> SecretRef:
        vault_form = any(v is not None for v in (self.vault, self.path, self.field))
        forms = sum([vault_form, self.env is not None, self.file is not None])
        if forms != 1:
            raise ValueError(f"a secret reference needs exactly one form: {SECRET_REF_HINT}")
        if vault_form:
            missing = [k for k in ("vault", "path", "field") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"a vault secret reference needs vault, path and field (missing: "
                    f"{', '.join(missing)})")
        elif self.env is not None and not self.env:
            raise ValueError("env must name an environment variable")
        elif self.file is not None and not self.file:
            raise ValueError("file must be a path")
        return self

    def __str__(self) -> str:
        if self.env is not None:
            return f"env {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        return f"vault {self.vault}:{self.path}#{self.field}"
