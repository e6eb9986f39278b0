"""The ``anthropic`` provider: emergency revocation only, against the fake Admin API over HTTP.

What matters: ``--revoke-first`` really kills the key (status ``inactive``, refused afterwards),
``identify`` never guesses, the admin key is told apart from the key being checked, and no key
value reaches an exception. The last test runs ``rotate-now --revoke-first`` through the engine
with a real OpenBao.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from pydantic import ValidationError

from providers.anthropic_admin import AnthropicParams, AnthropicProvider, AnthropicSettings
from rotator.config import parse_policies
from rotator.errors import (
    ConfigError,
    CredentialRejected,
    PermanentError,
    TransientError,
    UnsupportedOperation,
)
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.fake_anthropic import FakeAnthropicAdmin
from rotator.testing.provider_contract import (
    KeyAccepted,
    LiveKeyIds,
    ProviderContract,
    assert_no_secret_in_exception,
)

ADMIN_ENV = "ANTHROPIC_ADMIN_KEY"


def _provider(fake: FakeAnthropicAdmin, calls: list[str] | None = None,
              admin: str | None = None, **settings: Any) -> AnthropicProvider:
    def resolve(ref: Any) -> Secret:
        if calls is not None:
            calls.append(str(ref))
        return Secret(admin or fake.admin_key)

    config = AnthropicSettings.model_validate(
        {"admin_key": {"env": ADMIN_ENV}, "base_url": fake.url, "timeout": 5, **settings})
    return AnthropicProvider("anthropic-test", config, resolve)


@pytest.fixture
def provider(fake_anthropic: FakeAnthropicAdmin) -> Iterator[AnthropicProvider]:
    provider = _provider(fake_anthropic)
    yield provider
    provider.close()


def _cred(**params: str) -> CredentialInfo:
    return CredentialInfo(name="research-agent/anthropic", agent="research-agent",
                          params=AnthropicParams(**params))


# -- what it cannot do ---------------------------------------------------------------------------


def test_it_cannot_create_and_says_what_to_do(fake_anthropic: FakeAnthropicAdmin,
                                              provider: AnthropicProvider) -> None:
    assert provider.capabilities.create is False
    assert provider.capabilities.identify and provider.capabilities.verify_revoked
    with pytest.raises(UnsupportedOperation) as caught:
        provider.create(_cred(), "r20250101000000-00000000")
    message = str(caught.value)
    assert "cannot create keys" in message and "--revoke-first" in message
    assert "manual_only = true" in message
    assert not isinstance(caught.value, TransientError), "never retried"
    assert fake_anthropic.request_count() == 0, "nothing happens at Anthropic"
    assert provider.find_by_rotation(_cred(), "r20250101000000-00000000") == []


class TestAnthropicContract(ProviderContract):
    """The contract's static guarantees; its create-based tests skip (``create=False``)."""

    @pytest.fixture
    def credential(self) -> CredentialInfo:
        return _cred()

    @pytest.fixture
    def key_accepted(self, fake_anthropic: FakeAnthropicAdmin) -> KeyAccepted:
        return fake_anthropic.is_valid

    @pytest.fixture
    def live_key_ids(self, fake_anthropic: FakeAnthropicAdmin) -> LiveKeyIds:
        return fake_anthropic.live_key_ids


# -- verify --------------------------------------------------------------------------------------


