"""The OpenAI provider against the fake Admin API over real HTTP, through the real SDK."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

import pytest
from pydantic import ValidationError

from providers.openai_api_key import (
    OpenAIParams,
    OpenAIProvider,
    OpenAISettings,
    _redaction_fits,
    _retry_after,
)
from rotator.errors import (
    CredentialRejected,
    NotFound,
    PermanentError,
    RotatorError,
    TransientError,
)
from rotator.interfaces import CredentialInfo, Secret, key_name_for
from rotator.testing.fake_openai import FakeOpenAIServer


@dataclass
class World:
    fake: FakeOpenAIServer
    project: str
    sa: str
    provider: OpenAIProvider
    cred: CredentialInfo
    resolved: list[Any]

    def provider_for(
        self,
        *,
        project: str | None = None,
        resolve: Callable[[Any], Secret] | None = None,
        base_url: str | None = None,
        timeout: float = 5,
    ) -> OpenAIProvider:
        settings = OpenAISettings(
            project_id=project or self.project,
            admin_key={"env": "OPENAI_ADMIN_KEY"},
            base_url=base_url or self.fake.base_url,
            timeout=timeout,
        )
        return OpenAIProvider(
            "openai-test", settings, resolve or (lambda ref: Secret(self.fake.admin_key))
        )


@pytest.fixture
def world(fake_openai: FakeOpenAIServer) -> Iterator[World]:
    project = fake_openai.add_project()
    sa = fake_openai.add_service_account(project)
    resolved: list[Any] = []

    def resolve(ref: Any) -> Secret:
        resolved.append(ref)
        return Secret(fake_openai.admin_key)

    provider = OpenAIProvider(
        "openai-test",
        OpenAISettings(
            project_id=project,
            admin_key={"env": "OPENAI_ADMIN_KEY"},
            base_url=fake_openai.base_url,
            timeout=5,
        ),
        resolve,
    )
    cred = CredentialInfo(
        name="research-agent/openai",
        agent="research-agent",
        params=OpenAIParams(service_account_id=sa),
    )
    try:
        yield World(fake_openai, project, sa, provider, cred, resolved)
    finally:
        provider.close()


def test_create_names_the_key_with_the_rotation_id(world: World) -> None:
    assert world.resolved == []  # the admin key is resolved on first use, not at construction
    new = world.provider.create(world.cred, "rot-123")
    assert [ref.env for ref in world.resolved] == ["OPENAI_ADMIN_KEY"]
    [row] = world.fake.live_keys(world.project)
    assert row["id"] == new.key_id
    assert row["name"] == key_name_for("rot-123")
    assert row["service_account_id"] == world.sa
    assert world.fake.is_valid(new.secret.reveal())
    assert new.secret.reveal() not in repr(new)


def test_verify_accepts_a_live_key_and_rejects_it_after_revoke(world: World) -> None:
    new = world.provider.create(world.cred, "rot-1")
    world.provider.verify(world.cred, new.secret)
    world.provider.revoke(world.cred, new.key_id)
    assert not world.fake.is_valid(new.secret.reveal())
    with pytest.raises(CredentialRejected) as caught:
        world.provider.verify(world.cred, new.secret)
    assert "401" in str(caught.value)
    assert new.secret.reveal() not in str(caught.value)


def test_revoke_is_idempotent(world: World) -> None:
    new = world.provider.create(world.cred, "rot-1")
    world.provider.revoke(world.cred, new.key_id)
    world.provider.revoke(world.cred, new.key_id)
    world.provider.revoke(world.cred, "key_never_existed")
    assert world.fake.live_keys(world.project) == []


def test_revoke_with_a_wrong_project_is_not_taken_for_already_revoked(world: World) -> None:
    provider = world.provider_for(project="proj_missing")
    try:
        with pytest.raises(NotFound, match="project proj_missing not found"):
            provider.revoke(world.cred, "key_whatever")
    finally:
        provider.close()


def test_find_by_rotation_follows_pagination(world: World) -> None:
    for i in range(world.provider.list_page_size + 20):
        world.fake.seed_key(world.project, world.sa, name=f"other-{i}")
    new = world.provider.create(world.cred, "rot-late")
    crashed = world.provider.create(world.cred, "rot-crashed")
    world.provider.revoke(world.cred, crashed.key_id)
    before = world.fake.request_count("GET", "/api_keys")

    assert world.provider.find_by_rotation(world.cred, "rot-late") == [new.key_id]
    assert world.fake.request_count("GET", "/api_keys") - before >= 2  # it really paged
    assert world.provider.find_by_rotation(world.cred, "rot-crashed") == []
    assert world.provider.find_by_rotation(world.cred, "rot-unknown") == []


def test_identify_matches_a_seeded_legacy_key(world: World) -> None:
    for _ in range(5):
        world.fake.seed_key(world.project, world.sa)
    legacy_id, legacy_value = world.fake.seed_key(world.project, world.sa, name="legacy")
    assert world.provider.identify(world.cred, Secret(legacy_value)) == legacy_id


def test_identify_returns_none_when_not_found_or_ambiguous(world: World) -> None:
    world.fake.seed_key(world.project, world.sa, value="sk-svcacct-AAAA-same-tail-wxyz")
    world.fake.seed_key(world.project, world.sa, value="sk-svcacct-BBBB-same-tail-wxyz")
    assert world.provider.identify(world.cred, Secret("sk-svcacct-not-a-known-key")) is None
    assert world.provider.identify(world.cred, Secret("sk-svcacct-AAAA-same-tail-wxyz")) is None


def test_identifying_many_keys_lists_the_project_once(world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The usage poll identifies every never-rotated credential's key: one listing of the
    project serves them all for a few seconds, then it is listed again."""
    seeded = [world.fake.seed_key(world.project, world.sa) for _ in range(20)]
    before = world.fake.request_count("GET", "/api_keys")
    assert [world.provider.identify(world.cred, Secret(value)) for _, value in seeded] == \
        [key_id for key_id, _ in seeded]
    assert world.fake.request_count("GET", "/api_keys") - before == 1
    monkeypatch.setattr("providers.openai_api_key.LISTING_FRESH_FOR", 0.0)
    later_id, later_value = world.fake.seed_key(world.project, world.sa)
    assert world.provider.identify(world.cred, Secret(later_value)) == later_id


