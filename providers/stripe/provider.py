"""Stripe webhook signing secrets and Stripe API keys, rotated through the official ``stripe`` SDK.

One ``[providers.NAME]`` with ``type = "stripe"`` is one Stripe account, the one its ``api_key``
acts on (with ``stripe_context``, a connected account of it). Each credential names what it
rotates in ``params.kind``, and the provider hands each call to the module for that kind:

``kind = "webhook_secret"`` (``endpoint_url``, optional ``enabled_events``)
    :mod:`providers.stripe.webhooks`: a rotation creates a second webhook endpoint for the same
    URL, whose signing secret is the new key; ``revoke`` deletes the old endpoint.

``kind = "api_key"`` (``key_name``, optional ``permissions`` / ``connect_permissions``)
    :mod:`providers.stripe.api_keys`: a rotation creates a new secret key through
    ``/v2/iam/api_keys``, its secret encrypted to a throw-away RSA key pair
    (:mod:`providers.stripe.jwe`); ``revoke`` expires the old key.

Both talk to Stripe through :mod:`providers.stripe.client`, which keeps the SDK's retries off
(the engine retries the :class:`~rotator.errors.TransientError` raised there) and its DEBUG log
records, which carry whole response bodies (signing secrets, test-mode tokens), out of every log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar, cast

from providers.stripe.api_keys import ApiKeys
from providers.stripe.client import StripeAccount, quiet_sdk_debug_logs
from providers.stripe.settings import StripeParams, StripeSettings, params_of
from providers.stripe.webhooks import WebhookSecrets
from rotator.errors import RotatorError, TransientError
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    KeyProbe,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretResolver,
)
from rotator.plugin_support import FOUND_KEY, accepted

__all__ = ["StripeParams", "StripeProvider", "StripeSettings", "quiet_sdk_debug_logs"]

log = logging.getLogger(__name__)


class StripeProvider(Provider, KeyProbe):
    """Rotates webhook signing secrets and API keys of one Stripe account.

    Thread-safe: every call goes through the one :class:`StripeAccount`, whose cached clients
    serve every thread.
    """

    type_name: ClassVar[str] = "stripe"
    settings_model: ClassVar[type[PluginSettings]] = StripeSettings
    params_model: ClassVar[type[PluginSettings]] = StripeParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True
    )
    """``identify`` works for API keys; for webhook secrets it returns None."""
    list_page_size: ClassVar[int] = 100
    """Objects asked for per list request (Stripe's maximum)."""
    rsa_key_bits: ClassVar[int] = 2048
    """Size of the throw-away key pair a new API key's secret is encrypted to."""

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._account = StripeAccount(name, self.config, resolve_secret)

    @property
    def config(self) -> StripeSettings:
        return cast(StripeSettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """A new endpoint or key carrying ``rotator-<rotation_id>``; see the kind's module.

        A timeout may still have created it: the engine finds it with :meth:`find_by_rotation`.
        """
        params = params_of(credential)
        return self._kind(params).create(credential, params, rotation_id)

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """API key: read the balance with it. Webhook secret: its endpoint is still live."""
        params = params_of(credential)
        self._kind(params).verify(credential, params, secret, key_id)

    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        """A found secret or restricted key is live when Stripe authenticates it (``verify``
        of an API key: reading the balance)."""
        return accepted(self, secret, StripeParams(kind="api_key", key_name=FOUND_KEY))

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Delete the endpoint / expire the key; already gone is success. Refuses an id that
        belongs to another URL or key name, which would be some other consumer's."""
        params = params_of(credential)
        self._kind(params).revoke(credential, params, key_id)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """Live endpoints/keys of this credential carrying exactly ``rotator-<rotation_id>``."""
        params = params_of(credential)
        return self._kind(params).find_by_rotation(params, rotation_id)

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The id of the one live key of ``key_name`` with that secret; None for webhook
        secrets, and None rather than a guess when two keys look alike."""
        params = params_of(credential)
        return self._kind(params).identify(credential, params, secret)

    def check_access(self) -> None:
        """List webhook endpoints, then API keys: the calls rotation depends on.

        A refusal of the API key listing is only logged: the account may rotate webhook
        secrets alone, and this check does not know which kinds its credentials use.
        """
        self._webhooks().check_access()
        try:
            self._api_keys().check_access()
        except TransientError:
            raise
        except RotatorError as exc:
            log.warning("%s: api_key credentials cannot be rotated with this key: %s",
                        self.name, exc)

    def warm_up(self) -> None:
        import stripe  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: F401

        quiet_sdk_debug_logs()

    def close(self) -> None:
        self._account.close()

    # -- the two kinds -------------------------------------------------------------------------

    def _kind(self, params: StripeParams) -> WebhookSecrets | ApiKeys:
        """The handler of the credential's kind. Handlers hold nothing but the account and
        this provider's limits, so they are made per call."""
        return self._webhooks() if params.kind == "webhook_secret" else self._api_keys()

    def _webhooks(self) -> WebhookSecrets:
        return WebhookSecrets(self._account, page_size=self.list_page_size)

    def _api_keys(self) -> ApiKeys:
        return ApiKeys(self._account, page_size=self.list_page_size,
                       rsa_key_bits=self.rsa_key_bits)
