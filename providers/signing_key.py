"""Token-signing keys of the credential proxy (``type = "signing-key"``).

The proxy signs the short-lived tokens agents hold with a secret key that lives in the vault
like any credential, so the daemon rotates it like any credential: ``create`` draws a new
random key (its id, ``kid``, goes in every token's header), the vault's next version holds it,
and the old key stays valid for the credential's grace (at least the proxy's
``max_token_ttl``: ``rotator check`` insists), during which tokens it signed are still
accepted; its revocation is the proxy refusing them. There is no outside service: the key
exists only in the vault.
"""

from __future__ import annotations

import secrets
from typing import ClassVar

from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
)

__all__ = ["SigningKeyProvider"]


class SigningKeySettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "signing-key"``: nothing to set."""


class SigningKeyProvider(Provider):
    """Draws random 256-bit signing keys; revocation happens at the proxy (it stops accepting
    a key once its revocation is done in the state store)."""

    type_name: ClassVar[str] = "signing-key"
    settings_model: ClassVar[type[PluginSettings]] = SigningKeySettings
    params_model: ClassVar[type[PluginSettings]] = PluginSettings
    capabilities: ClassVar[Capabilities] = Capabilities(create=True, identify=False,
                                                        verify_revoked=False)

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        return NewKey(key_id=f"kid-{secrets.token_hex(8)}",
                      secret=Secret(secrets.token_urlsafe(32)))

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """A key drawn here is always usable: there is no service to ask."""

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Nothing outside to revoke: the proxy refuses tokens of a key whose revocation the
        state store records as done."""

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """A key drawn by an interrupted rotation never left this process: none to find."""
        return []
