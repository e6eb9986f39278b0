"""Misuse monitoring (issue 14): the usage poller against the fake OpenAI's usage records, with
synthetic traffic and one clock shared by rotator and the fake, so baselines of days and quiet
periods of minutes take no waiting."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from rotator.app import App
from rotator.config import load_policies
from rotator.engine import RotationRequest
from rotator.metrics import Metrics
from rotator.monitor.poller import UsageMonitor
from rotator.testing.agent import SampleAgent
from tests.support import Fleet, make_fleet

DAY = 86400


@pytest.fixture(autouse=True)
def _vault_token(monkeypatch, openbao):
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)


@dataclass
class Clock:
    """Wall-clock time plus an offset the test moves forward: rotator and the fake share it."""

    offset: float = 0.0

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    def unix(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextmanager
def monitoring(fleet: Fleet | Path, clock: Clock | None = None
               ) -> Iterator[tuple[App, UsageMonitor, Metrics]]:
    """The app and usage monitor of a policy file, with ``clock`` shared with the fake."""
    clock = clock or Clock()
    if isinstance(fleet, Fleet):
        fleet.fake.clock = clock.unix
    policies = load_policies(fleet.config if isinstance(fleet, Fleet) else fleet)
    app = App(policies, actor="test", clock=clock.now)
    app.engine.sync_credentials()
    metrics = Metrics(app.store, lambda: app.policies)
    metrics.prime(policies)
    monitor = UsageMonitor(app, clock.now, listeners=[metrics.on_misuse],
                           on_usage=metrics.on_usage)
    try:
        yield app, monitor, metrics
    finally:
        app.close(1.0)


def _policy(settings: dict[str, Any] | None = None, **cred: Any) -> dict[str, Any]:
    def extra(doc: dict[str, Any]) -> None:
        for c in doc["credentials"]:
            c.update(cred)
    return {"settings": {"usage_poll_interval": "1s", **(settings or {})}, "extra": extra}


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_key_used_4x_its_baseline_fires_the_spike_rule_in_one_poll(tmp_path, openbao,
                                                                      fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, **_policy())
    cred = fleet.credentials[0]
    key = fleet.legacy_keys[cred["name"]]
    now = time.time()
    for day in range(1, 8):  # a week of habit: 100 calls a day
        fake_openai.record_usage(key, now - day * DAY - 3600, requests=100, input_tokens=1000)
    with monitoring(fleet) as (app, monitor, metrics):
        quiet = monitor.poll("openai-test")
        assert quiet.outcome == "ok" and quiet.findings == [], "its usual day is no anomaly"
        fake_openai.record_usage(key, now - 60, requests=400, input_tokens=4000)
        polled = monitor.poll("openai-test")
        [finding] = polled.findings
        assert finding.rule == "spike" and finding.action == "alert" and finding.key_id == key
        assert finding.figures["requests_last_24h"] == 400
        assert finding.figures["requests_daily_average"] == 100
        assert "4.0x the daily average of 100" in finding.message
        assert monitor.poll("openai-test").findings == [], "one incident, one alert"
        [anomaly] = app.store.anomalies(credential=cred["name"])
        assert anomaly.rule == "spike" and anomaly.agent == cred["agent"]
        events = [e for e in app.store.audit_events() if e["kind"] == "misuse"]
        assert len(events) == 1 and json.loads(events[0]["detail"])["rule"] == "spike"
        labels = {"credential": cred["name"], "agent": cred["agent"],
                  "provider": "openai-test"}
        assert _sample(metrics, "rotator_key_requests_total", **labels) == 400
        assert _sample(metrics, "rotator_misuse_anomalies_total", rule="spike",
                       action="alert", **labels) == 1
        assert app.store.credential(cred["name"]).last_rotated_at is None, "alert only"


def test_the_revoke_action_kills_the_key_and_the_agent_keeps_working(tmp_path, openbao,
                                                                     fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h",
                       health={"type": "http", "url": "http://127.0.0.1:9/placeholder",
                               "expect_json": {"key_id": "{key_id}"}, "attempts": 20,
                               "delay": "1s", "timeout": "2s"},
                       **_policy(misuse={"spike": {"action": "revoke"}}))
    cred = fleet.credentials[0]
    leaked = fleet.vault_value(cred)
    key = fleet.legacy_keys[cred["name"]]
    now = time.time()
    for day in range(1, 8):
        fake_openai.record_usage(key, now - day * DAY, requests=100)
    with SampleAgent(vault_url=openbao.url, vault_token=openbao.root_token, path=cred["path"],
                     field=cred["field"], provider_base_url=fake_openai.base_url,
                     period=0.05) as agent:
        fleet.config.write_text(fleet.config.read_text().replace(
            "http://127.0.0.1:9/placeholder", agent.health_url))
        with monitoring(fleet) as (app, monitor, _metrics):
            fake_openai.record_usage(key, now - 60, requests=450)  # someone found the key
            [finding] = monitor.poll("openai-test").findings
            assert finding.rule == "spike" and finding.action == "revoke"
            state = app.store.credential(cred["name"])
            assert state.current_key_id not in (None, key), "rotated"
            [rotation] = app.store.rotations(cred["name"], limit=1)
            assert rotation.trigger == "emergency" and rotation.revoke_mode == "immediately"
            assert rotation.outcome == "success" and "misuse (spike)" in rotation.reason
            [anomaly] = app.store.anomalies(credential=cred["name"])
            assert anomaly.rotation_id == rotation.id
        assert not fake_openai.is_valid(leaked), "the leaked key is dead at the provider"
        assert fake_openai.is_valid(fleet.vault_value(cred))
        deadline = time.monotonic() + 10
        while agent.last_key_id != state.current_key_id and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.last_key_id == state.current_key_id
        assert agent.rejections == 0, agent.rejected_at
        assert agent.successes > 0


def test_an_old_key_used_after_the_agent_switched_is_flagged_naming_the_agent(
        tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h", **_policy())
    cred = fleet.credentials[0]
    old = fleet.legacy_keys[cred["name"]]
    clock = Clock()
    with monitoring(fleet, clock) as (app, monitor, _metrics):
        fake_openai.record_usage(old, clock.unix() - 300, requests=20)  # the agent, before
        assert app.engine.rotate(RotationRequest(cred["name"], trigger="manual")).ok
        new = app.store.credential(cred["name"]).current_key_id
        assert monitor.poll("openai-test").findings == [], "no use after the switch yet"
        clock.advance(60)
        fake_openai.record_usage(new, clock.unix(), requests=3)  # the agent reloaded
        clock.advance(120)
        fake_openai.record_usage(old, clock.unix(), requests=7)  # ...but the old key is used
        clock.advance(90)
        [finding] = monitor.poll("openai-test").findings
        assert finding.rule == "old_key" and finding.key_id == old
        assert f"after {cred['agent']} switched to key {new}" in finding.message
        assert finding.figures["requests"] == 7
        assert monitor.poll("openai-test").findings == []


def test_revoke_when_quiet_revokes_early_and_names_a_straggler(tmp_path, openbao,
                                                               fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2, grace="30m",
                       **_policy(revoke_when="quiet", quiet_for="2m"))
    fast, slow = fleet.credentials
    clock = Clock()
    with monitoring(fleet, clock) as (app, monitor, _metrics):
        olds = {}
        for cred in (fast, slow):
            olds[cred["name"]] = fleet.vault_value(cred)
            assert app.engine.rotate(RotationRequest(cred["name"], trigger="manual")).ok
        grace_ends = clock.now() + timedelta(minutes=30)
        news = {c["name"]: app.store.credential(c["name"]).current_key_id for c in (fast, slow)}
        findings = []
        for minute in range(3):  # both agents work on their new keys; the slow one's straggler
            clock.advance(60)      # replica keeps using the old key
            for cred in (fast, slow):
                fake_openai.record_usage(news[cred["name"]], clock.unix(), requests=2)
            fake_openai.record_usage(fleet.legacy_keys[slow["name"]], clock.unix(), requests=1)
            result = monitor.poll("openai-test")
            findings += result.findings
            revoked = app.engine.revoke_due(fast["name"])
            assert revoked == (1 if minute == 1 else 0), f"minute {minute}: {revoked}"
            if minute == 1:
                assert result.revoked_early == [fleet.legacy_keys[fast["name"]]]
        assert not fake_openai.is_valid(olds[fast["name"]]), "quiet: revoked before the grace"
        assert clock.now() < grace_ends - timedelta(minutes=25)
        assert fake_openai.is_valid(olds[slow["name"]]), "a straggler is not cut off blind"
        reason = app.engine.due_decision(slow["name"])
        assert reason.reason == "in_grace" and "unused for 2m, at the latest" in \
            reason.message, reason.message
        [pending] = app.store.pending_revocations(credential=slow["name"])
        assert abs((pending.not_before - grace_ends).total_seconds()) < 5
        [straggler] = [f for f in findings if f.rule == "straggler"]
        assert straggler.key_id == fleet.legacy_keys[slow["name"]]
        assert straggler.message.startswith(f"{slow['agent']} still uses old key")
        assert "grace period ends" in straggler.message
        assert {f.rule for f in findings} == {"straggler", "old_key"}, \
            "the straggler's calls after the switch are also flagged as old-key use"
        clock.advance(25 * 60)
        fake_openai.record_usage(fleet.legacy_keys[slow["name"]], clock.unix(), requests=1)
        assert monitor.poll("openai-test").findings == [], "named once"
        assert app.engine.revoke_due(slow["name"]) == 0, "not before the grace bound"
        assert fake_openai.is_valid(olds[slow["name"]])
        clock.advance(5 * 60)
        assert app.engine.revoke_due(slow["name"]) == 1, "revoked at the grace bound"
        assert not fake_openai.is_valid(olds[slow["name"]])


def test_a_rate_limited_poll_backs_off_and_touches_nothing(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, **_policy())
    with monitoring(fleet) as (app, monitor, _metrics):
        fake_openai.inject_fault(429, path_contains="usage", retry_after=30)
        [result] = monitor.poll_due()
        assert result.outcome == "rate_limited"
        state = app.store.usage_poll("openai-test")
        assert state.failures == 1 and "rate limit" in (state.last_error or "").lower()
        assert state.next_poll_at >= datetime.now(UTC) + timedelta(seconds=25)
        assert monitor.poll_due() == [], "not before Retry-After"
        assert app.store.rotations() == []


def test_key_ttl_makes_every_new_key_expire_at_the_provider(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, interval="30d", grace="1h",
                       **_policy(key_ttl="35d"))
    cred = fleet.credentials[0]
    clock = Clock()
    with monitoring(fleet, clock) as (app, _monitor, metrics):
        started = time.time()
        assert app.engine.rotate(RotationRequest(cred["name"], trigger="manual")).ok
        new = app.store.credential(cred["name"]).current_key_id
        [key] = [k for k in fleet.live_keys(cred) if k["id"] == new]
        assert started + 35 * DAY - 5 <= key["expires_at"] <= time.time() + 35 * DAY + 1
        page = metrics.render().decode()
        [line] = [ln for ln in page.splitlines()
                  if ln.startswith("rotator_credential_key_expiry_timestamp_seconds{")]
        assert f'credential="{cred["name"]}"' in line
        assert abs(float(line.rsplit(" ", 1)[1]) - key["expires_at"]) < 60
        value = fleet.vault_value(cred)
        assert fake_openai.is_valid(value)
        clock.advance(35 * DAY + 60)  # the daemon died and nothing rotated it: it dies anyway
        assert not fake_openai.is_valid(value)


@pytest.mark.usefixtures("http_provider_types")
def test_anthropic_token_spike_revokes_the_key_first(tmp_path, openbao, fake_anthropic,
                                                     monkeypatch):
    """Anthropic's report counts tokens only and its keys cannot be created by API: the spike
    rule judges tokens, and its revoke action kills the key at once (revoke-first)."""
    key_id, value = fake_anthropic.seed_key("research-agent")
    path = f"t{tmp_path.name[-12:]}/research-agent/anthropic"
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=path, secret={"ANTHROPIC_API_KEY": value}, mount_point="secret")
    config = tmp_path / "rotation-policies.toml"
    config.write_text(tomli_w.dumps({
        "rotator": {"state_url": f"sqlite:///{tmp_path / 'state.db'}",
                    "usage_poll_interval": "1s"},
        "vaults": {"main": {"type": "vault", "url": openbao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {"anthropic": {"type": "anthropic", "base_url": fake_anthropic.url,
                                    "admin_key": {"env": "ANTHROPIC_ADMIN_KEY"}}},
        "credentials": [{"name": "research-agent/anthropic", "agent": "research-agent",
                         "provider": "anthropic", "vault": "main", "path": path,
                         "field": "ANTHROPIC_API_KEY", "manual_only": True,
                         "misuse": {"spike": {"action": "revoke"}}}]}))
    monkeypatch.setenv("ANTHROPIC_ADMIN_KEY", fake_anthropic.admin_key)
    now = time.time()
    for day in range(1, 8):
        fake_anthropic.record_usage(key_id, now - day * DAY, input_tokens=200_000)
    with monitoring(config) as (app, monitor, metrics):
        assert monitor.poll("anthropic").findings == []
        fake_anthropic.record_usage(key_id, now - 120, input_tokens=900_000)
        [finding] = monitor.poll("anthropic").findings
        assert finding.rule == "spike" and finding.key_id == key_id
        assert "tokens in the last 24h" in finding.message
        [rotation] = app.store.rotations("research-agent/anthropic", limit=1)
        assert rotation.revoke_mode == "first" and rotation.outcome == "success"
        labels = {"credential": "research-agent/anthropic", "agent": "research-agent",
                  "provider": "anthropic"}
        assert _sample(metrics, "rotator_key_tokens_total", **labels) >= 900_000
    assert not fake_anthropic.is_valid(value), "the abused key is dead"
