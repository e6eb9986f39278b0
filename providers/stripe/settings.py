"""The policy-file models of the stripe provider: ``[providers.NAME]`` and the params.

Validated by ``rotator check``: a versioned ``api_base``, an event name that is not one, or
params of the other ``kind`` are reported with their file and line before Stripe is called.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rotator.interfaces import CredentialInfo, PluginSettings, SecretRef
from rotator.plugin_support import params_as

__all__ = ["StripeParams", "StripeSettings", "params_of"]

_EVENT = re.compile(r"\*|[a-z0-9_]+(?:\.[a-z0-9_]+)+")


class StripeSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "stripe"``."""

    api_key: SecretRef = Field(
        description="Reference to the Stripe key rotator acts with: {vault, path, field}, {env} "
        "or {file}. Webhook endpoints need a secret key (or a restricted key that may write "
        "webhook endpoints); API keys need a key allowed to manage API keys."
    )
    api_base: str = "https://api.stripe.com"
    stripe_context: str | None = Field(
        default=None, description="Account (acct_...) the key acts on, sent as Stripe-Context."
    )
    api_version: str | None = Field(
        default=None, description="Stripe-Version for the /v2/iam/api_keys calls."
    )
    timeout: float = Field(default=30, gt=0, description="Seconds per HTTP request.")

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                f"api_base must start with https:// or http:// (got {value!r}); "
                "the default is https://api.stripe.com"
            )
        if re.search(r"/v\d+$", value):
            raise ValueError(
                f"api_base is Stripe's address without a version path (got {value!r}): drop the "
                f"trailing {value.rsplit('/', 1)[1]!r}; the default is https://api.stripe.com"
            )
        return value

    @field_validator("stripe_context", "api_version")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or re.search(r"\s", value.strip())):
            raise ValueError("must be a non-empty value without spaces, or left out")
        return value.strip() if value is not None else None


class StripeParams(PluginSettings):
    """``[credentials.params]`` of a credential rotated by a ``stripe`` provider."""

    kind: Literal["webhook_secret", "api_key"] = Field(
        description='"webhook_secret" (a webhook endpoint\'s signing secret) or "api_key".'
    )
    endpoint_url: str | None = Field(
        default=None, description="webhook_secret: the URL Stripe sends the events to."
    )
    enabled_events: list[str] | None = Field(
        default=None,
        description="webhook_secret: events of the new endpoint (default: the current one's).",
    )
    connect: bool = Field(
        default=False, description="webhook_secret: a Connect endpoint (connected accounts)."
    )
    key_name: str | None = Field(
        default=None, description="api_key: the name the credential's Stripe API keys carry."
    )
    permissions: list[str] | None = Field(
        default=None,
        description="api_key: permissions of the new key (default: the current keys').",
    )
    connect_permissions: list[str] | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(
                f"endpoint_url must be the http(s) URL Stripe delivers the events to, as shown "
                f"under Developers > Webhooks (got {value!r})"
            )
        return value

    @field_validator("enabled_events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "enabled_events is empty: list Stripe event types such as \"charge.succeeded\" "
                "(or \"*\"), or leave it out to copy the current endpoint's"
            )
        bad = [event for event in value if not _EVENT.fullmatch(event)]
        if bad:
            raise ValueError(
                f"enabled_events has {bad[0]!r}, which is not a Stripe event type: use names "
                "like \"charge.succeeded\" or \"invoice.paid\", or \"*\" for all"
            )
        return value

    @field_validator("key_name")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError(
                "key_name is empty: give the name of the credential's Stripe API key, as shown "
                "under Developers > API keys"
            )
        return value

    @field_validator("permissions", "connect_permissions")
    @classmethod
    def _permissions(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise ValueError(
                "must list Stripe permission names (non-empty strings), or be left out to copy "
                "the permissions of the credential's current key"
            )
        return [p.strip() for p in value]

    @model_validator(mode="after")
    def _fits_kind(self) -> StripeParams:
        given = self.model_fields_set
        if self.kind == "webhook_secret":
            if self.endpoint_url is None:
                raise ValueError(
                    'kind = "webhook_secret" needs endpoint_url: the URL of the Stripe webhook '
                    "endpoint whose signing secret is rotated"
                )
            wrong = [k for k in ("key_name", "permissions", "connect_permissions") if k in given]
            other = "api_key"
        else:
            if self.key_name is None:
                raise ValueError(
                    'kind = "api_key" needs key_name: the name of the credential\'s Stripe API '
                    "key, as shown under Developers > API keys"
                )
            wrong = [k for k in ("endpoint_url", "enabled_events", "connect") if k in given]
            other = "webhook_secret"
        if wrong:
            raise ValueError(
                f'{", ".join(wrong)} only appl{"ies" if len(wrong) == 1 else "y"} to kind = '
                f'"{other}": remove {"it" if len(wrong) == 1 else "them"} or change kind'
            )
        return self


def params_of(credential: CredentialInfo) -> StripeParams:
    """The credential's params as :class:`StripeParams` (validated again if given raw)."""
    return params_as(credential, StripeParams, "Stripe")
