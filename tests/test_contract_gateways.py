"""The ``openrouter`` and ``litellm`` providers run the provider contract suite against their
fakes over real HTTP; each fake's own judgement (``is_valid``) says whether a key works."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from providers.litellm import LiteLLMParams, LiteLLMProvider, LiteLLMSettings
from providers.openrouter import OpenRouterParams, OpenRouterProvider, OpenRouterSettings
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.fake_litellm import FakeLiteLLM
from rotator.testing.fake_openrouter import FakeOpenRouter
from rotator.testing.provider_contract import KeyAccepted, LiveKeyIds, ProviderContract


class TestOpenRouterContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract`, for ``type = "openrouter"``."""

    @pytest.fixture
    def provider(self, fake_openrouter: FakeOpenRouter) -> Iterator[OpenRouterProvider]:
        settings = OpenRouterSettings(management_key={"env": "OPENROUTER_MANAGEMENT_KEY"},
                                      base_url=fake_openrouter.base_url, timeout=5)
        provider = OpenRouterProvider("openrouter-contract", settings,
                                      lambda ref: Secret(fake_openrouter.management_key))
        try:
            yield provider
        finally:
            provider.close()

    @pytest.fixture
    def credential(self, fake_openrouter: FakeOpenRouter) -> CredentialInfo:
        fake_openrouter.seed_key("someone-else")  # never seen or touched by the suite
        return CredentialInfo(name="contract-agent/openrouter", agent="contract-agent",
                              params=OpenRouterParams())

    @pytest.fixture
    def key_accepted(self, fake_openrouter: FakeOpenRouter) -> KeyAccepted:
        return fake_openrouter.is_valid

    @pytest.fixture
    def live_key_ids(self, fake_openrouter: FakeOpenRouter) -> LiveKeyIds:
        def live() -> set[str]:
            return {h for h in fake_openrouter.live_hashes()
                    if fake_openrouter.key(h)["name"] != "someone-else"}
        return live


class TestLiteLLMContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract`, for ``type = "litellm"``."""

    @pytest.fixture
    def provider(self, fake_litellm: FakeLiteLLM) -> Iterator[LiteLLMProvider]:
        settings = LiteLLMSettings(master_key={"env": "LITELLM_MASTER_KEY"},
                                   base_url=fake_litellm.url, timeout=5)
        provider = LiteLLMProvider("litellm-contract", settings,
                                   lambda ref: Secret(fake_litellm.master_key))
        try:
            yield provider
        finally:
            provider.close()

    @pytest.fixture
    def credential(self, fake_litellm: FakeLiteLLM) -> CredentialInfo:
        fake_litellm.seed_key("someone-else")
        return CredentialInfo(name="contract-agent/litellm", agent="contract-agent",
                              params=LiteLLMParams(metadata={"team": "contract"}))

    @pytest.fixture
    def key_accepted(self, fake_litellm: FakeLiteLLM) -> KeyAccepted:
        return fake_litellm.is_valid

    @pytest.fixture
    def live_key_ids(self, fake_litellm: FakeLiteLLM) -> LiveKeyIds:
        def live() -> set[str]:
            return {t for t in fake_litellm.live_tokens()
                    if fake_litellm.key(t)["key_alias"] != "someone-else"}
        return live
