"""The fake Anthropic Admin API speaks the documented paths, shapes and errors, and keeps state.

Checked over raw HTTP, so the shapes are the fake's own and not what a client library makes of
them: list with cursor pagination, get, update of name and status, the ordinary-key check
(``GET /v1/models``), admin authentication and fault injection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rotator.testing.fake_anthropic import FakeAnthropicAdmin, hint

VERSION = {"anthropic-version": "2023-06-01"}
KEY_FIELDS = {"id", "type", "name", "workspace_id", "created_at", "created_by",
              "partial_key_hint", "status", "expires_at"}


@pytest.fixture
def admin(fake_anthropic: FakeAnthropicAdmin) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake_anthropic.url, timeout=5,
                      headers={"x-api-key": fake_anthropic.admin_key, **VERSION}) as client:
        yield client


def _error(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["request_id"].startswith("req_")
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert response.headers["request-id"].startswith("req_")
    return body["error"]


def _models(fake: FakeAnthropicAdmin, value: str) -> httpx.Response:
    return httpx.get(f"{fake.url}/v1/models", headers={"x-api-key": value, **VERSION})


def test_key_object_and_hint(fake_anthropic: FakeAnthropicAdmin, admin: httpx.Client) -> None:
    workspace = fake_anthropic.add_workspace("agents")
    key_id, value = fake_anthropic.seed_key("research-agent", workspace_id=workspace)
    assert key_id.startswith("apikey_01") and value.startswith("sk-ant-api03-")
    got = admin.get(f"/v1/organizations/api_keys/{key_id}")
    assert got.status_code == 200
    key = got.json()
    assert set(key) == KEY_FIELDS
    assert key["type"] == "api_key" and key["status"] == "active"
    assert key["workspace_id"] == workspace and key["name"] == "research-agent"
    assert key["partial_key_hint"] == hint(value) == f"{value[:16]}...{value[-4:]}"
    assert key["created_by"]["type"] == "user" and key["created_at"].endswith("Z")
    assert value not in got.text


def test_list_pages_with_cursors_and_filters(fake_anthropic: FakeAnthropicAdmin,
                                             admin: httpx.Client) -> None:
    workspace = fake_anthropic.add_workspace()
    ids = [fake_anthropic.seed_key(f"k{i}", workspace_id=workspace)[0] for i in range(5)]
    other = fake_anthropic.seed_key("elsewhere")[0]
    first = admin.get("/v1/organizations/api_keys", params={"limit": 2}).json()
    assert set(first) == {"data", "has_more", "first_id", "last_id"}
    assert [k["id"] for k in first["data"]] == ids[:2] and first["has_more"] is True
    assert first["first_id"] == ids[0] and first["last_id"] == ids[1]
    seen, query = [], {"limit": "2", "workspace_id": workspace}
    while True:
        page = admin.get("/v1/organizations/api_keys", params=query).json()
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        query["after_id"] = page["last_id"]
    assert seen == ids, "after_id walks every page of the workspace, in order"
    before = admin.get("/v1/organizations/api_keys",
                       params={"limit": 2, "before_id": ids[3]}).json()
    assert [k["id"] for k in before["data"]] == ids[1:3]
    fake_anthropic.set_status(ids[0], "inactive")
    active = admin.get("/v1/organizations/api_keys", params={"status": "active"}).json()
    assert ids[0] not in {k["id"] for k in active["data"]} and other in {
        k["id"] for k in active["data"]}
    empty = admin.get("/v1/organizations/api_keys", params={"workspace_id": "wrkspc_01none"})
    assert empty.json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    _error(admin.get("/v1/organizations/api_keys", params={"limit": 0}), 400,
           "invalid_request_error")
    _error(admin.get("/v1/organizations/api_keys", params={"status": "gone"}), 400,
           "invalid_request_error")


def test_update_name_and_status_and_the_key_dies(fake_anthropic: FakeAnthropicAdmin,
                                                 admin: httpx.Client) -> None:
    key_id, value = fake_anthropic.seed_key("agent")
    assert _models(fake_anthropic, value).status_code == 200
    renamed = admin.post(f"/v1/organizations/api_keys/{key_id}", json={"name": "renamed"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed"
    off = admin.post(f"/v1/organizations/api_keys/{key_id}", json={"status": "inactive"})
    assert off.json()["status"] == "inactive"
    refused = _models(fake_anthropic, value)
    error = _error(refused, 401, "authentication_error")
    assert error["message"] == "invalid x-api-key" and value not in refused.text
    assert not fake_anthropic.is_valid(value)
    back = admin.post(f"/v1/organizations/api_keys/{key_id}", json={"status": "active"})
    assert back.json()["status"] == "active" and fake_anthropic.is_valid(value)
    admin.post(f"/v1/organizations/api_keys/{key_id}", json={"status": "archived"})
    assert not fake_anthropic.is_valid(value)
    _error(admin.post(f"/v1/organizations/api_keys/{key_id}", json={"status": "active"}), 400,
           "invalid_request_error")
    _error(admin.post(f"/v1/organizations/api_keys/{key_id}", json={"status": "dead"}), 400,
           "invalid_request_error")
    _error(admin.post(f"/v1/organizations/api_keys/{key_id}", json={"value": "x"}), 400,
           "invalid_request_error")
    _error(admin.post("/v1/organizations/api_keys/apikey_01missing", json={}), 404,
           "not_found_error")


def test_expired_key_is_refused_and_listed_as_expired(fake_anthropic: FakeAnthropicAdmin,
                                                      admin: httpx.Client) -> None:
    key_id, value = fake_anthropic.seed_key("short-lived", expires_in=-1)
    assert admin.get(f"/v1/organizations/api_keys/{key_id}").json()["status"] == "expired"
    _error(_models(fake_anthropic, value), 401, "authentication_error")


def test_admin_calls_need_the_admin_key_and_a_version(fake_anthropic: FakeAnthropicAdmin) -> None:
    _, ordinary = fake_anthropic.seed_key("agent")
    url = f"{fake_anthropic.url}/v1/organizations/api_keys"
    _error(httpx.get(url, headers=VERSION), 401, "authentication_error")
    refused = httpx.get(url, headers={"x-api-key": ordinary, **VERSION})
    _error(refused, 401, "authentication_error")
    assert ordinary not in refused.text
    no_version = httpx.get(url, headers={"x-api-key": fake_anthropic.admin_key})
    assert "anthropic-version" in _error(no_version, 400, "invalid_request_error")["message"]
    assert _models(fake_anthropic, fake_anthropic.admin_key).status_code == 401


def test_models_shape(fake_anthropic: FakeAnthropicAdmin) -> None:
    _, value = fake_anthropic.seed_key("agent")
    body = _models(fake_anthropic, value).json()
    assert set(body) == {"data", "has_more", "first_id", "last_id"}
    assert all(m["type"] == "model" and m["id"] for m in body["data"])


def test_faults_come_first_in_anthropics_shape(fake_anthropic: FakeAnthropicAdmin,
                                               admin: httpx.Client) -> None:
    fake_anthropic.inject_fault(429, count=1, path_contains="/api_keys", retry_after=7)
    fake_anthropic.inject_fault(529, count=1, method="POST")
    limited = admin.get("/v1/organizations/api_keys")
    _error(limited, 429, "rate_limit_error")
    assert limited.headers["retry-after"] == "7"
    assert admin.get("/v1/organizations/api_keys").status_code == 200, "count=1 is spent"
    _error(admin.post("/v1/organizations/api_keys/apikey_01x", json={}), 529, "overloaded_error")
    assert fake_anthropic.request_count("GET", "/api_keys") == 2
    assert fake_anthropic.request_count("POST") == 1


def test_issued_values_cover_admin_and_every_key(fake_anthropic: FakeAnthropicAdmin) -> None:
    key_id, value = fake_anthropic.seed_key("agent")
    fake_anthropic.set_status(key_id, "archived")
    assert set(fake_anthropic.issued_values()) == {fake_anthropic.admin_key, value}
    chosen = "sk-ant-api03-" + "A" * 90 + "zzAA"
    fake_anthropic.seed_key("chosen", value=chosen)
    assert chosen in fake_anthropic.issued_values()
    with pytest.raises(ValueError):
        fake_anthropic.seed_key("again", value=chosen)
