"""The ``http`` provider: its documented examples, template checks, failures, and the fakes.

The SendGrid and Cloudflare examples are read out of docs/http-provider.md, validated as
``rotator check`` validates a policy file, and run against the fakes (the harnesses use them),
so the documentation cannot drift from what works.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from providers.http.provider import HttpParams, HttpProvider, HttpSettings
from rotator.config import parse_policies
from rotator.errors import (
    ConfigError,
    CredentialRejected,
    NotFound,
    PermanentError,
    TransientError,
)
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.fake_http_services import FakeCloudflare, FakeSendGrid
from rotator.testing.provider_contract import assert_no_secret_in_exception, new_rotation_id
from tests.harnesses.base import SeededCredential
from tests.harnesses.http_services import (
    CloudflareHarness,
    SendGridHarness,
    doc_examples,
    toml_blocks,
)

# -- the documentation ---------------------------------------------------------------------------


def test_every_toml_block_of_the_doc_is_toml() -> None:
    blocks = toml_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        tomllib.loads(block)
    assert set(doc_examples()) == {"sendgrid", "cloudflare"}


@pytest.mark.usefixtures("http_provider_types")
@pytest.mark.parametrize("example", ["sendgrid", "cloudflare"])
def test_doc_examples_pass_rotator_check(example: str, tmp_path: Path) -> None:
    policies = parse_policies(doc_examples()[example], tmp_path / "rotation-policies.toml")
    provider = policies.providers[example]
    assert provider.type == "http" and isinstance(provider.settings, HttpSettings)
    assert provider.settings.list is not None and provider.settings.identify is not None
    [cred] = policies.credentials
    assert isinstance(cred.params, HttpParams) and cred.params.vars


@pytest.mark.parametrize(("harness_class", "example"),
                         [(SendGridHarness, "sendgrid"), (CloudflareHarness, "cloudflare")])
def test_harnesses_run_the_documented_table(harness_class: type, example: str) -> None:
    documented = tomllib.loads(doc_examples()[example])["providers"][example]
    fake = FakeSendGrid() if example == "sendgrid" else FakeCloudflare()
    used = harness_class(fake).provider_table()
    changed = {k for k in documented if documented[k] != used.get(k)}
    assert set(used) == set(documented) and "base_url" in changed
    assert changed <= {"base_url", "secrets"}, "only the address and the admin reference differ"


# -- what `rotator check` says -------------------------------------------------------------------


def _problems(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_policies(text, tmp_path / "rotation-policies.toml")
    return [str(p) for p in caught.value.problems]


def _line_of(text: str, fragment: str, after: str = "") -> int:
    start = text.index(after) if after else 0
    return text[:text.index(fragment, start)].count("\n") + 1


@pytest.mark.usefixtures("http_provider_types")
def test_check_points_at_a_misspelt_placeholder(tmp_path: Path) -> None:
    """The very message docs/http-provider.md shows."""
    text = doc_examples()["sendgrid"].replace(
        'path = "/v3/api_keys"\nbody', 'path = "/v3/subusers/{params.subuser}/api_keys"\nbody')
    line = _line_of(text, "path = ", after="[providers.sendgrid.create]")
    assert _problems(text, tmp_path) == [
        f"{tmp_path / 'rotation-policies.toml'}:{line}: providers.sendgrid.create.path: unknown "
        "placeholder {params.subuser} (did you mean {vars.subuser}?); placeholders here: "
        "{vars.NAME}, {key_name}, {rotation_id}"]


@pytest.mark.usefixtures("http_provider_types")
@pytest.mark.parametrize(("old", "new", "key", "message"), [
    ('"on-behalf-of: {vars.subuser}"', '"on-behalf-of: {vars.subuser"',
     "providers.sendgrid.headers", 'a lone "{" in a template'),
    ('"Authorization: Bearer {secrets.admin}"', '"Authorization: Bearer {secrets.admn}"',
     "providers.sendgrid.headers", "{secrets.admn} names no secret of"),
    ('"Authorization: Bearer {secrets.admin}"', '"Authorization: Bearer SG.pasted.value"',
     "providers.sendgrid.headers", "secrets never go in the policy file"),
    ('path = "/v3/api_keys/{key_id}"', 'path = "/v3/api_keys/{key}"',
     "providers.sendgrid.revoke.path", "{key} is not allowed here: it may appear only in verify"),
    ('path = "/v3/api_keys/{key_id}"', 'path = "/v3/api_keys"', "providers.sendgrid.revoke",
     "revoke must name the key with {key_id}"),
    ('name = "{key_name}"', 'name = "mailer"', "providers.sendgrid.create",
     "create must name the key with {key_name}"),
    ('headers = ["Authorization: Bearer {key}"]',
     'headers = ["Authorization: Bearer {secrets.admin}"]',
     "providers.sendgrid.verify.headers", "{secrets.admin} is not allowed here"),
    ('items_path = "result"', 'item_path = "result"', "providers.sendgrid.list.item_path",
     'unknown key "item_path" (did you mean "items_path"?)'),
    ("id_pattern = '^SG\\.([A-Za-z0-9_-]{22})\\.'", "id_pattern = '^SG'",
     "providers.sendgrid.identify.id_pattern", "exactly one group"),
    ('id_path = "api_key_id"\nsecret_path', 'id_path = "api key"\nsecret_path',
     "providers.sendgrid.create.id_path", "dotted path into the JSON answer"),
    ('[providers.sendgrid.verify]\nmethod = "GET"\npath = "/v3/scopes"\n'
     'headers = ["Authorization: Bearer {key}"]\n', "", "providers.sendgrid",
     "identify needs a [verify] call"),
])
def test_check_rejects_bad_templates(tmp_path: Path, old: str, new: str, key: str,
                                     message: str) -> None:
    text = doc_examples()["sendgrid"]
    assert old in text
    problems = _problems(text.replace(old, new, 1), tmp_path)
    wanted = [p for p in problems if f": {key}: " in p]
    assert wanted and message in wanted[0], problems
    assert "SG.pasted.value" not in "\n".join(problems), "a pasted secret is never repeated"


@pytest.mark.usefixtures("http_provider_types")
@pytest.mark.parametrize(("vars_table", "key", "message"), [
    ('[credentials.params]\nsubuser = "mailer-agent"', "credentials[0].params.subuser",
     'unknown key "subuser"'),
    ('[credentials.params.vars]\n"sub-user" = "mailer-agent"', "credentials[0].params.vars",
     'vars name "sub-user" must be letters, digits and _'),
    ("[credentials.params.vars]\nsubuser = 42", "credentials[0].params.vars.subuser",
     "Input should be a valid string"),
    ('[credentials.params.vars]\nsubuser = "a\\nb"', "credentials[0].params.vars",
     "must not contain control characters"),
])
def test_check_rejects_bad_params(tmp_path: Path, vars_table: str, key: str,
                                  message: str) -> None:
    text = doc_examples()["sendgrid"].replace(
        '[credentials.params.vars]\nsubuser = "mailer-agent"', vars_table)
    problems = _problems(text, tmp_path)
    assert any(f": {key}: " in p and message in p for p in problems), problems


@pytest.mark.usefixtures("http_provider_types")
def test_check_reports_a_var_the_credential_lacks(tmp_path: Path) -> None:
    """A ``{vars.NAME}`` the calls use but the credential does not define is reported by
    ``rotator check`` (``check_params``), at the credential, not at its first rotation."""
    text = doc_examples()["sendgrid"].replace(
        '[credentials.params.vars]\nsubuser = "mailer-agent"', "")
    line = _line_of(text, "[[credentials]]")
    assert _problems(text, tmp_path) == [
        f"{tmp_path / 'rotation-policies.toml'}:{line}: credentials[0].params: missing "
        "{vars.subuser}, used by the provider's headers: add subuser = \"...\" under "
        "[credentials.params.vars]"]


def test_check_params_names_every_place_a_var_is_used() -> None:
    settings = tomllib.loads(doc_examples()["sendgrid"])["providers"]["sendgrid"]
    settings["create"]["query"] = {"team": "{vars.team}"}
    settings["list"]["path"] = "/v3/{vars.team}/api_keys"
    model = HttpSettings.model_validate({k: v for k, v in settings.items() if k != "type"})
    assert HttpProvider.check_params(model, HttpParams(vars={"subuser": "mailer"})) == [
        "missing {vars.team}, used by the provider's create.query.team and list.path: add "
        'team = "..." under [credentials.params.vars]']
    assert HttpProvider.check_params(
        model, HttpParams(vars={"subuser": "mailer", "team": "mail", "extra": "x"})) == []


def test_a_failing_check_params_is_reported_as_a_plugin_bug(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(HttpProvider):
        @classmethod
        def check_params(cls, settings: Any, params: Any) -> list[str]:
            raise RuntimeError("boom")

    from rotator import plugins

    monkeypatch.setattr(plugins, "provider_types", lambda: ["http"])
    monkeypatch.setattr(plugins, "provider_class", lambda name: Broken)
    problems = _problems(doc_examples()["sendgrid"], tmp_path)
    assert len(problems) == 1 and ": credentials[0].params: " in problems[0]
    assert "Broken.check_params failed (RuntimeError); this is a bug in that plugin" in (
        problems[0])


# -- the fakes speak the documented shapes -------------------------------------------------------


def _sg(fake: FakeSendGrid, key: str | None = None, subuser: str = "") -> httpx.Client:
    headers = {"Authorization": f"Bearer {key or fake.admin_key}"}
    if subuser:
        headers["on-behalf-of"] = subuser
    return httpx.Client(base_url=fake.url, headers=headers, timeout=5)


def test_fake_sendgrid_shapes(fake_sendgrid: FakeSendGrid) -> None:
    sub = fake_sendgrid.add_subuser("mailer")
    with _sg(fake_sendgrid, subuser=sub) as admin:
        created = admin.post("/v3/api_keys", json={"name": "k1", "scopes": ["mail.send"]})
        assert created.status_code == 201
        body = created.json()
        assert set(body) == {"api_key", "api_key_id", "name", "scopes"}
        value, key_id = body["api_key"], body["api_key_id"]
        assert len(value) == 69 and value.startswith(f"SG.{key_id}.") and len(key_id) == 22
        listed = admin.get("/v3/api_keys", params={"limit": 100}).json()
        assert listed == {"result": [{"name": "k1", "api_key_id": key_id}]}
        assert admin.get(f"/v3/api_keys/{key_id}").json()["scopes"] == ["mail.send"]
        with _sg(fake_sendgrid, value) as own:
            assert own.get("/v3/scopes").json() == {"scopes": ["mail.send"]}
            forbidden = own.get("/v3/api_keys")
            assert forbidden.status_code == 403
            assert forbidden.json() == {"errors": [{"field": None, "message": "access forbidden"}]}
            deleted = admin.delete(f"/v3/api_keys/{key_id}")
            assert deleted.status_code == 204 and deleted.content == b""
            refused = own.get("/v3/scopes")
            assert refused.status_code == 401 and value not in refused.text
            assert refused.json()["errors"][0]["message"] == "authorization required"
        gone = admin.delete(f"/v3/api_keys/{key_id}")
        assert gone.status_code == 404 and gone.json()["errors"][0]["field"] is None
        missing_name = admin.post("/v3/api_keys", json={})
        assert missing_name.status_code == 400
        assert missing_name.json()["errors"][0]["field"] == "name"
    with _sg(fake_sendgrid) as parent:
        parents = parent.get("/v3/api_keys").json()["result"]
        assert parents == [{"name": "rotator admin", "api_key_id": fake_sendgrid.admin_key_id}], \
            "subusers' keys are separate from the parent's"
    with _sg(fake_sendgrid, subuser="nobody") as stranger:
        assert stranger.get("/v3/api_keys").status_code == 403


def _cf(fake: FakeCloudflare, token: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=fake.api_url, timeout=5,
                        headers={"Authorization": f"Bearer {token or fake.admin_token}"})


POLICY = {"effect": "allow", "permission_groups": [{"id": "82e64a83756745bbbb1c9c2701bf816b"}],
          "resources": {"com.cloudflare.api.account.zone.z1": "*"}}


def test_fake_cloudflare_shapes(fake_cloudflare: FakeCloudflare) -> None:
    with _cf(fake_cloudflare) as admin:
        created = admin.post("/user/tokens", json={"name": "t1", "policies": [POLICY]}).json()
        assert set(created) == {"success", "errors", "messages", "result"}
        assert created["success"] is True and created["errors"] == []
        token_id, value = created["result"]["id"], created["result"]["value"]
        assert len(token_id) == 32 and len(value) == 40
        for i in range(6):
            fake_cloudflare.seed_token(f"other-{i}")
        first = admin.get("/user/tokens", params={"per_page": 5}).json()
        assert first["result_info"] == {"page": 1, "per_page": 5, "count": 5,
                                        "total_count": 7, "total_pages": 2}
        assert all("value" not in t for t in first["result"])
        last = admin.get("/user/tokens", params={"per_page": 5, "page": 3}).json()
        assert last["result"] == [] and last["success"] is True
        assert admin.get("/user/tokens", params={"per_page": 51}).status_code == 400
        with _cf(fake_cloudflare, value) as own:
            verified = own.get("/user/tokens/verify").json()
            assert verified["result"] == {"id": token_id, "status": "active"}
            assert verified["messages"][0]["message"] == "This API Token is valid and active"
            assert own.get("/user/tokens").status_code == 403
            deleted = admin.delete(f"/user/tokens/{token_id}").json()
            assert deleted["result"] == {"id": token_id}
            refused = own.get("/user/tokens/verify")
            assert refused.status_code == 401 and value not in refused.text
            assert refused.json()["errors"] == [{"code": 1000, "message": "Invalid API Token"}]
        assert admin.delete(f"/user/tokens/{token_id}").status_code == 404
        bad = admin.post("/user/tokens", json={"name": "t2", "policies": []})
        assert bad.status_code == 400 and bad.json()["success"] is False


# -- the provider --------------------------------------------------------------------------------


def _sendgrid(fake: FakeSendGrid, **changes: Any) -> tuple[HttpProvider, CredentialInfo,
                                                          SeededCredential]:
    harness = SendGridHarness(fake)
    table = {k: v for k, v in harness.provider_table().items() if k != "type"}
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    env = harness.env()
    provider = HttpProvider("sendgrid", HttpSettings.model_validate(table),
                            lambda ref: Secret(env[ref.env]))
    seeded = harness.seed(0)
    cred = CredentialInfo("mailer/sendgrid", "mailer", HttpParams.model_validate(seeded.params))
    return provider, cred, seeded


@pytest.fixture
def sendgrid(fake_sendgrid: FakeSendGrid) -> Iterator[tuple[HttpProvider, CredentialInfo,
                                                            SeededCredential]]:
    provider, cred, seeded = _sendgrid(fake_sendgrid)
    yield provider, cred, seeded
    provider.close()


def test_a_missing_var_stops_before_any_request(fake_sendgrid: FakeSendGrid, sendgrid: Any
                                                ) -> None:
    provider, _, _ = sendgrid
    before = fake_sendgrid.request_count()
    bare = CredentialInfo("mailer/sendgrid", "mailer", HttpParams())
    with pytest.raises(PermanentError) as caught:
        provider.create(bare, new_rotation_id())
    assert "credential mailer/sendgrid has no vars.subuser in [credentials.params.vars]" in str(
        caught.value)
    assert fake_sendgrid.request_count() == before


def test_create_answer_without_the_secret_says_where_the_key_is(
        fake_sendgrid: FakeSendGrid) -> None:
    provider, cred, _ = _sendgrid(fake_sendgrid, create={
        "path": "/v3/api_keys", "body": {"name": "{key_name}"}, "id_path": "api_key_id",
        "secret_path": "key"})
    rid = new_rotation_id()
    with pytest.raises(PermanentError) as caught:
        provider.create(cred, rid)
    message = str(caught.value)
    assert "nothing at create.secret_path" in message and f"rotator-{rid}" in message
    assert_no_secret_in_exception(caught.value, fake_sendgrid.issued_values(), "create")
    assert provider.find_by_rotation(cred, rid), "the key exists and can be found by name"


@pytest.mark.parametrize(("status", "retry_after"), [(503, None), (429, 3.0), (409, None)])
def test_service_trouble_is_transient(fake_sendgrid: FakeSendGrid, sendgrid: Any, status: int,
                                      retry_after: float | None) -> None:
    provider, cred, _ = sendgrid
    fake_sendgrid.inject_fault(status, method="POST", retry_after=retry_after)
    with pytest.raises(TransientError) as caught:
        provider.create(cred, new_rotation_id())
    assert caught.value.retry_after == retry_after and f"HTTP {status}" in str(caught.value)


def test_a_timeout_is_transient(fake_sendgrid: FakeSendGrid) -> None:
    provider, cred, seeded = _sendgrid(fake_sendgrid, timeout=0.2)
    fake_sendgrid.set_latency(0.6)
    with pytest.raises(TransientError, match="timed out") as caught:
        provider.verify(cred, Secret(seeded.value or ""))
    assert_no_secret_in_exception(caught.value, [seeded.value or ""], "verify timeout")


def test_a_refused_admin_key_is_about_the_configuration(fake_sendgrid: FakeSendGrid) -> None:
    calls: list[str] = []
    harness = SendGridHarness(fake_sendgrid)
    table = {k: v for k, v in harness.provider_table().items() if k != "type"}

    def resolve(ref: Any) -> Secret:
        calls.append(str(ref))
        return Secret("SG.wrongwrongwrongwrong0.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")

    provider = HttpProvider("sendgrid", HttpSettings.model_validate(table), resolve)
    cred = CredentialInfo("m/s", "m", HttpParams.model_validate(harness.seed(0).params))
    for attempt in range(2):
        with pytest.raises(PermanentError) as caught:
            provider.create(cred, new_rotation_id())
        assert not isinstance(caught.value, CredentialRejected)
        assert "refused the admin credential (HTTP 401)" in str(caught.value)
        assert "[providers.sendgrid]" in str(caught.value)
        assert len(calls) == attempt + 1, "secrets are resolved again after a 401"


def test_gone_is_believed_only_where_the_service_is(fake_sendgrid: FakeSendGrid) -> None:
    provider, cred, seeded = _sendgrid(fake_sendgrid, base_url=fake_sendgrid.url + "/wrong")
    with pytest.raises(NotFound, match=r"list\.path"):
        provider.revoke(cred, seeded.key_id or "")
    assert fake_sendgrid.is_valid(seeded.value or "")
    blind, cred, seeded = _sendgrid(fake_sendgrid, base_url=fake_sendgrid.url + "/wrong",
                                    list=None, identify=None)
    blind.revoke(cred, seeded.key_id or "")  # without a list call, 404 is trusted (documented)


def test_without_verify_list_or_identify(fake_sendgrid: FakeSendGrid) -> None:
    provider, cred, _ = _sendgrid(fake_sendgrid, verify=None, list=None, identify=None)
    assert provider.capabilities.create
    assert not provider.capabilities.identify and not provider.capabilities.verify_revoked
    assert type(provider).capabilities.identify, "the class says what the type can do at most"
    provider.verify(cred, Secret("anything-at-all"))
    rid = new_rotation_id()
    new = provider.create(cred, rid)
    assert provider.find_by_rotation(cred, rid) == []
    assert provider.identify(cred, new.secret) is None
    provider.revoke(cred, new.key_id)
    assert not fake_sendgrid.is_valid(new.secret.reveal())


def test_check_access_resolves_secrets_and_lists(fake_sendgrid: FakeSendGrid,
                                                 fake_cloudflare: FakeCloudflare) -> None:
    """``check --online``: the list call runs without the credential's vars (the on-behalf-of
    header that needs one is left out), so the admin key is really tried."""
    provider, _, _ = _sendgrid(fake_sendgrid)
    provider.check_access()
    assert fake_sendgrid.request_count("GET", "/v3/api_keys") == 1
    CloudflareHarness(fake_cloudflare).make_provider().check_access()
    table = {k: v for k, v in provider.config.model_dump(by_alias=True).items()
             if v is not None}
    wrong = HttpProvider("sendgrid", HttpSettings.model_validate(table),
                         lambda ref: Secret("SG.nope.nope-nope-nope"))
    with pytest.raises(PermanentError, match="refused the admin credential"):
        wrong.check_access()


def test_a_secret_never_becomes_an_id(fake_sendgrid: FakeSendGrid,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    greedy = {"id_pattern": "^(.*)$"}
    provider, cred, seeded = _sendgrid(fake_sendgrid, identify=greedy)
    assert provider.identify(cred, Secret(seeded.value or "")) is None
    same = {"path": "/v3/api_keys", "body": {"name": "{key_name}"}, "id_path": "api_key",
            "secret_path": "api_key"}
    with pytest.raises(ValueError, match="id_path and secret_path must differ"):
        _sendgrid(fake_sendgrid, create=same)
    assert all(v not in caplog.text for v in fake_sendgrid.issued_values())


def test_identify_ignores_a_working_key_the_listing_does_not_show(
        fake_sendgrid: FakeSendGrid, sendgrid: Any) -> None:
    provider, cred, seeded = sendgrid
    elsewhere = fake_sendgrid.add_subuser("someone-else")
    _, their_value = fake_sendgrid.seed_key(elsewhere)
    assert provider.identify(cred, Secret(their_value)) is None
    assert provider.identify(cred, Secret(seeded.value or "")) == seeded.key_id
    assert provider.identify(cred, Secret("not-a-sendgrid-key")) is None


def test_find_by_rotation_matches_the_name_as_a_word(fake_sendgrid: FakeSendGrid) -> None:
    provider, cred, _ = _sendgrid(fake_sendgrid, create={
        "path": "/v3/api_keys", "body": {"name": "{key_name} (mailer agent)"},
        "id_path": "api_key_id", "secret_path": "api_key"})
    rid = new_rotation_id()
    new = provider.create(cred, rid)
    assert provider.find_by_rotation(cred, rid) == [new.key_id]
    assert provider.find_by_rotation(cred, rid[:-1]) == []
    assert provider.find_by_rotation(cred, rid + "0") == []
    provider.revoke(cred, new.key_id)


def test_listing_follows_every_page(fake_cloudflare: FakeCloudflare) -> None:
    harness = CloudflareHarness(fake_cloudflare)
    provider = harness.make_provider("cloudflare")
    seeded = harness.seed(0)
    cred = CredentialInfo("dns/cf", "dns", HttpParams.model_validate(seeded.params))
    for i in range(55):
        fake_cloudflare.seed_token(f"filler-{i}")
    rid = new_rotation_id()
    new = provider.create(cred, rid)
    assert provider.find_by_rotation(cred, rid) == [new.key_id], "found on page 2 of 50"
    assert fake_cloudflare.request_count("GET", "page=3") == 1, "read until an empty page"
    provider.close()


def test_a_page_param_the_service_ignores_is_caught(fake_sendgrid: FakeSendGrid) -> None:
    listing = {"path": "/v3/api_keys", "items_path": "result", "id_path": "api_key_id",
               "page_param": "page"}
    provider, cred, _ = _sendgrid(fake_sendgrid, list=listing)
    with pytest.raises(PermanentError, match="repeats the page before it"):
        provider.find_by_rotation(cred, new_rotation_id())


@pytest.mark.parametrize("bad", ["line\nbreak", "caf\u00e9"])
def test_header_values_are_checked_without_showing_them(fake_sendgrid: FakeSendGrid,
                                                        bad: str) -> None:
    provider, _, _ = _sendgrid(fake_sendgrid)
    poisoned = HttpProvider("sendgrid", provider.config,
                            lambda ref: Secret("SG.secret-" + bad + "-value-0123456789"))
    cred = CredentialInfo("m/s", "m", HttpParams(vars={"subuser": "mailer"}))
    with pytest.raises(PermanentError, match="header Authorization would hold") as caught:
        poisoned.create(cred, new_rotation_id())
    assert_no_secret_in_exception(caught.value, ["SG.secret-" + bad + "-value-0123456789"],
                                  "a bad header value")
    odd = CredentialInfo("m/s", "m", HttpParams(vars={"subuser": "caf\u00e9"}))
    with pytest.raises(PermanentError, match="header on-behalf-of would hold"):
        provider.create(odd, new_rotation_id())


def test_nothing_secret_reaches_the_logs(fake_sendgrid: FakeSendGrid, sendgrid: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider, cred, seeded = sendgrid
    rid = new_rotation_id()
    assert provider.identify(cred, Secret(seeded.value or "")) == seeded.key_id
    new = provider.create(cred, rid)
    provider.verify(cred, new.secret)
    provider.revoke(cred, seeded.key_id or "")
    with pytest.raises(CredentialRejected):
        provider.verify(cred, Secret(seeded.value or ""))
    text = caplog.text
    assert all(value not in text for value in fake_sendgrid.issued_values())
    assert new.key_id in text, "key ids are logged"


# -- a whole rotation through the engine ---------------------------------------------------------


@pytest.mark.usefixtures("http_provider_types")
@pytest.mark.parametrize("make", [lambda: SendGridHarness(FakeSendGrid().start()),
                                  lambda: CloudflareHarness(FakeCloudflare().start())],
                         ids=["http-sendgrid", "http-cloudflare"])
def test_rotation_through_the_engine(make: Callable[[], Any], tmp_path: Path, openbao: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rotator.config import load_policies
    from rotator.engine import Engine, RotationRequest
    from rotator.runtime import Runtime
    from rotator.state.store import StateStore
    from tests.support import remember_issued

    harness = make()
    try:
        seeded = harness.seed(0)
        path = f"t{tmp_path.name[-12:]}/{harness.id}"
        openbao.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret={seeded.field: seeded.value, "OTHER": "keep"}, mount_point="secret")
        config = tmp_path / "rotation-policies.toml"
        config.write_text(tomli_w.dumps({
            "rotator": {"state_url": f"sqlite:///{tmp_path / 'state.db'}", "jitter": "0s"},
            "vaults": {"main": {"type": "vault", "url": openbao.url,
                                "token_env": "VAULT_TOKEN"}},
            "providers": {"svc": harness.provider_table()},
            "credentials": [{"name": "agent/svc", "agent": "agent", "provider": "svc",
                             "vault": "main", "path": path, "field": seeded.field,
                             "interval": "30d", "grace": "0s", "params": seeded.params}]}))
        for name, value in {**harness.env(), "VAULT_TOKEN": openbao.root_token}.items():
            monkeypatch.setenv(name, value)
        policies = load_policies(config)
        store, runtime = StateStore(policies.settings.state_url), Runtime(policies)
        engine = Engine(policies, runtime, store)
        try:
            engine.sync_credentials()
            result = engine.rotate(RotationRequest(credential="agent/svc", trigger="manual"))
            rotation = engine.store.rotation(result.rotation_id)
        finally:
            engine.close()
            runtime.close()
            store.close()
        assert result.outcome == "success", result.message
        assert rotation.old_key_id == seeded.key_id, "the adopted key was identified"
        current = openbao.client().secrets.kv.v2.read_secret_version(
            path=path, mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
        assert current["OTHER"] == "keep"
        assert harness.key_accepted(seeded, current[seeded.field], {})
        assert not harness.key_accepted(seeded, seeded.value, {}), "the old key is revoked"
        assert harness.live_key_ids(seeded) == {rotation.new_key_id}
    finally:
        remember_issued(harness.fake.issued_values())
        harness.fake.stop()


def test_readme_carries_the_doc_examples_verbatim() -> None:
    """The README's SendGrid and Cloudflare examples are the tested ones, character for
    character, so neither copy can rot."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    examples = doc_examples()
    assert {"sendgrid", "cloudflare"} <= set(examples)
    for name, block in examples.items():
        assert block in readme, f"README lacks the {name} example exactly as the doc has it"
