"""Webhook signing secrets of a Stripe account (``kind = "webhook_secret"``).

Stripe shows an endpoint's signing secret (``whsec_...``) only in the response that creates the
endpoint and cannot roll it through the API, so a rotation *creates a second endpoint* for the
same URL, with the events and event API version of the newest existing one (or
``enabled_events``), ``description`` ``rotator-<rotation id>`` and metadata
``rotator_rotation = rotator-<rotation id>``. While both exist Stripe delivers each event to
each, signed with that endpoint's secret: the agent gets every event twice, accepts the copy
signed with the secret it holds (handlers must dedupe by event id, as Stripe advises) and
refuses the other, which Stripe retries until that endpoint is deleted, so keep ``grace`` short
for these credentials. The key id is the endpoint id; ``revoke`` deletes the endpoint;
``find_by_rotation`` lists endpoints by URL and metadata. A signing secret cannot authenticate
anything at Stripe, so ``verify`` checks what can be checked: the endpoint (by id) still exists
for this URL and is enabled. ``identify`` always returns None: no Stripe API maps a secret to
its endpoint, so the engine flags an adopted endpoint for deletion by hand (a wrong guess would
delete another consumer's endpoint).

Documented shapes followed: Stripe's API reference for webhook endpoints (``url``,
``enabled_events``, ``secret`` only at creation, ``description``, ``metadata``, ``api_version``,
``status``, delete returns ``deleted``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

from providers.stripe.client import StripeAccount
from providers.stripe.settings import StripeParams
from rotator.errors import CredentialRejected, NotFound, PermanentError, RotatorError
from rotator.interfaces import CredentialInfo, NewKey, Secret, key_name_for

__all__ = ["META_CREDENTIAL", "META_ROTATION", "WebhookSecrets"]

log = logging.getLogger(__name__)

META_ROTATION = "rotator_rotation"
"""Webhook endpoint metadata key holding ``rotator-<rotation id>``."""
META_CREDENTIAL = "rotator_credential"


@dataclass(frozen=True)
class _Endpoint:
    """A webhook endpoint as listed (the secret is never in a listing)."""

    id: str
    url: str
    status: str
    enabled_events: tuple[str, ...]
    metadata: Mapping[str, str]
    api_version: str | None


class WebhookSecrets:
    """The webhook endpoints of one account, each credential's found by its URL."""

    def __init__(self, account: StripeAccount, *, page_size: int) -> None:
        self.account = account
        self.name = account.name
        self.page_size = page_size

    def create(self, credential: CredentialInfo, params: StripeParams,
               rotation_id: str) -> NewKey:
        """A second endpoint for the URL, carrying ``rotator-<rotation_id>``."""
        url = cast(str, params.endpoint_url)
        existing = [e for e in self._all_endpoints() if e.url == url]  # newest first
        template = next((e for e in existing if e.status == "enabled"), None) or (
            existing[0] if existing else None
        )
        events = params.enabled_events or (list(template.enabled_events) if template else None)
        if not events:
            raise PermanentError(
                f"{self.name}: {credential.name}: no webhook endpoint for {url} at Stripe to "
                "copy enabled_events from: create the endpoint first, or set "
                "params.enabled_events"
            )
        wanted = key_name_for(rotation_id)
        metadata = {
            k: v for k, v in (template.metadata if template else {}).items()
            if k not in (META_ROTATION, META_CREDENTIAL)
        }
        metadata.update({META_ROTATION: wanted, META_CREDENTIAL: credential.name[:500]})
        payload: dict[str, Any] = {
            "url": url,
            "enabled_events": list(events),
            "description": wanted,
            "metadata": metadata,
        }
        if template is not None and template.api_version:
            payload["api_version"] = template.api_version
        if params.connect:
            payload["connect"] = True
        client = self.account.admin_client()
        with self.account.boundary(f"creating a webhook endpoint for {credential.name}",
                                   client=client):
            created = client.v1.webhook_endpoints.create(params=cast(Any, payload))
        data = created.to_dict(recursive=False)
        endpoint_id = str(data.get("id"))
        value = data.get("secret")
        if not isinstance(value, str) or not value:
            self._delete_quietly(endpoint_id)
            raise PermanentError(
                f"{self.name}: Stripe created webhook endpoint {endpoint_id} without returning "
                "its signing secret; the endpoint was deleted again"
            )
        log.info("%s: created webhook endpoint %s for %s", self.name, endpoint_id,
                 credential.name)
        return NewKey(key_id=endpoint_id, secret=Secret(value))

    def verify(self, credential: CredentialInfo, params: StripeParams, secret: Secret,
               key_id: str | None) -> None:
        """The secret looks like one and its endpoint is still live for this URL."""
        if not secret.reveal().startswith("whsec_"):
            raise CredentialRejected(
                f"{self.name}: the value of {credential.name} is not a Stripe webhook signing "
                "secret (whsec_...)"
            )
        if key_id is None:
            raise PermanentError(
                f"{self.name}: a webhook signing secret can only be checked through its "
                f"endpoint, and the endpoint of {credential.name}'s secret is not known"
            )
        client = self.account.admin_client()
        try:
            with self.account.boundary(f"reading webhook endpoint {key_id}", client=client):
                endpoint = _endpoint(client.v1.webhook_endpoints.retrieve(key_id))
        except NotFound as exc:
            raise CredentialRejected(
                f"{self.name}: webhook endpoint {key_id} no longer exists, so its signing "
                "secret signs nothing"
            ) from exc
        if endpoint.url != params.endpoint_url:
            raise CredentialRejected(
                f"{self.name}: webhook endpoint {key_id} is not the endpoint of "
                f"{credential.name} (its URL is not params.endpoint_url)"
            )
        if endpoint.status != "enabled":
            raise CredentialRejected(
                f"{self.name}: webhook endpoint {key_id} is {endpoint.status}: Stripe sends it "
                "no events"
            )

    def revoke(self, credential: CredentialInfo, params: StripeParams, key_id: str) -> None:
        """Delete the endpoint; already gone is success. Refuses an endpoint of another URL."""
        client = self.account.admin_client()
        try:
            with self.account.boundary(f"reading webhook endpoint {key_id}", client=client):
                endpoint = _endpoint(client.v1.webhook_endpoints.retrieve(key_id))
        except NotFound:
            log.info("%s: webhook endpoint %s was already deleted", self.name, key_id)
            return
        if endpoint.url != params.endpoint_url:
            raise PermanentError(
                f"{self.name}: webhook endpoint {key_id} does not send to params.endpoint_url "
                f"({params.endpoint_url}); refusing to delete an endpoint of another URL"
            )
        with suppress(NotFound), self.account.boundary(f"deleting webhook endpoint {key_id}",
                                                        client=client):
            client.v1.webhook_endpoints.delete(key_id)
        log.info("%s: deleted webhook endpoint %s", self.name, key_id)

    def find_by_rotation(self, params: StripeParams, rotation_id: str) -> list[str]:
        """The endpoints for the URL whose metadata carries exactly ``rotator-<rotation_id>``."""
        wanted = key_name_for(rotation_id)
        return [
            e.id
            for e in self._all_endpoints()
            if e.url == params.endpoint_url and e.metadata.get(META_ROTATION) == wanted
        ]

    def identify(self, credential: CredentialInfo, params: StripeParams,
                 secret: Secret) -> str | None:
        """Always None: no Stripe API maps a signing secret to its endpoint."""
        return None

    def check_access(self) -> None:
        """List one endpoint: the call every rotation starts with."""
        client = self.account.admin_client()
        with self.account.boundary("listing webhook endpoints", client=client):
            client.v1.webhook_endpoints.list(params={"limit": 1})

    def _delete_quietly(self, endpoint_id: str) -> None:
        client = self.account.admin_client()
        try:
            with self.account.boundary(f"deleting webhook endpoint {endpoint_id}", client=client):
                client.v1.webhook_endpoints.delete(endpoint_id)
        except RotatorError as exc:
            log.error("%s: could not delete webhook endpoint %s: %s; delete it by hand",
                      self.name, endpoint_id, exc)

    def _all_endpoints(self) -> list[_Endpoint]:
        client = self.account.admin_client()
        with self.account.boundary("listing webhook endpoints", client=client):
            page = client.v1.webhook_endpoints.list(params={"limit": self.page_size})
            return [_endpoint(e) for e in page.auto_paging_iter()]


def _endpoint(obj: Any) -> _Endpoint:
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return _Endpoint(
        id=str(data.get("id")),
        url=str(data.get("url") or ""),
        status=str(data.get("status") or ""),
        enabled_events=tuple(data.get("enabled_events") or ()),
        metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
        api_version=data.get("api_version") or None,
    )
