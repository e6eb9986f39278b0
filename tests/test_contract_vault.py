"""The built-in ``vault`` backend runs the vault contract suite against a real OpenBao server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from rotator.testing.openbao import OpenBaoDevServer
from rotator.testing.vault_contract import VaultContract
from rotator.vaults.hashicorp_vault import HashiCorpVault, HashiCorpVaultSettings

TOKEN_ENV = "ROTATOR_CONTRACT_VAULT_TOKEN"


@pytest.fixture
def vault(openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HashiCorpVault]:
    monkeypatch.setenv(TOKEN_ENV, openbao.root_token)
    vault = HashiCorpVault("contract", HashiCorpVaultSettings(url=openbao.url, token_env=TOKEN_ENV))
    try:
        yield vault
    finally:
        vault.close()


@pytest.fixture
def new_path() -> str:
    return f"contract/{uuid.uuid4().hex[:12]}/agent"


class TestHashiCorpVaultContract(VaultContract):
    """Every guarantee of :class:`VaultContract`, for ``type = "vault"`` (KV v2 on OpenBao)."""
