"""The fake OpenAI Admin API's rate limit on the admin key, and latency that never queues.

The fleet-emergency benchmark and the pacing tests rely on the fake behaving like a real
rate-limited API: a token bucket per admin key, 429 in OpenAI's shape with ``retry-after-ms``
and ``retry-after`` above it, ``x-ratelimit-*`` headers on every answer, other keys untouched.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from rotator.testing.fake_openai import FakeOpenAIServer, _go_duration


@pytest.fixture
def project(fake_openai: FakeOpenAIServer) -> str:
    return fake_openai.add_project()


def _admin(fake: FakeOpenAIServer) -> httpx.Client:
    return httpx.Client(base_url=fake.base_url, timeout=5,
                        headers={"Authorization": f"Bearer {fake.admin_key}"})


def test_no_limit_by_default(fake_openai: FakeOpenAIServer, project: str) -> None:
    with _admin(fake_openai) as client:
        answers = [client.get(f"/organization/projects/{project}") for _ in range(30)]
    assert {a.status_code for a in answers} == {200}
    assert "x-ratelimit-limit-requests" not in answers[0].headers
    assert fake_openai.rate_limited_count == 0


def test_admin_key_limited_with_openai_error_and_headers(fake_openai: FakeOpenAIServer,
                                                         project: str) -> None:
    fake_openai.set_rate_limit(2, burst=3)
    with _admin(fake_openai) as client:
        answers = [client.get(f"/organization/projects/{project}") for _ in range(5)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    first = answers[0].headers
    assert first["x-ratelimit-limit-requests"] == "3"
    assert first["x-ratelimit-remaining-requests"] == "2"
    assert first["x-ratelimit-reset-requests"].endswith("ms")
    limited = next(a for a in answers if a.status_code == 429)
    error = limited.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "Rate limit reached" in error["message"] and error["param"] is None
    wait_ms = int(limited.headers["retry-after-ms"])
    assert 0 < wait_ms <= 500  # the next token of a 2/s bucket
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert fake_openai.rate_limited_count == sum(a.status_code == 429 for a in answers) >= 1
    time.sleep(wait_ms / 1000 + 0.05)
    with _admin(fake_openai) as client:
        assert client.get(f"/organization/projects/{project}").status_code == 200


def test_other_keys_are_not_limited(fake_openai: FakeOpenAIServer, project: str) -> None:
    sa = fake_openai.add_service_account(project)
    _, value = fake_openai.seed_key(project, sa)
    fake_openai.set_rate_limit(1, burst=1)
    for _ in range(5):
        answer = httpx.get(f"{fake_openai.base_url}/models", timeout=5,
                           headers={"Authorization": f"Bearer {value}"})
        assert answer.status_code == 200
    assert fake_openai.rate_limited_count == 0


def test_sustained_rate_is_the_limit(fake_openai: FakeOpenAIServer, project: str) -> None:
    """Hammered from 8 threads for ~1 s, the fake lets through burst + rate x time."""
    fake_openai.set_rate_limit(20, burst=5)
    started = time.monotonic()
    deadline = started + 1.0

    def hammer() -> int:
        ok = 0
        with _admin(fake_openai) as client:
            while time.monotonic() < deadline:
                ok += client.get(f"/organization/projects/{project}").status_code == 200
        return ok

    with ThreadPoolExecutor(8) as pool:
        accepted = sum(pool.map(lambda _: hammer(), range(8)))
    log = fake_openai.answered()
    span = max(a.at for a in log) - min(a.at for a in log)
    assert accepted == sum(a.status == 200 for a in log)
    assert accepted <= 5 + 20 * span + 1, "never more than the burst and the rate"
    assert accepted >= 5 + 10 * span, "and the rate is given out, not lost"
    assert fake_openai.rate_limited_count == len(log) - accepted > 0


def test_sdk_reads_the_429(fake_openai: FakeOpenAIServer, project: str) -> None:
    fake_openai.set_rate_limit(1, burst=1)
    client = openai.OpenAI(api_key="", admin_api_key=fake_openai.admin_key,
                           base_url=fake_openai.base_url, max_retries=0)
    client.admin.organization.projects.retrieve(project)
    with pytest.raises(openai.RateLimitError) as caught:
        client.admin.organization.projects.retrieve(project)
    assert caught.value.code == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after-ms"]) > 0


def test_latency_does_not_serialise_requests(fake_openai: FakeOpenAIServer,
                                             project: str) -> None:
    fake_openai.set_latency(0.3)
    started = time.monotonic()

    def call(_: int) -> int:
        with _admin(fake_openai) as client:
            return client.get(f"/organization/projects/{project}").status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(call, range(20)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 20
    assert 0.3 <= elapsed < 1.5, "20 calls of 0.3 s each overlap"
    log = fake_openai.answered()
    assert len(log) == 20 and all(a.answered_at - a.at >= 0.29 for a in log)


def test_go_durations() -> None:
    assert [_go_duration(s) for s in (0, 0.012, 1, 1.5, 360)] == \
        ["0s", "12ms", "1s", "1.5s", "6m0s"]
