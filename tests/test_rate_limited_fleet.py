"""A fleet rotated against a provider whose admin key is rate limited: 429s slow rotations
down to the provider's rate, they never fail one, and the operator sees the throttling."""

from __future__ import annotations

import json
import threading
import time

import pytest

from rotator.engine import RotationRequest, RotationResult
from rotator.metrics import Metrics
from rotator.pacing import Ticket
from tests.support import fleet_engine, make_fleet


@pytest.fixture(autouse=True)
def _vault_token(openbao, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)


def test_rotate_now_all_at_the_rate_limit_fails_nothing(tmp_path, openbao, fake_openai):
    """30 credentials on 30 threads against 15 admin requests/s: far more calls are ready than
    the provider allows, for longer than ``retry_deadline`` (2 s), and every rotation still
    succeeds: waiting for the rate limit is not counted against the deadline."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=30, settings={"retry_deadline": "2s"})
    fake_openai.set_rate_limit(15, burst=5)
    assert fleet.cli("rotate-now", "--all", "--concurrency", "0", "--yes").returncode == 2
    result = fleet.cli("rotate-now", "--all", "--revoke-first", "--concurrency", "30",
                       "--reason", "drill", "--yes", "--json", timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["failed"] == 0 and report["succeeded"] == 30
    assert fake_openai.rate_limited_count > 0, "the fleet did reach the limit"
    fleet.assert_settled()
    for cred in fleet.credentials:
        assert not any(k["id"] == fleet.legacy_keys[cred["name"]] for k in fleet.live_keys(cred))
    # Paced, the fleet mostly waited its turn instead of being refused.
    admin_calls = sum(1 for a in fake_openai.answered() if "/organization/" in a.target)
    assert fake_openai.rate_limited_count < admin_calls / 2
    assert "rate limiting (429)" in result.stderr
    assert result.stderr.count("rate limiting (429)") <= 3, "logged per episode, not per call"


def test_throttles_are_counted_and_the_paced_rate_shown(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    fake_openai.inject_fault(429, count=2, path_contains="/service_accounts/", method="POST",
                             retry_after=0.05)
    with fleet_engine(fleet) as (engine, runtime):
        metrics = Metrics(engine.store, lambda: engine.policies)
        engine.call_observers.append(metrics.on_call)
        for cred in fleet.credentials:
            result = engine.rotate(RotationRequest(credential=cred["name"], trigger="manual"))
            assert result.ok, result.message
    sample = metrics.registry.get_sample_value
    assert sample("rotator_provider_throttled_total", {"provider": "openai-test"}) == 2
    rate = sample("rotator_provider_paced_rate", {"provider": "openai-test"})
    assert rate is not None and rate > 0
    assert runtime.pacer("openai-test").throttles == 2
    # A 429 refused the create unheard: no search for a key it might have made.
    assert fake_openai.request_count("GET", "/api_keys?") <= 2, "only identify's listings"


def _rotate_first_behind_429s(fleet, fake_openai, *, count: int, path: str, method: str,
                              retry_after: float) -> RotationResult:
    """Rotate the fleet's first credential in process while the fake answers ``count`` calls
    to ``path`` with 429 and ``Retry-After``."""
    fake_openai.inject_fault(429, count=count, path_contains=path, method=method,
                             retry_after=retry_after)
    with fleet_engine(fleet) as (engine, _):
        return engine.rotate(RotationRequest(credential=fleet.credentials[0]["name"],
                                             trigger="manual"))


def test_waiting_on_429s_longer_than_retry_deadline_does_not_fail(tmp_path, openbao,
                                                                  fake_openai):
    """Five 429s in a row with Retry-After 0.4 s: 2 s of waiting against a 1 s deadline."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, settings={"retry_deadline": "1s"})
    result = _rotate_first_behind_429s(fleet, fake_openai, count=5, path="/service_accounts/",
                                       method="POST", retry_after=0.4)
    assert result.ok, result.message
    assert fake_openai.request_count("POST", "/service_accounts/") == 6
    fleet.assert_settled()


def test_429s_on_the_new_keys_check_are_not_among_its_attempts(tmp_path, openbao, fake_openai):
    """Verify tries a new key a few times (it may take a moment to work); eight 429s in a row
    on that check are the rate limit, not a broken key: the rotation still succeeds."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, settings={"retry_deadline": "1s"})
    result = _rotate_first_behind_429s(fleet, fake_openai, count=8, path="/v1/models",
                                       method="GET", retry_after=0.05)
    assert result.ok, result.message
    assert fake_openai.request_count("GET", "/v1/models") >= 9
    fleet.assert_settled()


def test_a_wait_for_the_rate_limit_ends_when_the_daemon_stops(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    results: list[RotationResult] = []
    with fleet_engine(fleet) as (engine, runtime):
        pacer = runtime.pacer("openai-test")
        pacer.throttled(Ticket(pacer.clock(), 0), retry_after=50)  # every worker holds 50 s
        worker = threading.Thread(target=lambda: results.append(engine.rotate(RotationRequest(
            credential=fleet.credentials[0]["name"], trigger="manual"))))
        worker.start()
        time.sleep(1)
        stopped = time.monotonic()
        engine.stop_event.set()
        worker.join(10)
        assert time.monotonic() - stopped < 3, "the wait ended within a sleep slice"
    [result] = results
    assert result.outcome == "interrupted", result.message
    assert fake_openai.request_count("POST") == 0, "nothing was sent while held"
