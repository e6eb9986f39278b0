"""The built-in ``stripe`` provider runs the provider contract suite, once per kind of secret.

The fake answers over real HTTP through the official ``stripe`` SDK, and the
:class:`~tests.harnesses.stripe.StripeHarness` is the independent judge of whether a key works,
so the suite checks what the service sees rather than what the provider reports. API keys run
twice: against a live-mode account (the secret comes back encrypted to the rotation's RSA key,
listings show only a redacted form) and a test-mode one (plaintext tokens everywhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import pytest

from providers.stripe.provider import (
    StripeParams,
    StripeProvider,
    StripeSettings,
    quiet_sdk_debug_logs,
)
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.fake_stripe import FakeStripeServer
from rotator.testing.provider_contract import (
    KeyAccepted,
    LiveKeyIds,
    MakeKey,
    ProviderContract,
)
from tests.harnesses.base import SeededCredential
from tests.harnesses.stripe import StripeHarness
from tests.support import serve_fake


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeStripeServer]:
    quiet_sdk_debug_logs()
    yield from serve_fake(FakeStripeServer(livemode=request.cls.livemode))


@pytest.fixture
def harness(request: pytest.FixtureRequest, fake: FakeStripeServer) -> StripeHarness:
    return StripeHarness(fake, request.cls.kind)


@pytest.fixture
def seeded(harness: StripeHarness) -> SeededCredential:
    harness.seed(1)  # another credential's endpoint or key: the suite must never touch it
    return harness.seed(0)


@pytest.fixture
def provider(fake: FakeStripeServer) -> Iterator[StripeProvider]:
    settings = StripeSettings(api_key={"env": "STRIPE_ADMIN_KEY"}, api_base=fake.base_url,
                              timeout=5)
    provider = StripeProvider("stripe-contract", settings, lambda ref: Secret(fake.admin_key))
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def credential(seeded: SeededCredential) -> CredentialInfo:
    return CredentialInfo(name="contract-agent/stripe", agent="contract-agent",
                          params=StripeParams.model_validate(seeded.params))


@pytest.fixture
def key_accepted(harness: StripeHarness, seeded: SeededCredential) -> KeyAccepted:
    return lambda value: harness.key_accepted(seeded, value, {})


@pytest.fixture
def live_key_ids(harness: StripeHarness, seeded: SeededCredential) -> LiveKeyIds:
    return lambda: harness.live_key_ids(seeded)


class TestStripeWebhookSecretContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract` for ``kind = "webhook_secret"``."""

    kind: ClassVar[Literal["webhook_secret", "api_key"]] = "webhook_secret"
    livemode: ClassVar[bool] = False

    def test_identify_finds_a_key_it_created(
        self, provider: StripeProvider, credential: CredentialInfo, make_key: MakeKey
    ) -> None:
        """Replaced for webhook secrets: Stripe returns an endpoint's secret only when it
        creates the endpoint and no API maps a secret back to its endpoint, so ``identify``
        returns None (the engine then flags an adopted endpoint for deletion by hand) rather
        than guess an endpoint of the same URL and later delete the wrong one."""
        new = make_key()
        assert provider.identify(credential, new.secret) is None


class TestStripeApiKeyLiveModeContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract` for ``kind = "api_key"``, live mode."""

    kind: ClassVar[Literal["webhook_secret", "api_key"]] = "api_key"
    livemode: ClassVar[bool] = True


class TestStripeApiKeyTestModeContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract` for ``kind = "api_key"``, test mode."""

    kind: ClassVar[Literal["webhook_secret", "api_key"]] = "api_key"
    livemode: ClassVar[bool] = False
