"""The built-in ``openai`` provider runs the provider contract suite against the fake Admin API.

The fake answers over real HTTP through the real ``openai`` SDK, and its ``is_valid`` is the
independent judge of whether a key works, so the suite checks what the service sees rather than
what the provider reports.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from providers.openai_api_key import OpenAIParams, OpenAIProvider, OpenAISettings
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.fake_openai import FakeOpenAIServer
from rotator.testing.provider_contract import KeyAccepted, LiveKeyIds, ProviderContract


@pytest.fixture
def project(fake_openai: FakeOpenAIServer) -> str:
    return fake_openai.add_project()


@pytest.fixture
def service_account(fake_openai: FakeOpenAIServer, project: str) -> str:
    return fake_openai.add_service_account(project)


@pytest.fixture
def provider(fake_openai: FakeOpenAIServer, project: str) -> Iterator[OpenAIProvider]:
    settings = OpenAISettings(
        project_id=project,
        admin_key={"env": "OPENAI_ADMIN_KEY"},
        base_url=fake_openai.base_url,
        timeout=5,
    )
    provider = OpenAIProvider(
        "openai-contract", settings, lambda ref: Secret(fake_openai.admin_key)
    )
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def credential(fake_openai: FakeOpenAIServer, project: str, service_account: str) -> CredentialInfo:
    # Another service account's key in the same project: the suite must never see or touch it.
    other = fake_openai.add_service_account(project, name="someone-else")
    fake_openai.seed_key(project, other, name="not-rotators")
    return CredentialInfo(
        name="contract-agent/openai",
        agent="contract-agent",
        params=OpenAIParams(service_account_id=service_account),
    )


@pytest.fixture
def key_accepted(fake_openai: FakeOpenAIServer) -> KeyAccepted:
    return fake_openai.is_valid


@pytest.fixture
def live_key_ids(fake_openai: FakeOpenAIServer, project: str, service_account: str) -> LiveKeyIds:
    def live() -> set[str]:
        return {
            key["id"]
            for key in fake_openai.live_keys(project)
            if key["service_account_id"] == service_account
        }

    return live


class TestOpenAIProviderContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract`, for ``type = "openai"``."""
