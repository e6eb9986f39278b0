"""What the protocol tests (crash at each step, no outage, revoke-immediately) need of a provider
and of a vault, so the same tests run over every built-in one.

A provider harness owns the test server behind its provider (a fake, moto, a PostgreSQL cluster)
and can seed a credential with a legacy key, tell whether the service accepts a key right now,
and list a credential's live keys, all without going through the provider under test. A vault
harness writes the initial secret and reads what agents would read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SeededCredential:
    """One credential the harness set up at its service."""

    params: dict[str, Any]
    """``[credentials.params]`` for the policy file."""
    field: str
    """The vault field that holds the key."""
    value: str | None
    """The legacy key to put in the vault before rotator runs (None: start without one)."""
    key_id: str | None
    """The service's id of that legacy key."""
    companions: dict[str, str] = field(default_factory=dict)
    """Non-secret fields written beside the legacy key (``AWS_ACCESS_KEY_ID``, a role name)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Whatever else the harness needs to find this credential again (user name, role...)."""


class ProviderHarness(ABC):
    """A provider under test and the service behind it."""

    id: str = ""
    """Short test id: ``openai``, ``aws-iam``, ``postgres-single``..."""
    in_place: bool = False
    """Making a new key kills the old one (PostgreSQL ``single``): agents see a short outage
    by design, so the no-outage test does not apply and the vault may hold a dead key between
    ``create`` and ``store``."""
    identifies_adopted: bool = True
    """False where the provider cannot tell which key an adopted (not rotator-written) vault
    value is (Stripe webhook secrets): the legacy key then stays for the operator to revoke."""
    revoked_is_rejected: bool = True
    """False where the service cannot refuse a revoked key (moto accepts inactive IAM keys):
    tests then check ``live_key_ids`` instead of ``key_accepted``."""

    @abstractmethod
    def provider_table(self) -> dict[str, Any]:
        """``[providers.NAME]`` for the policy file, ``type`` included. Admin credentials are
        ``{ env = "VAR" }`` references whose values ``env`` returns."""

    def env(self) -> dict[str, str]:
        """Environment variables the daemon needs (admin credentials, endpoints)."""
        return {}

    @abstractmethod
    def seed(self, index: int) -> SeededCredential:
        """Set up credential number ``index`` (its own user/account/role) with one live legacy
        key, unique to this call (harnesses are shared by tests running in parallel)."""

    @abstractmethod
    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        """Whether the service accepts ``value`` (with the vault's companion fields) right now,
        asked directly, not through the provider under test."""

    @abstractmethod
    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        """Ids of the credential's keys that still work at the service."""

    def bad_params(self) -> tuple[dict[str, Any], str] | None:
        """``[credentials.params]`` the provider must refuse, and a fragment of its message
        that ``rotator check`` has to show (None: nothing to check)."""
        return None

    def close(self) -> None:
        """Release connections (servers belong to session fixtures)."""


class VaultHarness(ABC):
    """A vault under test: where the policy points and what agents read."""

    id: str = ""

    @abstractmethod
    def vault_table(self) -> dict[str, Any]:
        """``[vaults.NAME]`` for the policy file, ``type`` included."""

    def env(self) -> dict[str, str]:
        return {}

    @abstractmethod
    def write(self, path: str, fields: dict[str, str]) -> None:
        """Create or replace the secret at ``path`` with ``fields`` (as an operator would)."""

    @abstractmethod
    def read(self, path: str) -> dict[str, str]:
        """All fields of the current version at ``path``, as an agent reads them."""
