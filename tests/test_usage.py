"""Per-key usage (issue 14): the fake OpenAI's usage endpoint as the SDK reads it, and
``rotator usage`` showing a leaked key's use across its rotation."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import openai

from tests.support import make_fleet


def _complete(fake, value: str, n: int = 1) -> None:
    for _ in range(n):
        answer = httpx.post(f"{fake.base_url}/chat/completions", timeout=10,
                            headers={"Authorization": f"Bearer {value}"},
                            json={"model": "gpt-4o-mini",
                                  "messages": [{"role": "user", "content": "hello"}]})
        assert answer.status_code == 200, answer.text


def test_the_fake_usage_endpoint_pages_and_groups_by_key_as_documented(fake_openai):
    project = fake_openai.add_project()
    account = fake_openai.add_service_account(project)
    mine, value = fake_openai.seed_key(project, account)
    other, _ = fake_openai.seed_key(project, account)
    now = int(time.time())
    fake_openai.record_usage(mine, now - 2 * 3600, requests=4, input_tokens=40,
                             output_tokens=4)
    fake_openai.record_usage(other, now - 2 * 3600, requests=1)
    _complete(fake_openai, value, 2)
    client = openai.OpenAI(api_key="", admin_api_key=fake_openai.admin_key,
                           base_url=fake_openai.base_url, max_retries=0)
    pages, seen = 0, {}
    page = None
    while True:
        answer = client.admin.organization.usage.completions(
            start_time=now - 3 * 3600, end_time=now + 60, bucket_width="1h",
            group_by=["api_key_id"], api_key_ids=[mine], limit=2,
            **({"page": page} if page else {}))
        pages += 1
        for bucket in answer.data:
            assert bucket.end_time - bucket.start_time == 3600
            for r in bucket.results:
                seen[bucket.start_time] = (r.api_key_id, r.num_model_requests)
        if not answer.has_more:
            break
        page = answer.next_page
    # 4 hourly buckets, or 5 when the window's last minute runs into the next hour.
    start, end = now - 3 * 3600, now + 60
    buckets = len(range(start - start % 3600, end, 3600))
    assert pages == -(-buckets // 2), f"{buckets} hourly buckets at 2 a page"
    assert sorted(v for v in seen.values()) == [(mine, 2), (mine, 4)], "only the key asked for"
    revoked = httpx.post(f"{fake_openai.base_url}/chat/completions",
                         headers={"Authorization": "Bearer sk-never-issued"}, json={})
    assert revoked.status_code == 401


def test_usage_shows_a_leaked_keys_use_across_its_rotation(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h")
    cred = fleet.credentials[0]
    legacy = fleet.legacy_keys[cred["name"]]
    leaked = fleet.vault_value(cred)
    fake_openai.record_usage(legacy, time.time() - 1800, requests=3)  # the agent, before
    rotated = fleet.cli("rotate-now", cred["name"], "--yes")
    assert rotated.returncode == 0, rotated.stderr
    # Someone else still holds the old key (in its grace period): their calls, later.
    fake_openai.record_usage(legacy, time.time() + 180, requests=5)
    until = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    shown = fleet.cli("usage", cred["name"], "--since", "1h", "--until", until, "--width", "1m",
                      "--json")
    assert shown.returncode == 0, shown.stderr
    keys = {k["key_id"]: k for k in json.loads(shown.stdout)["keys"]}
    old = keys[legacy]
    assert old["role"] == "old" and old["replaced_at"] is not None
    assert old["requests"] == 8 and old["requests_after_replacement"] == 5
    current = [k for k in keys.values() if k["role"] == "current"]
    assert len(current) == 1 and current[0]["requests"] == 0
    table = fleet.cli("usage", cred["name"], "--since", "1h", "--until", until, "--width", "1m")
    assert "after replacement" in table.stdout and "made 5 request(s)" in table.stderr
    assert leaked not in shown.stdout + table.stdout + table.stderr
