"""The built-in ``postgres`` provider runs the provider contract suite against a real cluster,
once per strategy.

``key_accepted`` logs in with psycopg directly, so the suite checks what the server accepts,
not what the provider reports. Every password the provider generates is shown to the harness
(it cannot read passwords back from the server), so ``live_key_ids`` can log in with each and
the leak scan searches for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import pytest

from providers.postgres.provider import PostgresParams, PostgresProvider
from rotator.interfaces import CredentialInfo, NewKey
from rotator.testing.provider_contract import KeyAccepted, LiveKeyIds, ProviderContract
from tests.harnesses.base import SeededCredential
from tests.harnesses.postgres import PostgresHarness


class _PostgresContract(ProviderContract):
    strategy: ClassVar[str] = ""

    @pytest.fixture
    def harness(self, request: pytest.FixtureRequest) -> PostgresHarness:
        return request.getfixturevalue(f"postgres_{self.strategy}")

    @pytest.fixture
    def seeded(self, harness: PostgresHarness) -> SeededCredential:
        return harness.seed(0)

    @pytest.fixture
    def provider(self, harness: PostgresHarness,
                 seeded: SeededCredential) -> Iterator[PostgresProvider]:
        provider = harness.provider()
        generate = provider.generate

        def generate_and_show(credential: CredentialInfo, rotation_id: str) -> NewKey:
            key = generate(credential, rotation_id)
            harness.observe(seeded, key.secret.reveal())
            return key

        # On the instance, so type(provider) stays the class the entry point must load.
        provider.generate = generate_and_show  # type: ignore[method-assign]
        try:
            yield provider
        finally:
            provider.close()

    @pytest.fixture
    def credential(self, seeded: SeededCredential) -> CredentialInfo:
        return CredentialInfo(name=f"contract/{self.strategy}", agent="contract",
                              params=PostgresParams.model_validate(seeded.params))

    @pytest.fixture
    def key_accepted(self, harness: PostgresHarness, seeded: SeededCredential) -> KeyAccepted:
        def accepted(raw: str) -> bool:
            return harness.key_accepted(seeded, raw, {})

        return accepted

    @pytest.fixture
    def live_key_ids(self, harness: PostgresHarness, seeded: SeededCredential) -> LiveKeyIds:
        def live() -> set[str]:
            return harness.live_key_ids(seeded)

        return live


class TestPostgresSingleContract(_PostgresContract):
    """Every guarantee of :class:`ProviderContract`, for ``strategy = "single"`` (in place)."""

    strategy = "single"


class TestPostgresAlternatingContract(_PostgresContract):
    """Every guarantee of :class:`ProviderContract`, for ``strategy = "alternating"``."""

    strategy = "alternating"

