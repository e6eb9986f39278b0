"""A ``/metrics`` scrape writes each credential's lines once and remembers them, and the due
gate remembers each answer (issue 16): a rotation recorded in the store, a reload and time
passing a due time or a window's edge must each show on the very next scrape, exactly as a
fresh page would."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import tomli_w

from rotator.config import Policies, parse_policies
from rotator.engine import Engine
from rotator.metrics import Metrics
from rotator.runtime import Runtime
from rotator.state.store import StateStore

START = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)  # a Monday, before the window opens


def _policies(tmp_path: Path, *, interval: str = "30d", window: str | None = None,
              count: int = 3) -> Policies:
    creds = []
    for i in range(count):
        cred = {"name": f"a{i}/openai", "agent": f"a{i}", "provider": "openai",
                "vault": "main", "path": f"agents/a{i}", "field": "OPENAI_API_KEY",
                "interval": interval, "grace": "1h",
                "params": {"service_account_id": f"svc_{i}"}}
        if window is not None:
            cred["window"] = window
        creds.append(cred)
    doc = {"rotator": {"state_url": f"sqlite:///{tmp_path / 'state.db'}", "jitter": "0s"},
           "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:1",
                               "token_env": "VAULT_TOKEN"}},
           "providers": {"openai": {"type": "openai", "project_id": "proj",
                                    "base_url": "http://127.0.0.1:1/v1",
                                    "admin_key": {"env": "OPENAI_ADMIN_KEY"}}},
           "credentials": creds}
    return parse_policies(tomli_w.dumps(doc), tmp_path / "rotation-policies.toml")


def _reasons(page: bytes) -> dict[str, str]:
    return {m[0].decode(): m[1].decode() for m in re.findall(
        rb'rotator_credential_due_reason\{[^}]*credential="([^"]+)"[^}]*reason="(\w+)"', page)}


def _last(page: bytes) -> dict[str, float]:
    return {m[0].decode(): float(m[1]) for m in re.findall(
        rb'rotator_credential_last_rotation_timestamp_seconds\{[^}]*credential="([^"]+)"'
        rb'[^}]*\} (\S+)', page)}


class _Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def test_time_a_rotation_and_a_reload_each_show_on_the_next_scrape(tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "t")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "k")
    policies = _policies(tmp_path, window="Mon-Fri 09:00-17:00 UTC")
    store = StateStore(policies.settings.state_url, create=True)
    clock = _Clock()
    engine = Engine(policies, Runtime(policies), store, clock=clock)
    engine.sync_credentials()
    current = {"policies": policies}
    metrics = Metrics(store, lambda: current["policies"], due=engine.due_decisions)
    try:
        page = metrics.render()
        assert set(_reasons(page).values()) == {"outside_window"}
        assert metrics.render() == page  # remembered, and the same

        clock.now = START.replace(hour=9)  # the window opens
        assert set(_reasons(metrics.render()).values()) == {"never_rotated"}

        # A rotation finishes (as the engine records it): its time and reason change.
        store.update_credential("a1/openai", last_rotated_at=clock.now,
                                next_due_at=clock.now + timedelta(days=30),
                                current_key_id="key_1")
        page = metrics.render()
        assert _reasons(page)["a1/openai"] == "not_due"
        assert _reasons(page)["a0/openai"] == "never_rotated"
        assert _last(page) == {"a1/openai": clock.now.timestamp()}

        # Time passes a due time: interval elapsed (the window is open on a Wednesday).
        clock.now = START.replace(day=6, hour=10) + timedelta(days=28)
        assert _reasons(metrics.render())["a1/openai"] == "interval_elapsed"
        clock.now = clock.now.replace(hour=17)  # and the window closes
        assert _reasons(metrics.render())["a1/openai"] == "outside_window"

        # A reload: no window, a longer interval, one credential fewer.
        reloaded = _policies(tmp_path, interval="60d", count=2)
        engine.use(reloaded, Runtime(reloaded))
        current["policies"] = reloaded
        page = metrics.render()
        assert _reasons(page) == {"a0/openai": "never_rotated", "a1/openai": "not_due"}
        assert "a2/openai" not in page.decode()
        assert b'rotator_credential_max_age_seconds{agent="a0",credential="a0/openai",' \
               b'provider="openai"} 5184000.0' in page
    finally:
        store.close()
