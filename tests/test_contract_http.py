"""The provider contract for ``type = "http"``, configured as docs/http-provider.md documents it,
against the fakes of SendGrid's API keys and Cloudflare's API tokens over HTTP.

``key_accepted`` and ``live_key_ids`` ask the fakes directly, so the suite checks what the
service sees rather than what the provider reports. Each credential has a neighbour (another
subuser's key, another zone's token) that the suite must never touch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from providers.http.provider import HttpParams
from rotator.interfaces import CredentialInfo, Provider
from rotator.testing.fake_http_services import FakeCloudflare, FakeSendGrid
from rotator.testing.provider_contract import KeyAccepted, LiveKeyIds, ProviderContract
from tests.harnesses.base import SeededCredential
from tests.harnesses.http_services import CloudflareHarness, SendGridHarness


class TestSendGridContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract`, for SendGrid through ``type = "http"``."""

    @pytest.fixture
    def harness(self, fake_sendgrid: FakeSendGrid) -> SendGridHarness:
        return SendGridHarness(fake_sendgrid)

    @pytest.fixture
    def seeded(self, harness: SendGridHarness) -> SeededCredential:
        harness.seed(1)  # a neighbour in another subuser
        return harness.seed(0)

    @pytest.fixture
    def provider(self, harness: SendGridHarness) -> Iterator[Provider]:
        provider = harness.make_provider("sendgrid-contract")
        yield provider
        provider.close()

    @pytest.fixture
    def credential(self, seeded: SeededCredential) -> CredentialInfo:
        return CredentialInfo(name="mailer/sendgrid", agent="mailer",
                              params=HttpParams.model_validate(seeded.params))

    @pytest.fixture
    def key_accepted(self, fake_sendgrid: FakeSendGrid) -> KeyAccepted:
        return fake_sendgrid.is_valid

    @pytest.fixture
    def live_key_ids(self, harness: SendGridHarness, seeded: SeededCredential) -> LiveKeyIds:
        return lambda: harness.live_key_ids(seeded)


class TestCloudflareContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract`, for Cloudflare through ``type = "http"``."""

    @pytest.fixture
    def harness(self, fake_cloudflare: FakeCloudflare) -> CloudflareHarness:
        return CloudflareHarness(fake_cloudflare)

    @pytest.fixture
    def seeded(self, harness: CloudflareHarness) -> SeededCredential:
        harness.seed(1)  # a neighbour with another zone
        return harness.seed(0)

    @pytest.fixture
    def provider(self, harness: CloudflareHarness) -> Iterator[Provider]:
        provider = harness.make_provider("cloudflare-contract")
        yield provider
        provider.close()

    @pytest.fixture
    def credential(self, seeded: SeededCredential) -> CredentialInfo:
        return CredentialInfo(name="dns/cloudflare", agent="dns",
                              params=HttpParams.model_validate(seeded.params))

    @pytest.fixture
    def key_accepted(self, fake_cloudflare: FakeCloudflare) -> KeyAccepted:
        return fake_cloudflare.is_valid

    @pytest.fixture
    def live_key_ids(self, harness: CloudflareHarness, seeded: SeededCredential) -> LiveKeyIds:
        return lambda: harness.live_key_ids(seeded)
