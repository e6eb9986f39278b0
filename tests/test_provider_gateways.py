"""The AI-gateway providers (``openrouter``, ``litellm``) through the engine with a real OpenBao:
rotation without an outage for an agent reading the vault, each new key carrying the
credential's budget and expiry, a looping agent stopped at its own limit, and per-key usage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from pydantic import ValidationError

from rotator.app import App
from rotator.config import load_policies, parse_policies
from rotator.engine import RotationRequest
from rotator.errors import ConfigError
from rotator.monitor.poller import UsageMonitor
from rotator.testing.agent import SampleAgent
from rotator.testing.fake_litellm import FakeLiteLLM
from rotator.testing.fake_openrouter import FakeOpenRouter

NAME = "research-agent/gateway"


@dataclass
class Gateway:
    """One provider under test: its fake, how the policy names it, how an agent calls it."""

    kind: str
    fake: Any
    settings: dict[str, Any]
    env: dict[str, str]
    agent_base_url: str
    probe_path: str
    legacy: tuple[str, str]

    def is_valid(self, value: str) -> bool:
        return bool(self.fake.is_valid(value))

    def spend(self, value: str, most: int = 200) -> int:
        """Call the model with ``value`` until the service refuses (at most ``most`` times);
        the calls that worked."""
        url = (f"{self.fake.base_url}/chat/completions" if self.kind == "openrouter"
               else f"{self.fake.url}/v1/chat/completions")
        for calls in range(most):
            answer = httpx.post(url, headers={"Authorization": f"Bearer {value}"}, timeout=10,
                                json={"model": "m", "messages": [{"role": "user",
                                                                  "content": "loop"}]})
            if answer.status_code != 200:
                assert answer.status_code in (400, 402), answer.text
                assert "xceeded" in answer.text or "limit" in answer.text
                return calls
        return most


@pytest.fixture(params=["openrouter", "litellm"])
def gateway(request, fake_openrouter: FakeOpenRouter, fake_litellm: FakeLiteLLM) -> Gateway:
    if request.param == "openrouter":
        return Gateway("openrouter", fake_openrouter,
                       {"base_url": fake_openrouter.base_url,
                        "management_key": {"env": "GATEWAY_ADMIN_KEY"}},
                       {"GATEWAY_ADMIN_KEY": fake_openrouter.management_key},
                       fake_openrouter.base_url, "/key", fake_openrouter.seed_key("legacy"))
    return Gateway("litellm", fake_litellm,
                   {"base_url": fake_litellm.url, "master_key": {"env": "GATEWAY_ADMIN_KEY"}},
                   {"GATEWAY_ADMIN_KEY": fake_litellm.master_key},
                   f"{fake_litellm.url}/v1", "/models", fake_litellm.seed_key("legacy"))


@contextmanager
def gateway_app(tmp_path: Path, openbao: Any, gw: Gateway, monkeypatch: pytest.MonkeyPatch,
                **cred: Any) -> Iterator[tuple[App, str]]:
    path = f"t{tmp_path.name[-10:]}/{gw.kind}"
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=path, secret={"GATEWAY_KEY": gw.legacy[1]}, mount_point="secret")
    config = tmp_path / "rotation-policies.toml"
    config.write_text(tomli_w.dumps({
        "rotator": {"state_url": f"sqlite:///{tmp_path / 'state.db'}", "jitter": "0s",
                    "retry_deadline": "10s", "usage_poll_interval": "1s"},
        "vaults": {"main": {"type": "vault", "url": openbao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {"gw": {"type": gw.kind, **gw.settings}},
        "credentials": [{"name": NAME, "agent": "research-agent", "provider": "gw",
                         "vault": "main", "path": path, "field": "GATEWAY_KEY",
                         "interval": "30d", "grace": "2s", **cred}]}))
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    for name, value in gw.env.items():
        monkeypatch.setenv(name, value)
    app = App(load_policies(config), actor="test")
    app.engine.sync_credentials()
    try:
        yield app, path
    finally:
        app.close(1.0)


def _rotate(app: App) -> None:
    result = app.engine.rotate(RotationRequest(NAME, trigger="manual"))
    assert result.ok, result.message


def test_rotation_has_no_outage_and_every_key_carries_budget_and_expiry(
        tmp_path, openbao, gateway: Gateway, monkeypatch) -> None:
    with gateway_app(tmp_path, openbao, gateway, monkeypatch, key_ttl="35d",
                     budget={"usd": 0.01, "per": "day"}) as (app, path):
        agent = SampleAgent(vault_url=openbao.url, vault_token=openbao.root_token, path=path,
                            field="GATEWAY_KEY", provider_base_url=gateway.agent_base_url,
                            period=0.05, probe_path=gateway.probe_path)
        with agent:
            for _ in range(2):
                _rotate(app)
                time.sleep(2.5)
                assert app.engine.revoke_due(NAME) == 1, "the old key revoked after its grace"
            time.sleep(0.3)
        assert agent.rejections == 0, agent.rejected_at
        assert agent.successes > 10
        assert not gateway.is_valid(gateway.legacy[1]), "the adopted key was revoked"
        value = openbao.client().secrets.kv.v2.read_secret_version(
            path=path, mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]["GATEWAY_KEY"]
        key_id = app.store.credential(NAME).current_key_id
        shown = gateway.fake.key(key_id)
        expires = shown["expires_at" if gateway.kind == "openrouter" else "expires"]
        expires_at = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        assert abs(expires_at - (datetime.now(UTC) + timedelta(days=35))) < timedelta(minutes=2)
        if gateway.kind == "openrouter":
            assert shown["limit"] == 0.01 and shown["limit_reset"] == "daily"
        else:
            assert shown["max_budget"] == 0.01 and shown["budget_duration"] == "1d"
            assert shown["metadata"]["rotator_credential"] == NAME
    # A looping agent stops at its own limit: 0.01 USD at the fake's price per call.
    price = gateway.fake.price_per_call
    assert gateway.spend(value) == round(0.01 / price)
    assert gateway.spend(gateway.fake.seed_key("another-agent")[1]) == 200, \
        "another agent's key is not held back by this one's budget"


def test_usage_is_reported_per_key_and_fires_the_daily_cap(tmp_path, openbao, gateway: Gateway,
                                                          monkeypatch) -> None:
    key_id, value = gateway.legacy
    record: Callable[..., None] = (gateway.fake.record_spend)
    now = time.time()
    record(key_id, now - 3 * 86400, 0.5)  # the past is only known where the service keeps it
    with gateway_app(tmp_path, openbao, gateway, monkeypatch,
                     misuse={"daily_cap": {"cost": 0.004}, "spike": {"action": "off"}}
                     ) as (app, _path):
        monitor = UsageMonitor(app, lambda: datetime.now(UTC))
        assert monitor.poll("gw").findings == []
        assert gateway.spend(value, most=20) == 20, "the adopted key has no limit"
        [finding] = monitor.poll("gw").findings
        assert finding.rule == "daily_cap" and finding.figures["over"] == "cost"
        assert finding.figures["cost"] >= 0.004
        rows = app.store.usage(credentials=[NAME], since=datetime.now(UTC) - timedelta(days=5))
        assert rows and all(r.key_id == key_id for r in rows)
        if gateway.kind == "litellm":  # the spend logs give calls and tokens, minute by minute
            assert any(r.requests and r.tokens for r in rows)
            assert any(r.start < datetime.now(UTC) - timedelta(days=2) for r in rows)


def test_check_refuses_a_budget_the_provider_cannot_carry(tmp_path) -> None:
    base = {
        "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:8200",
                            "token_env": "VAULT_TOKEN"}},
        "providers": {"oa": {"type": "openai", "project_id": "proj_1",
                             "admin_key": {"env": "OPENAI_ADMIN_KEY"}},
                      "lite": {"type": "litellm", "base_url": "http://127.0.0.1:4000",
                               "master_key": {"env": "LITELLM_MASTER_KEY"}}},
        "credentials": [
            {"name": "a/openai", "agent": "a", "provider": "oa", "vault": "main",
             "path": "agents/a", "field": "K", "budget": {"usd": 5, "per": "day"},
             "params": {"service_account_id": "svc_1"}},
            {"name": "b/litellm", "agent": "b", "provider": "lite", "vault": "main",
             "path": "agents/b", "field": "K", "budget": {"usd": -1, "per": "hour"}}]}
    with pytest.raises(ConfigError) as caught:
        parse_policies(tomli_w.dumps(base), tmp_path / "p.toml")
    shown = {p.key: p.message for p in caught.value.problems}
    assert "cannot create keys with a spending limit" in shown["credentials[0].budget"]
    assert "greater than 0" in shown["credentials[1].budget.usd"]
    assert "'day', 'week' or 'month'" in shown["credentials[1].budget.per"]
    assert all(p.line for p in caught.value.problems), "every problem has its line"


def test_the_http_provider_reads_usage_records_described_in_toml(fake_litellm) -> None:
    """A service without a built-in provider: the LiteLLM proxy described in TOML, its spend
    logs as the usage call (one record per call, so ``requests_path = ""``)."""
    from providers.http.provider import HttpProvider
    from providers.http.settings import HttpSettings
    from rotator.interfaces import Secret

    settings = HttpSettings.model_validate({
        "base_url": fake_litellm.url,
        "secrets": {"master": {"env": "LITELLM_MASTER_KEY"}},
        "headers": ["Authorization: Bearer {secrets.master}"],
        "create": {"path": "/key/generate", "body": {"key_alias": "{key_name}"},
                   "id_path": "token_id", "secret_path": "key"},
        "revoke": {"method": "POST", "path": "/key/delete", "body": {"keys": ["{key_id}"]}},
        "usage": {"path": "/spend/logs",
                  "query": {"api_key": "{key_id}", "start_date": "{start_date}",
                            "end_date": "{end_date}"},
                  "key_id_path": "api_key", "start_path": "startTime", "requests_path": "",
                  "tokens_path": "total_tokens", "cost_path": "spend",
                  "widths": ["1h", "1m", "1d"]}})
    provider = HttpProvider("lite", settings, lambda ref: Secret(fake_litellm.master_key))
    token, _ = fake_litellm.seed_key("agent")
    other, _ = fake_litellm.seed_key("other")
    now = time.time()
    for minutes in (5, 4, 4):
        fake_litellm.record_spend(token, now - minutes * 60, 0.01, tokens=50)
    fake_litellm.record_spend(other, now - 60, 1.0)
    try:
        assert provider.usage_widths == (timedelta(minutes=1), timedelta(hours=1),
                                         timedelta(days=1))
        start = datetime.fromtimestamp(now, UTC) - timedelta(hours=1)
        buckets = provider.usage([token], start, start + timedelta(hours=2),
                                 timedelta(minutes=1))
        assert {b.key_id for b in buckets} == {token}
        assert sorted((b.requests, b.tokens) for b in buckets) == [(1, 50), (2, 100)]
        assert abs(sum(b.cost for b in buckets) - 0.03) < 1e-9
    finally:
        provider.close()
    with pytest.raises(ValidationError, match="requests_path, tokens_path or cost_path"):
        HttpSettings.model_validate({**settings.model_dump(mode="json"),
                                     "usage": {"path": "/spend/logs"}})
