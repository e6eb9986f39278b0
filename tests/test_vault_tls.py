"""The vault plugin over HTTPS: OpenBao's dev server with a certificate of its own CA, for both
of the plugin's transports (hvac for the token and health, ``KvHttp`` for every KV call)."""

from __future__ import annotations

import pytest

from rotator.errors import PermanentError
from rotator.interfaces import Secret
from rotator.testing.openbao import OpenBaoDevServer
from rotator.vaults.hashicorp_vault import HashiCorpVault, HashiCorpVaultSettings

TOKEN_ENV = "ROTATOR_TEST_TLS_VAULT_TOKEN"


@pytest.fixture(scope="module")
def tls_bao():
    with OpenBaoDevServer(tls=True) as server:
        yield server


def _vault(server: OpenBaoDevServer, **settings) -> HashiCorpVault:
    return HashiCorpVault("tls", HashiCorpVaultSettings(url=server.url, token_env=TOKEN_ENV,
                                                        **settings))


def test_a_rotation_s_vault_calls_verify_the_server_against_the_given_ca(tls_bao, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, tls_bao.root_token)
    assert tls_bao.url.startswith("https://")
    vault = _vault(tls_bao, verify_tls=tls_bao.ca_file)
    try:
        vault.health()
        value = Secret("sk-over-tls-0123456789abcdef")
        vault.stage("agents/tls", "KEY", value, "r-1")
        assert vault.read_staged("agents/tls", "KEY", "r-1") == value
        version = vault.promote("agents/tls", "KEY", "r-1", {"key_id": "key_1"})
        vault.discard_staged("agents/tls", "r-1")
        current = vault.read("agents/tls", "KEY")
        assert current.secret == value and current.version == version
        assert current.metadata["key_id"] == "key_1"
    finally:
        vault.close()


def test_a_server_the_trusted_cas_did_not_sign_is_refused_with_what_to_set(tls_bao,
                                                                          monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, tls_bao.root_token)
    vault = _vault(tls_bao)  # the system's CAs: they did not sign the dev server's certificate
    try:
        with pytest.raises(PermanentError, match=r"TLS verification failed.*set verify_tls"):
            vault.read("agents/tls", "KEY")
    finally:
        vault.close()
    insecure = _vault(tls_bao, verify_tls=False)
    try:
        insecure.stage("agents/insecure", "KEY", Secret("sk-insecure-0123456789ab"), "r-2")
        assert insecure.read_staged("agents/insecure", "KEY", "r-2") is not None
    finally:
        insecure.close()
