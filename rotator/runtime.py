"""Plugin instances for one loaded policy file: vaults, providers, and the secret resolver.

Instances are built on first use, so a command that touches one credential does not import
every provider's SDK or log in to every vault.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotator import plugins
from rotator.errors import NotFound, PermanentError
from rotator.interfaces import CredentialInfo, Provider, Secret, Vault
from rotator.pacing import Pacer
from rotator.systemd import expand_credentials_directory

if TYPE_CHECKING:
    from rotator.config import CredentialConfig, Policies

__all__ = ["Runtime"]


class Runtime:
    """Owns the plugin instances for a ``Policies``; ``close()`` releases them all."""

    def __init__(self, policies: Policies) -> None:
        self.policies = policies
        self._vaults: dict[str, Vault] = {}
        self._providers: dict[str, Provider] = {}
        self._pacers: dict[str, Pacer] = {}
        self._lock = threading.Lock()

    def vault(self, name: str) -> Vault:
        with self._lock:
            vault = self._vaults.get(name)
            if vault is None:
                cfg = self.policies.vaults[name]
                vault = plugins.vault_class(cfg.type)(name, cfg.settings)
                self._vaults[name] = vault
            return vault

    def provider(self, name: str) -> Provider:
        with self._lock:
            provider = self._providers.get(name)
            if provider is None:
                cfg = self.policies.providers[name]
                provider = plugins.provider_class(cfg.type)(name, cfg.settings,
                                                            self.resolve_secret)
                self._providers[name] = provider
            return provider

    def pacer(self, name: str) -> Pacer:
        """The pacer every call to provider ``name`` goes through, shared by all threads: the
        provider's rate limit is one for all of them (see :mod:`rotator.pacing`)."""
        with self._lock:
            pacer = self._pacers.get(name)
            if pacer is None:
                pacer = self._pacers[name] = Pacer(name)
            return pacer

    def warm_up(self, credentials: Iterable[CredentialConfig]) -> None:
        """Build the plugins these credentials use and let them import their SDKs, on the
        calling thread, before worker threads need them."""
        for cred in credentials:
            self.vault(cred.vault).warm_up()
            self.provider(cred.provider).warm_up()

    def info(self, credential: CredentialConfig) -> CredentialInfo:
        return CredentialInfo(name=credential.name, agent=credential.agent,
                              params=credential.params)

    def resolve_secret(self, ref: Any) -> Secret:
        """Read a secret reference from the policy file: ``vault``+``path``+``field``, ``env``
        or ``file``. Errors name the reference, never a value."""
        if getattr(ref, "env", None):
            value = os.environ.get(ref.env, "")
            if not value:
                raise PermanentError(
                    f"environment variable {ref.env} is not set or empty; export it for the "
                    "rotator process (or use a vault or file reference)")
            return Secret(value)
        if getattr(ref, "file", None):
            path = Path(expand_credentials_directory(ref.file))
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise PermanentError(f"cannot read secret file {path}: {exc.strerror}") from exc
            if not value:
                raise PermanentError(f"secret file {path} is empty")
            return Secret(value)
        if getattr(ref, "vault", None):
            found = self.vault(ref.vault).read(ref.path, ref.field)
            if found.secret is None:
                raise NotFound(
                    f"vault {ref.vault!r} has a secret at {ref.path!r} but no field "
                    f"{ref.field!r}; write it there or fix the reference")
            return found.secret
        raise PermanentError("empty secret reference: give vault/path/field, env or file")

    def close(self) -> None:
        with self._lock:
            for plugin in [*self._providers.values(), *self._vaults.values()]:
                with contextlib.suppress(Exception):  # closing must never mask the outcome
                    plugin.close()
            self._providers.clear()
            self._vaults.clear()
