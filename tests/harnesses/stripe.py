"""The ``stripe`` provider over the fake Stripe API, as a protocol harness.

``stripe-webhook`` rotates a webhook endpoint's signing secret, ``stripe-apikey`` a restricted
API key. The harness judges keys at the fake directly, never through the provider: an API key
is accepted when the fake would authenticate it, a signing secret when it belongs to an existing,
enabled endpoint of the credential's URL (a deleted endpoint's secret signs nothing).

Every seed is unique per call (its own endpoint URL or key name), so tests running in parallel
on one fake never share a credential.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any, Literal

from rotator.testing.fake_stripe import FakeStripeServer
from tests.harnesses.base import ProviderHarness, SeededCredential
from tests.support import remember_issued

__all__ = ["WEBHOOK_EVENTS", "StripeHarness"]

WEBHOOK_EVENTS = ("charge.succeeded", "invoice.paid", "customer.subscription.updated")
"""Events of the seeded legacy endpoints (a rotation must carry them over)."""


class StripeHarness(ProviderHarness):
    """``stripe-webhook`` or ``stripe-apikey`` on one :class:`FakeStripeServer`."""

    def __init__(self, fake: FakeStripeServer,
                 kind: Literal["webhook_secret", "api_key"]) -> None:
        self.fake = fake
        self.kind = kind
        self.id = "stripe-webhook" if kind == "webhook_secret" else "stripe-apikey"
        self.field = "STRIPE_WEBHOOK_SECRET" if kind == "webhook_secret" else "STRIPE_API_KEY"
        self.identifies_adopted = kind == "api_key"
        """False for webhook secrets: Stripe cannot map a secret to its endpoint, so the
        engine flags a seeded (adopted) endpoint for deletion by hand and it stays live."""
        self.uid = uuid.uuid4().hex[:8]
        self.env_var = f"ROTATOR_TEST_STRIPE_KEY_{self.uid.upper()}"
        self._seq = itertools.count(1)

    # -- what the policy file and the daemon need ----------------------------------------------

    def provider_table(self) -> dict[str, Any]:
        return {"type": "stripe", "api_key": {"env": self.env_var},
                "api_base": self.fake.base_url, "timeout": 10}

    def env(self) -> dict[str, str]:
        return {self.env_var: self.fake.admin_key}

    # -- the service, asked directly ---------------------------------------------------------

    def seed(self, index: int) -> SeededCredential:
        n = next(self._seq)
        if self.kind == "webhook_secret":
            url = f"https://agent-{index}-{self.uid}.example.test/stripe/webhooks/{n}"
            endpoint_id, secret = self.fake.seed_webhook_endpoint(
                url, WEBHOOK_EVENTS, description="legacy endpoint",
                metadata={"team": f"agent-{index}"})
            remember_issued([secret])
            return SeededCredential(
                params={"kind": "webhook_secret", "endpoint_url": url}, field=self.field,
                value=secret, key_id=endpoint_id, extra={"endpoint_url": url})
        name = f"agent-{index}-{self.uid}-{n}"
        key_id, token = self.fake.seed_api_key(name, permissions=["balance_read", "charge_read"])
        remember_issued([token])
        return SeededCredential(
            params={"kind": "api_key", "key_name": name}, field=self.field, value=token,
            key_id=key_id, extra={"key_name": name})

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        if self.kind == "webhook_secret":
            return self.fake.webhook_secret_live(value, url=cred.extra["endpoint_url"])
        return self.fake.api_key_accepted(value)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        if self.kind == "webhook_secret":
            return {e["id"] for e in self.fake.live_webhook_endpoints(cred.extra["endpoint_url"])
                    if e["status"] == "enabled"}
        return {k["id"] for k in self.fake.live_api_keys(cred.extra["key_name"])}

    def close(self) -> None:
        remember_issued(self.fake.issued_values())