def test_rate_limit_is_transient_with_retry_after(world: World) -> None:
    world.fake.inject_fault(429, path_contains="/api_keys", method="POST", retry_after=2.5)
    with pytest.raises(TransientError) as caught:
        world.provider.create(world.cred, "rot-1")
    assert caught.value.retry_after == 2.5
    assert "rate limited" in str(caught.value)
    assert world.fake.request_count("POST") == 1  # the SDK does not retry on its own
    world.provider.create(world.cred, "rot-1")  # the next attempt goes through


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_transient(world: World, status: int) -> None:
    world.fake.inject_fault(status, count=3)
    with pytest.raises(TransientError):
        world.provider.create(world.cred, "rot-1")
    with pytest.raises(TransientError):
        world.provider.find_by_rotation(world.cred, "rot-1")
    with pytest.raises(TransientError):  # a 5xx on verify is not "the key was rejected"
        world.provider.verify(world.cred, Secret("sk-svcacct-whatever-value"))
    assert world.fake.request_count() == 3


def test_unreachable_and_slow_servers_are_transient(world: World) -> None:
    world.fake.set_latency(0.5)
    slow = world.provider_for(timeout=0.1)
    try:
        with pytest.raises(TransientError, match="timed out"):
            slow.check_access()
    finally:
        slow.close()
        world.fake.reset_faults()

    gone = world.provider_for(base_url="http://127.0.0.1:9/v1")
    try:
        with pytest.raises(TransientError, match="could not connect"):
            gone.revoke(world.cred, "key_x")
    finally:
        gone.close()


def test_bad_admin_key_is_permanent_and_not_in_the_message(world: World) -> None:
    bad_key = "sk-admin-" + "B" * 40
    keys = [bad_key, world.fake.admin_key]
    provider = world.provider_for(resolve=lambda ref: Secret(keys.pop(0)))
    try:
        with pytest.raises(PermanentError) as caught:
            provider.create(world.cred, "rot-1")
        error = caught.value
        assert not isinstance(error, (CredentialRejected, TransientError))
        assert "admin_key" in str(error) and "[providers.openai-test]" in str(error)
        _assert_no_secret(error, [bad_key])
        # The 401 dropped the cached client: the next call resolves the (fixed) key again.
        provider.create(world.cred, "rot-1")
    finally:
        provider.close()