def test_verify_accepts_an_active_key_and_rejects_dead_ones(
        fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    _, live = fake_anthropic.seed_key("live")
    provider.verify(_cred(), Secret(live))
    dead = [fake_anthropic.seed_key("off", status="inactive")[1],
            fake_anthropic.seed_key("archived", status="archived")[1],
            fake_anthropic.seed_key("expired", expires_in=-1)[1],
            "sk-ant-api03-" + "x" * 95]
    for value in dead:
        with pytest.raises(CredentialRejected) as caught:
            provider.verify(_cred(), Secret(value))
        assert "authentication_error" in str(caught.value)
        assert_no_secret_in_exception(caught.value, [value], "verify of a dead key")


@pytest.mark.parametrize(("status", "retry_after"), [(500, None), (529, None), (429, 7.0)])
def test_verify_outage_is_transient(fake_anthropic: FakeAnthropicAdmin,
                                    provider: AnthropicProvider, status: int,
                                    retry_after: float | None) -> None:
    _, value = fake_anthropic.seed_key("live")
    fake_anthropic.inject_fault(status, path_contains="/v1/models", retry_after=retry_after)
    with pytest.raises(TransientError) as caught:
        provider.verify(_cred(), Secret(value))
    assert caught.value.retry_after == retry_after
    assert f"HTTP {status}" in str(caught.value) and "request id req_" in str(caught.value)


def test_unreachable_service_is_transient(fake_anthropic: FakeAnthropicAdmin) -> None:
    provider = _provider(fake_anthropic, base_url="http://127.0.0.1:9", timeout=2)
    with pytest.raises(TransientError, match=r"could not reach http://127\.0\.0\.1:9"):
        provider.verify(_cred(), Secret("sk-ant-api03-" + "y" * 95))


def test_a_timeout_is_transient(fake_anthropic: FakeAnthropicAdmin) -> None:
    provider = _provider(fake_anthropic, timeout=0.2)
    fake_anthropic.set_latency(0.6)
    with pytest.raises(TransientError, match="timed out"):
        provider.check_access()


# -- revoke --------------------------------------------------------------------------------------


def test_revoke_sets_the_key_inactive_and_it_is_refused(
        fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    key_id, value = fake_anthropic.seed_key("abused")
    _, bystander = fake_anthropic.seed_key("bystander")
    provider.revoke(_cred(), key_id)
    assert fake_anthropic.key(key_id)["status"] == "inactive"
    assert not fake_anthropic.is_valid(value)
    with pytest.raises(CredentialRejected):
        provider.verify(_cred(), Secret(value))
    provider.revoke(_cred(), key_id)
    assert fake_anthropic.request_count("POST") == 1, "an inactive key is not updated again"
    assert fake_anthropic.is_valid(bystander), "only that key is touched"


def test_revoke_of_an_unknown_or_archived_key_is_success(
        fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    provider.revoke(_cred(), "apikey_01NeverIssued000000000000")
    archived, _ = fake_anthropic.seed_key("old", status="archived")
    provider.revoke(_cred(), archived)
    assert fake_anthropic.key(archived)["status"] == "archived"
    assert fake_anthropic.request_count("POST") == 0


def test_revoke_refuses_a_key_of_another_workspace(
        fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    mine, theirs = fake_anthropic.add_workspace("mine"), fake_anthropic.add_workspace("theirs")
    key_id, value = fake_anthropic.seed_key("theirs", workspace_id=theirs)
    with pytest.raises(PermanentError, match="belongs to workspace"):
        provider.revoke(_cred(workspace_id=mine), key_id)
    assert fake_anthropic.is_valid(value)


def test_a_refused_admin_key_is_a_configuration_error_and_is_read_again(
        fake_anthropic: FakeAnthropicAdmin) -> None:
    calls: list[str] = []
    wrong = "sk-ant-admin01-" + "w" * 93
    provider = _provider(fake_anthropic, calls, admin=wrong)
    key_id, value = fake_anthropic.seed_key("abused")
    for attempt in range(2):
        with pytest.raises(PermanentError) as caught:
            provider.revoke(_cred(), key_id)
        assert not isinstance(caught.value, CredentialRejected)
        assert "admin_key in [providers.anthropic-test]" in str(caught.value)
        assert_no_secret_in_exception(caught.value, [wrong, value], "revoke with a bad admin")
        assert len(calls) == attempt + 1, "the admin key is resolved again after a 401"
    # Nor may an unknown id pass for "already gone" when the admin key is wrong.
    with pytest.raises(PermanentError):
        provider.revoke(_cred(), "apikey_01NeverIssued000000000000")
    assert fake_anthropic.is_valid(value)


def test_check_access(fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    provider.check_access()
    with pytest.raises(PermanentError, match="admin_key"):
        _provider(fake_anthropic, admin="sk-ant-admin01-nope-nope").check_access()


# -- identify ------------------------------------------------------------------------------------


def _lookalikes(fake: FakeAnthropicAdmin) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two keys with the same partial_key_hint (same first 16 and last 4 characters)."""
    head, tail = "sk-ant-api03-Abc", "zzAA"
    return (fake.seed_key("one", value=head + "1" * 88 + tail),
            fake.seed_key("two", value=head + "2" * 88 + tail))


def test_identify_finds_the_one_key_that_fits(fake_anthropic: FakeAnthropicAdmin) -> None:
    provider = _provider(fake_anthropic)
    provider.list_page_size = 2  # type: ignore[misc]
    for i in range(5):
        fake_anthropic.seed_key(f"other-{i}")
    key_id, value = fake_anthropic.seed_key("mine")
    assert provider.identify(_cred(), Secret(value)) == key_id, "found on the third page"
    assert fake_anthropic.request_count("GET", "after_id=") >= 2


def test_identify_never_guesses(fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    (one_id, one), (two_id, _) = _lookalikes(fake_anthropic)
    assert provider.identify(_cred(), Secret(one)) is None, "two keys fit the hint"
    fake_anthropic.set_status(two_id, "inactive")
    assert provider.identify(_cred(), Secret(one)) == one_id, "only one of them is active"
    unknown = "sk-ant-api03-" + "q" * 95
    assert provider.identify(_cred(), Secret(unknown)) is None, "no key fits"
    assert one not in caplog.text and unknown not in caplog.text


def test_identify_needs_the_key_to_work(fake_anthropic: FakeAnthropicAdmin,
                                        provider: AnthropicProvider) -> None:
    key_id, value = fake_anthropic.seed_key("mine")
    # A key that fits the hint but is not the key: same head and tail, different middle.
    impostor = value[:16] + "Z" * (len(value) - 20) + value[-4:]
    assert provider.identify(_cred(), Secret(impostor)) is None
    assert provider.identify(_cred(), Secret(value)) == key_id


def test_identify_within_a_workspace_or_a_pinned_key(
        fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    mine, other = fake_anthropic.add_workspace("mine"), fake_anthropic.add_workspace("other")
    key_id, value = fake_anthropic.seed_key("agent", workspace_id=other)
    assert provider.identify(_cred(workspace_id=mine), Secret(value)) is None
    assert provider.identify(_cred(workspace_id=other), Secret(value)) == key_id
    assert provider.identify(_cred(key_id=key_id), Secret(value)) == key_id
    second_id, _ = fake_anthropic.seed_key("second")
    assert provider.identify(_cred(key_id=second_id), Secret(value)) is None, \
        "a pinned key_id whose hint does not fit the vault's key is not believed"
    assert provider.identify(_cred(key_id="apikey_01Missing0000000000000"), Secret(value)) is None


# -- settings and params -------------------------------------------------------------------------


def test_settings_and_params_validation() -> None:
    with pytest.raises(ValidationError, match="base_url"):
        AnthropicSettings(admin_key={"env": ADMIN_ENV}, base_url="api.anthropic.com")
    with pytest.raises(ValidationError, match="apikey_01"):
        AnthropicParams(key_id="key-123")
    with pytest.raises(ValidationError, match="wrkspc_01"):
        AnthropicParams(workspace_id="default")
    with pytest.raises(ValidationError, match="secrets never go in the policy file"):
        AnthropicSettings(admin_key="sk-ant-admin01-pasted")  # type: ignore[arg-type]
    assert AnthropicSettings(admin_key={"env": ADMIN_ENV}).base_url == "https://api.anthropic.com"


def _policy(tmp: Path, manual_only: bool, params: dict[str, Any] | None = None) -> str:
    cred: dict[str, Any] = {
        "name": "research-agent/anthropic", "agent": "research-agent", "provider": "anthropic",
        "vault": "main", "path": "agents/research-agent/anthropic", "field": "ANTHROPIC_API_KEY",
        "params": params or {}}
    if manual_only:
        cred["manual_only"] = True
    return tomli_w.dumps({
        "rotator": {"state_url": f"sqlite:///{tmp / 'state.db'}"},
        "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:8200",
                            "token_env": "VAULT_TOKEN"}},
        "providers": {"anthropic": {"type": "anthropic", "admin_key": {"env": ADMIN_ENV}}},
        "credentials": [cred]})


@pytest.mark.usefixtures("http_provider_types")
def test_check_says_scheduled_rotation_is_impossible(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policies(_policy(tmp_path, manual_only=False), tmp_path / "p.toml")
    [problem] = caught.value.problems
    text = str(problem)
    assert "credentials[0].provider" in text
    assert "cannot create keys" in text and "scheduled rotation is impossible" in text
    assert "manual_only = true" in text and "rotator rotate-now --revoke-first" in text
    policies = parse_policies(_policy(tmp_path, manual_only=True), tmp_path / "p.toml")
    assert policies.credentials[0].manual_only
    with pytest.raises(ConfigError) as bad:
        parse_policies(_policy(tmp_path, True, {"key_id": "nope", "workspace": "x"}),
                       tmp_path / "p.toml")
    keys = sorted(p.key for p in bad.value.problems)
    assert keys == ["credentials[0].params.key_id", "credentials[0].params.workspace"]


# -- the whole emergency, through the engine -----------------------------------------------------


@pytest.mark.usefixtures("http_provider_types")
def test_revoke_first_kills_the_key_in_the_vault(tmp_path: Path, openbao: Any,
                                                 fake_anthropic: FakeAnthropicAdmin,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from rotator.config import load_policies
    from rotator.engine import Engine, RotationRequest
    from rotator.runtime import Runtime
    from rotator.state.store import StateStore

    workspace = fake_anthropic.add_workspace("agents")
    key_id, value = fake_anthropic.seed_key("research-agent", workspace_id=workspace)
    _, bystander = fake_anthropic.seed_key("other-agent", workspace_id=workspace)
    path = f"t{tmp_path.name[-12:]}/research-agent/anthropic"
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=path, secret={"ANTHROPIC_API_KEY": value, "OTHER": "keep"}, mount_point="secret")
    text = _policy(tmp_path, True, {"workspace_id": workspace}).replace(
        "agents/research-agent/anthropic", path).replace("http://127.0.0.1:8200", openbao.url)
    config = tmp_path / "rotation-policies.toml"
    config.write_text(text.replace('[providers.anthropic]\n',
                                   f'[providers.anthropic]\nbase_url = "{fake_anthropic.url}"\n'))
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    monkeypatch.setenv(ADMIN_ENV, fake_anthropic.admin_key)
    policies = load_policies(config)
    store, runtime = StateStore(policies.settings.state_url), Runtime(policies)
    engine = Engine(policies, runtime, store)
    try:
        engine.sync_credentials()
        result = engine.rotate(RotationRequest(credential="research-agent/anthropic",
                                               trigger="emergency", revoke_mode="first"))
        rotation = engine.store.rotation(result.rotation_id)
    finally:
        engine.close()
        runtime.close()
        store.close()
    assert result.outcome == "success", result.message
    assert rotation.old_key_id == key_id, "identified through the partial key hint"
    assert fake_anthropic.key(key_id)["status"] == "inactive"
    assert not fake_anthropic.is_valid(value), "the abused key is dead"
    assert fake_anthropic.is_valid(bystander), "nothing else was touched"
    assert value not in result.message



# -- per-key usage (misuse monitoring) -----------------------------------------------------------


def test_usage_report_counts_tokens_per_key_over_every_page(
        fake_anthropic: FakeAnthropicAdmin, provider: AnthropicProvider) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    import httpx

    mine, value = fake_anthropic.seed_key("research-agent")
    other, _ = fake_anthropic.seed_key("other-agent")
    now = time.time()
    fake_anthropic.record_usage(mine, now - 5 * 3600, input_tokens=300, output_tokens=30)
    fake_anthropic.record_usage(other, now - 5 * 3600, input_tokens=999)
    answer = httpx.post(f"{fake_anthropic.url}/v1/messages", timeout=10,
                        headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
                        json={"model": "claude-sonnet-4-5", "max_tokens": 10,
                              "messages": [{"role": "user", "content": "hello there"}]})
    assert answer.status_code == 200, answer.text
    provider.usage_key_batch = 1  # one request per key: batches are followed too
    hour = timedelta(hours=1)
    start = datetime.fromtimestamp(now, UTC) - 6 * hour
    buckets = provider.usage([mine], start, datetime.fromtimestamp(now, UTC) + hour, hour)
    assert {b.key_id for b in buckets} == {mine}, "only the key asked for"
    assert all(b.requests is None for b in buckets), "the report counts no requests"
    assert sorted(b.tokens for b in buckets) == [2 + 5, 330]
    fake_anthropic.set_status(mine, "inactive")
    refused = httpx.post(f"{fake_anthropic.url}/v1/messages", timeout=10,
                         headers={"x-api-key": value, "anthropic-version": "2023-06-01"},
                         json={"model": "claude-sonnet-4-5", "messages": []})
    assert refused.status_code == 401, "a revoked key is refused"
    with pytest.raises(PermanentError, match="1m, 1h or 1d"):
        provider.usage([mine], start, start + hour, timedelta(minutes=5))


def test_usage_report_pages_are_followed(fake_anthropic: FakeAnthropicAdmin,
                                         provider: AnthropicProvider) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    key_id, _ = fake_anthropic.seed_key("research-agent")
    now = time.time()
    for day in range(1, 40):  # more 1d buckets than one page holds (31)
        fake_anthropic.record_usage(key_id, now - day * 86400, input_tokens=day)
    day = timedelta(days=1)
    buckets = provider.usage([key_id], datetime.fromtimestamp(now, UTC) - 41 * day,
                             datetime.fromtimestamp(now, UTC), day)
    assert sorted(b.tokens for b in buckets) == [d + 10 for d in range(1, 40)]
