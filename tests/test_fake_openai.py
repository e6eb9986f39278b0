"""The fake OpenAI Admin API speaks the real API's paths, shapes and errors, and keeps state.

Checked over raw HTTP (shapes) and through the real SDK with strict response validation (so a
field the SDK needs cannot be missing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from rotator.testing.fake_openai import FakeOpenAIServer

World = tuple[FakeOpenAIServer, str, str]


@pytest.fixture
def world(fake_openai: FakeOpenAIServer) -> World:
    project = fake_openai.add_project(name="agents")
    sa = fake_openai.add_service_account(project, name="research-agent")
    return fake_openai, project, sa


@pytest.fixture
def admin(fake_openai: FakeOpenAIServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=fake_openai.base_url,
        headers={"Authorization": f"Bearer {fake_openai.admin_key}"},
        timeout=5,
    ) as client:
        yield client


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _create(client: httpx.Client, project: str, sa: str, name: str = "k") -> dict[str, Any]:
    response = client.post(
        f"/organization/projects/{project}/service_accounts/{sa}/api_keys", json={"name": name}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_base_url_and_generated_admin_key(fake_openai: FakeOpenAIServer) -> None:
    assert fake_openai.base_url == f"http://127.0.0.1:{fake_openai.port}/v1"
    assert fake_openai.admin_key.startswith("sk-admin-")
    assert FakeOpenAIServer(admin_key="sk-admin-fixed").admin_key == "sk-admin-fixed"


def test_admin_endpoints_need_the_admin_key(world: World) -> None:
    fake, project, sa = world
    url = f"{fake.base_url}/organization/projects/{project}"
    missing = httpx.get(url)
    assert missing.status_code == 401
    assert "didn't provide an API key" in _error(missing)["message"]

    wrong_key = "sk-admin-" + "x" * 40
    wrong = httpx.get(url, headers={"Authorization": f"Bearer {wrong_key}"})
    assert wrong.status_code == 401
    error = _error(wrong)
    assert error["code"] == "invalid_api_key"
    assert wrong_key not in wrong.text

    _, project_key = fake.seed_key(project, sa)
    forbidden = httpx.get(url, headers={"Authorization": f"Bearer {project_key}"})
    assert forbidden.status_code == 403
    assert "insufficient permissions" in _error(forbidden)["message"]


def test_key_lifecycle_shapes(world: World, admin: httpx.Client) -> None:
    _, project, sa = world
    created = _create(admin, project, sa, name="rotator-r1")
    assert created["object"] == "organization.project.service_account.api_key"
    assert created["name"] == "rotator-r1"
    assert created["id"].startswith("key_")
    assert created["value"].startswith("sk-svcacct-")
    assert isinstance(created["created_at"], int)
    assert created["expires_at"] is None

    got = admin.get(f"/organization/projects/{project}/api_keys/{created['id']}").json()
    assert got["object"] == "organization.project.api_key"
    value = created["value"]
    assert got["redacted_value"] == f"{value[:6]}...{value[-4:]}"
    assert value not in str(got)
    assert got["owner"]["type"] == "service_account"
    assert got["owner"]["service_account"]["id"] == sa
    assert got["owner"]["service_account"]["name"] == "research-agent"
    assert got["owner_project_access"] == "active"

    deleted = admin.delete(f"/organization/projects/{project}/api_keys/{created['id']}")
    assert deleted.json() == {
        "object": "organization.project.api_key.deleted",
        "id": created["id"],
        "deleted": True,
    }
    again = admin.delete(f"/organization/projects/{project}/api_keys/{created['id']}")
    assert again.status_code == 404
    _error(again)
    gone = admin.get(f"/organization/projects/{project}/api_keys/{created['id']}")
    assert gone.status_code == 404


def test_models_accepts_live_keys_and_rejects_deleted_ones(
    world: World, admin: httpx.Client
) -> None:
    fake, project, sa = world
    created = _create(admin, project, sa)
    value = created["value"]
    models = httpx.get(f"{fake.base_url}/models", headers={"Authorization": f"Bearer {value}"})
    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert fake.is_valid(value)

    admin.delete(f"/organization/projects/{project}/api_keys/{created['id']}")
    rejected = httpx.get(f"{fake.base_url}/models", headers={"Authorization": f"Bearer {value}"})
    assert rejected.status_code == 401
    assert _error(rejected)["code"] == "invalid_api_key"
    assert value not in rejected.text
    assert not fake.is_valid(value)
    assert fake.live_keys(project) == []

    admin_on_models = httpx.get(
        f"{fake.base_url}/models", headers={"Authorization": f"Bearer {fake.admin_key}"}
    )
    assert admin_on_models.status_code == 401


def test_list_paginates_with_limit_and_after(world: World, admin: httpx.Client) -> None:
    fake, project, sa = world
    ids = [fake.seed_key(project, sa, name=f"k{i}")[0] for i in range(25)]
    admin.delete(f"/organization/projects/{project}/api_keys/{ids[3]}")
    live = [i for i in ids if i != ids[3]]

    first = admin.get(f"/organization/projects/{project}/api_keys").json()
    assert first["object"] == "list"
    assert [k["id"] for k in first["data"]] == live[:20]  # default limit 20
    assert first["first_id"] == live[0]
    assert first["last_id"] == live[19]
    assert first["has_more"] is True

    # A cursor on a key deleted since still works.
    second = admin.get(
        f"/organization/projects/{project}/api_keys", params={"after": ids[3], "limit": 100}
    ).json()
    assert [k["id"] for k in second["data"]] == ids[4:]
    assert second["has_more"] is False

    for bad in ({"limit": 0}, {"limit": 101}, {"owner_project_access": "nope"}):
        response = admin.get(f"/organization/projects/{project}/api_keys", params=bad)
        assert response.status_code == 400
        assert _error(response)["param"] in bad


def test_unknown_things_are_404(world: World, admin: httpx.Client) -> None:
    fake, project, sa = world
    for path in (
        "/organization/projects/proj_nope",
        "/organization/projects/proj_nope/api_keys",
        f"/organization/projects/{project}/api_keys/key_nope",
        f"/organization/projects/{project}/service_accounts/svc_acct_nope",
        "/no/such/endpoint",
    ):
        response = admin.get(path)
        assert response.status_code == 404, path
        _error(response)
    other = fake.add_project()
    response = admin.post(
        f"/organization/projects/{other}/service_accounts/{sa}/api_keys", json={"name": "x"}
    )
    assert response.status_code == 404


def test_project_and_service_account_shapes(world: World, admin: httpx.Client) -> None:
    _, project, sa = world
    got = admin.get(f"/organization/projects/{project}").json()
    assert got["object"] == "organization.project"
    assert got["id"] == project
    assert got["name"] == "agents"
    account = admin.get(f"/organization/projects/{project}/service_accounts/{sa}").json()
    assert account["object"] == "organization.project.service_account"
    assert account["id"] == sa
    assert account["id"].startswith("svc_acct_")


def test_faults_match_count_and_set_retry_after(world: World, admin: httpx.Client) -> None:
    fake, project, _ = world
    fake.inject_fault(429, count=2, path_contains="/api_keys", method="GET", retry_after=1.5)
    assert admin.get(f"/organization/projects/{project}").status_code == 200  # not matched
    for _ in range(2):
        limited = admin.get(f"/organization/projects/{project}/api_keys")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1.5"
        assert _error(limited)["code"] == "rate_limit_exceeded"
    assert admin.get(f"/organization/projects/{project}/api_keys").status_code == 200

    fake.inject_fault(500)
    failed = admin.get(f"/organization/projects/{project}")
    assert failed.status_code == 500
    assert _error(failed)["type"] == "server_error"

    fake.inject_fault(503, count=5)
    fake.reset_faults()
    assert admin.get(f"/organization/projects/{project}").status_code == 200

    assert fake.request_count() == 6
    assert fake.request_count("GET", "/api_keys") == 3
    assert fake.request_count("DELETE") == 0


def test_latency_delays_responses(world: World) -> None:
    fake, project, _ = world
    fake.set_latency(0.2)
    started = time.monotonic()
    httpx.get(f"{fake.base_url}/organization/projects/{project}")
    assert time.monotonic() - started >= 0.2
    fake.reset_faults()


def test_seed_key_and_live_keys_never_show_values(world: World) -> None:
    fake, project, sa = world
    key_id, value = fake.seed_key(project, sa, value="sk-svcacct-chosen-value-abcd")
    assert value == "sk-svcacct-chosen-value-abcd"
    assert fake.is_valid(value)
    [row] = fake.live_keys(project)
    assert row == {
        "id": key_id,
        "name": "legacy",
        "service_account_id": sa,
        "project_id": project,
        "created_at": row["created_at"],
        "expires_at": None,
    }
    with pytest.raises(ValueError):
        fake.seed_key(project, sa, value=value)
    with pytest.raises(KeyError):
        fake.add_service_account("proj_nope")


def test_sdk_parses_every_response_strictly(world: World) -> None:
    fake, project, sa = world
    with openai.OpenAI(
        api_key="",
        admin_api_key=fake.admin_key,
        base_url=fake.base_url,
        max_retries=0,
        _strict_response_validation=True,
    ) as client:
        projects = client.admin.organization.projects
        created = projects.service_accounts.api_keys.create(sa, project_id=project, name="n")
        assert created.name == "n"
        for _ in range(3):
            fake.seed_key(project, sa)
        assert next(iter(projects.api_keys.list(project, limit=2))).id == created.id
        assert projects.api_keys.retrieve(created.id, project_id=project).owner.service_account
        assert projects.retrieve(project).id == project
        assert projects.service_accounts.retrieve(sa, project_id=project).id == sa
        assert projects.api_keys.delete(created.id, project_id=project).deleted
        with (
            openai.OpenAI(
                api_key=created.value,
                base_url=fake.base_url,
                max_retries=0,
                _strict_response_validation=True,
            ) as user,
            pytest.raises(openai.AuthenticationError),
        ):
            user.models.list()