def test_project_key_used_as_admin_key_is_permanent(world: World) -> None:
    _, project_key = world.fake.seed_key(world.project, world.sa)
    provider = world.provider_for(resolve=lambda ref: Secret(project_key))
    try:
        with pytest.raises(PermanentError, match="403") as caught:
            provider.check_access()
        _assert_no_secret(caught.value, [project_key])
    finally:
        provider.close()


def test_unknown_service_account_is_not_found(world: World) -> None:
    cred = CredentialInfo("x", "x", OpenAIParams(service_account_id="svc_acct_missing"))
    with pytest.raises(NotFound, match="svc_acct_missing"):
        world.provider.create(cred, "rot-1")


def test_check_access(world: World) -> None:
    world.provider.check_access()
    provider = world.provider_for(project="proj_missing")
    try:
        with pytest.raises(NotFound, match="check project_id"):
            provider.check_access()
    finally:
        provider.close()


def test_no_secret_reaches_exceptions_or_logs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[RotatorError] = []
    new = world.provider.create(world.cred, "rot-1")
    _, legacy = world.fake.seed_key(world.project, world.sa)
    world.provider.identify(world.cred, Secret(legacy))
    world.provider.revoke(world.cred, new.key_id)
    try:
        world.provider.verify(world.cred, new.secret)
    except RotatorError as exc:
        errors.append(exc)
    for status in (400, 429, 500):
        world.fake.inject_fault(status, retry_after=1)
        try:
            world.provider.verify(world.cred, Secret(legacy))
        except RotatorError as exc:
            errors.append(exc)
    bad = world.provider_for(resolve=lambda ref: Secret("sk-admin-" + "Z" * 40))
    try:
        bad.find_by_rotation(world.cred, "rot-1")
    except RotatorError as exc:
        errors.append(exc)
    finally:
        bad.close()

    assert len(errors) == 5
    secrets = [new.secret.reveal(), legacy, world.fake.admin_key, "sk-admin-" + "Z" * 40]
    for error in errors:
        _assert_no_secret(error, secrets)
    for secret in secrets:
        assert secret not in caplog.text


def test_close_then_reuse(world: World) -> None:
    world.provider.check_access()
    world.provider.close()
    world.provider.close()
    world.provider.check_access()
    assert len(world.resolved) == 2


def test_settings_and_params_validation() -> None:
    with pytest.raises(ValidationError, match="service_account_id is empty"):
        OpenAIParams(service_account_id="  ")
    with pytest.raises(ValidationError):
        OpenAIParams.model_validate({"service_account_id": "svc_acct_1", "extra": 1})
    with pytest.raises(ValidationError, match="https://"):
        OpenAISettings(project_id="proj_1", admin_key={"env": "K"}, base_url="api.openai.com")
    settings = OpenAISettings(project_id="proj_1", admin_key={"env": "K"})
    assert settings.base_url == "https://api.openai.com/v1"
    assert settings.timeout == 30
    assert OpenAIProvider.type_name == "openai"


def test_retry_after_parsing() -> None:
    assert _retry_after({"retry-after": "3"}) == 3
    assert _retry_after({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert _retry_after({}) is None
    assert _retry_after({"retry-after": "soon"}) is None
    in_a_minute = _retry_after({"retry-after": formatdate(timeval=None, usegmt=True)})
    assert in_a_minute is not None and in_a_minute <= 1


def test_redaction_matching() -> None:
    value = "sk-svcacct-abcdefghijklmnop"
    assert _redaction_fits("sk-svc...mnop", value)
    assert _redaction_fits("sk-svcac***...mnop", value)
    assert not _redaction_fits("sk-svc...xxxx", value)
    assert not _redaction_fits("sk-svcacct-abcdefghijklmnop", value)


def test_importing_the_provider_does_not_import_the_sdk() -> None:
    code = "import sys, providers.openai_api_key; assert 'openai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _assert_no_secret(error: BaseException, secrets: list[str]) -> None:
    """Neither the error nor anything chained to it shows a whole secret."""
    seen: BaseException | None = error
    while seen is not None:
        for secret in secrets:
            assert secret not in str(seen)
            assert secret not in repr(seen)
            assert secret not in str(getattr(seen, "args", ""))
        seen = seen.__cause__ or seen.__context__
