"""The ``stripe`` provider against the fake Stripe API over real HTTP, through the official SDK."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import stripe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from providers.stripe.api_keys import redaction_fits
from providers.stripe.client import retry_after
from providers.stripe.jwe import Undecryptable, decrypt_jwe
from providers.stripe.provider import (
    StripeParams,
    StripeProvider,
    StripeSettings,
    quiet_sdk_debug_logs,
)
from providers.stripe.webhooks import META_ROTATION
from rotator.errors import (
    CredentialRejected,
    PermanentError,
    RotatorError,
    TransientError,
)
from rotator.interfaces import CredentialInfo, Secret, key_name_for
from rotator.testing.fake_stripe import FakeStripeServer, _jwe_encrypt
from tests.support import free_port, remember_issued

URL = "https://research-agent.example/stripe/webhooks"
EVENTS = ["charge.succeeded", "invoice.paid"]


@dataclass
class World:
    fake: FakeStripeServer
    provider: StripeProvider
    hook: CredentialInfo
    """A webhook_secret credential for URL, with a legacy endpoint."""
    key: CredentialInfo
    """An api_key credential named "research-agent", with a legacy restricted key."""
    legacy_endpoint: tuple[str, str]
    legacy_key: tuple[str, str]
    resolved: list[Any] = field(default_factory=list)

    def provider_for(self, resolve: Callable[[Any], Secret] | None = None,
                     **settings: Any) -> StripeProvider:
        merged = {"api_key": {"env": "STRIPE_KEY"}, "api_base": self.fake.base_url,
                  "timeout": 5, **settings}
        return StripeProvider("stripe-test", StripeSettings.model_validate(merged),
                              resolve or (lambda ref: Secret(self.fake.admin_key)))

    def client(self, key: str | None = None) -> stripe.StripeClient:
        return stripe.StripeClient(key or self.fake.admin_key,
                                   base_addresses={"api": self.fake.base_url},
                                   max_network_retries=0,
                                   http_client=stripe.RequestsClient(timeout=5))


def make_world(fake: FakeStripeServer) -> Iterator[World]:
    legacy_endpoint = fake.seed_webhook_endpoint(
        URL, EVENTS, description="prod hook", metadata={"team": "research"},
        api_version="2024-06-20")
    legacy_key = fake.seed_api_key("research-agent", permissions=["balance_read", "charge_read"])
    fake.seed_webhook_endpoint("https://someone-else.example/hook")
    fake.seed_api_key("someone-else")
    resolved: list[Any] = []

    def resolve(ref: Any) -> Secret:
        resolved.append(ref)
        return Secret(fake.admin_key)

    provider = StripeProvider(
        "stripe-test",
        StripeSettings(api_key={"env": "STRIPE_KEY"}, api_base=fake.base_url, timeout=5),
        resolve,
    )
    world = World(
        fake=fake,
        provider=provider,
        hook=CredentialInfo("research-agent/stripe-webhook", "research-agent",
                            StripeParams(kind="webhook_secret", endpoint_url=URL)),
        key=CredentialInfo("research-agent/stripe", "research-agent",
                           StripeParams(kind="api_key", key_name="research-agent")),
        legacy_endpoint=legacy_endpoint,
        legacy_key=legacy_key,
        resolved=resolved,
    )
    try:
        yield world
    finally:
        provider.close()


@pytest.fixture
def world(fake_stripe: FakeStripeServer) -> Iterator[World]:
    yield from make_world(fake_stripe)


@pytest.fixture
def live_world() -> Iterator[World]:
    quiet_sdk_debug_logs()
    with FakeStripeServer(livemode=True) as fake:
        try:
            yield from make_world(fake)
        finally:
            remember_issued(fake.issued_values())


# -- webhook secrets --------------------------------------------------------------------------


def test_webhook_create_copies_the_endpoint_and_names_the_rotation(world: World) -> None:
    """The new endpoint has the URL, events, event API version and metadata of the current
    one, and carries ``rotator-<rid>`` in its description and metadata; the old one stays."""
    new = world.provider.create(world.hook, "r1")
    endpoints = {e["id"]: e for e in world.fake.live_webhook_endpoints(URL)}
    assert set(endpoints) == {world.legacy_endpoint[0], new.key_id}
    made = endpoints[new.key_id]
    assert made["enabled_events"] == EVENTS and made["api_version"] == "2024-06-20"
    assert made["description"] == key_name_for("r1")
    assert made["metadata"] == {"team": "research", META_ROTATION: key_name_for("r1"),
                                "rotator_credential": world.hook.name}
    assert world.fake.webhook_secret_live(new.secret.reveal(), url=URL)
    assert world.fake.webhook_secret_live(world.legacy_endpoint[1], url=URL)


def test_webhook_enabled_events_override_and_missing_endpoint(world: World) -> None:
    """``enabled_events`` wins over the current endpoint's; a URL without any endpoint needs
    ``enabled_events``, and the error says so."""
    override = CredentialInfo("a/hook", "a", StripeParams(
        kind="webhook_secret", endpoint_url=URL, enabled_events=["*"]))
    new = world.provider.create(override, "r1")
    assert next(e for e in world.fake.live_webhook_endpoints(URL)
                if e["id"] == new.key_id)["enabled_events"] == ["*"]
    fresh = CredentialInfo("b/hook", "b", StripeParams(
        kind="webhook_secret", endpoint_url="https://fresh.example/hook"))
    with pytest.raises(PermanentError, match=r"set params\.enabled_events"):
        world.provider.create(fresh, "r2")
    assert world.fake.live_webhook_endpoints("https://fresh.example/hook") == []


def test_webhook_verify_checks_the_endpoint(world: World) -> None:
    """A signing secret authenticates nothing at Stripe: verify passes while its endpoint
    exists for this URL and is enabled, and refuses a disabled, deleted or foreign one."""
    new = world.provider.create(world.hook, "r1")
    world.provider.verify(world.hook, new.secret, key_id=new.key_id)
    with pytest.raises(PermanentError, match=r"endpoint .* is not known"):
        world.provider.verify(world.hook, new.secret)
    with pytest.raises(CredentialRejected, match="not a Stripe webhook signing secret"):
        world.provider.verify(world.hook, Secret("sk_test_notawebhooksecret"), key_id=new.key_id)
    other = world.fake.live_webhook_endpoints("https://someone-else.example/hook")[0]["id"]
    with pytest.raises(CredentialRejected, match="not the endpoint of"):
        world.provider.verify(world.hook, new.secret, key_id=other)
    world.client().v1.webhook_endpoints.update(new.key_id, params={"disabled": True})
    with pytest.raises(CredentialRejected, match="disabled"):
        world.provider.verify(world.hook, new.secret, key_id=new.key_id)
    world.provider.revoke(world.hook, new.key_id)
    with pytest.raises(CredentialRejected, match="no longer exists"):
        world.provider.verify(world.hook, new.secret, key_id=new.key_id)


def test_webhook_revoke_is_idempotent_and_refuses_other_urls(world: World) -> None:
    """Delete twice is success; an endpoint of another URL is never deleted."""
    new = world.provider.create(world.hook, "r1")
    world.provider.revoke(world.hook, new.key_id)
    world.provider.revoke(world.hook, new.key_id)
    assert not world.fake.webhook_secret_live(new.secret.reveal())
    other = world.fake.live_webhook_endpoints("https://someone-else.example/hook")[0]["id"]
    with pytest.raises(PermanentError, match="refusing to delete"):
        world.provider.revoke(world.hook, other)
    assert world.fake.live_webhook_endpoints("https://someone-else.example/hook")


def test_webhook_identify_never_guesses(world: World) -> None:
    """No Stripe API maps a signing secret to its endpoint: identify returns None."""
    assert world.provider.identify(world.hook, Secret(world.legacy_endpoint[1])) is None


def test_find_by_rotation_follows_pagination(world: World) -> None:
    """Both listings are read to the end: v1 cursors and v2 ``next_page_url``."""
    world.provider.list_page_size = 2  # type: ignore[misc]
    for i in range(5):
        world.fake.seed_webhook_endpoint(f"https://filler.example/{i}")
        world.fake.seed_api_key(f"filler-{i}")
    hook = world.provider.create(world.hook, "r1")
    key = world.provider.create(world.key, "r1")
    for i in range(5, 10):
        world.fake.seed_webhook_endpoint(f"https://filler.example/{i}")
        world.fake.seed_api_key(f"filler-{i}")
    assert world.provider.find_by_rotation(world.hook, "r1") == [hook.key_id]
    assert world.provider.find_by_rotation(world.key, "r1") == [key.key_id]
    assert world.fake.request_count("GET", "starting_after=") >= 3
    assert world.fake.request_count("GET", "page=") >= 3


# -- API keys ---------------------------------------------------------------------------------


def test_api_key_create_copies_permissions_and_notes_the_rotation(world: World) -> None:
    """A new restricted key named ``key_name``, noted ``rotator-<rid>``, with the current
    key's permissions; the current key keeps working."""
    new = world.provider.create(world.key, "r1")
    info = world.fake.api_key_info(new.key_id)
    assert info is not None
    assert (info["name"], info["note"]) == ("research-agent", key_name_for("r1"))
    assert sorted(info["permissions"]) == ["balance_read", "charge_read"]
    assert new.secret.reveal().startswith("rk_test_")
    assert world.fake.api_key_accepted(new.secret.reveal())
    assert world.fake.api_key_accepted(world.legacy_key[1])


def test_api_key_create_with_explicit_permissions(world: World) -> None:
    cred = CredentialInfo("a/key", "a", StripeParams(
        kind="api_key", key_name="fresh-agent", permissions=["balance_read"],
        connect_permissions=["charge_read"]))
    new = world.provider.create(cred, "r1")
    info = world.fake.api_key_info(new.key_id)
    assert info is not None and info["permissions"] == ["balance_read"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("none", "no live Stripe API key is named 'research-agent'"),
        ("differing", "have different permissions: set params.permissions"),
        ("allowlist", "has an IP allowlist"),
    ],
)
def test_api_key_create_refuses_what_it_cannot_copy(
    world: World, setup: str, message: str
) -> None:
    """No key to copy permissions from, keys that disagree, or an IP allowlist (which the
    create API cannot set): refused before anything is created, saying what to fix."""
    client = world.client()
    if setup == "none":
        client.raw_request("post", f"/v2/iam/api_keys/{world.legacy_key[0]}/expire")
    elif setup == "differing":
        world.fake.seed_api_key("research-agent", permissions=["balance_read"])
    else:
        world.fake.seed_api_key("research-agent", permissions=["balance_read", "charge_read"],
                                ip_allowlist=["10.0.0.0/8"])
    before = world.fake.live_api_keys()
    with pytest.raises(PermanentError, match=message):
        world.provider.create(world.key, "r1")
    assert world.fake.live_api_keys() == before


@pytest.mark.parametrize("alg", ["RSA-OAEP-256", "RSA-OAEP"])
def test_live_mode_secret_is_decrypted_locally(live_world: World, alg: str) -> None:
    """Live mode returns the secret only as a JWE to the rotation's public key (with either
    OAEP hash); the provider decrypts it and the key works."""
    live_world.fake.jwe_alg = alg
    new = live_world.provider.create(live_world.key, "r1")
    assert new.secret.reveal().startswith("rk_live_")
    assert live_world.fake.api_key_accepted(new.secret.reveal())
    live_world.provider.verify(live_world.key, new.secret, key_id=new.key_id)


def test_undecryptable_secret_expires_the_new_key(live_world: World) -> None:
    """A secret the provider cannot read is useless: the key is expired again at once and the
    error names the key and the reason, never any value."""
    live_world.fake.jwe_alg = "RSA1_5"
    with pytest.raises(PermanentError, match=r"RSA1_5.*expired again") as caught:
        live_world.provider.create(live_world.key, "r1")
    assert caught.value.__cause__ is None
    made = [k for k in live_world.fake.live_api_keys("research-agent")
            if k["note"] == key_name_for("r1")]
    assert made == []
    assert live_world.fake.api_key_accepted(live_world.legacy_key[1])


def test_crash_right_after_create_leaves_old_key_and_is_found(live_world: World) -> None:
    """The process dies right after create returned (the result is dropped, the private key
    with it): the old key still works, ``find_by_rotation`` finds the stray, and revoking it
    leaves the old key working."""
    live_world.provider.create(live_world.key, "r-crash")  # result lost with the process
    restarted = live_world.provider_for()
    try:
        assert live_world.fake.api_key_accepted(live_world.legacy_key[1])
        strays = restarted.find_by_rotation(live_world.key, "r-crash")
        assert len(strays) == 1 and strays[0] != live_world.legacy_key[0]
        for key_id in strays:
            restarted.revoke(live_world.key, key_id)
        assert restarted.find_by_rotation(live_world.key, "r-crash") == []
        live = {k["id"] for k in live_world.fake.live_api_keys("research-agent")}
        assert live == {live_world.legacy_key[0]}
        restarted.verify(live_world.key, Secret(live_world.legacy_key[1]))
    finally:
        restarted.close()


def test_api_key_verify_live_forbidden_and_expired(world: World) -> None:
    """A key that may not read the balance still authenticated (403): alive. An expired one
    (401) is ``CredentialRejected``, without the key in the message or its chain."""
    _, narrow = world.fake.seed_api_key("narrow", permissions=["charge_read"])
    world.provider.verify(world.key, Secret(narrow))
    new = world.provider.create(world.key, "r1")
    world.provider.verify(world.key, new.secret, key_id=new.key_id)
    world.provider.revoke(world.key, new.key_id)
    with pytest.raises(CredentialRejected) as caught:
        world.provider.verify(world.key, new.secret, key_id=new.key_id)
    _assert_no_secret(caught.value, [new.secret.reveal()])


def test_api_key_revoke_is_idempotent_and_refuses_other_names(world: World) -> None:
    """Expire twice, an unknown id, or an already expired key: success. A key of another
    name is never expired."""
    new = world.provider.create(world.key, "r1")
    world.provider.revoke(world.key, new.key_id)
    world.provider.revoke(world.key, new.key_id)
    world.provider.revoke(world.key, "apikey_doesnotexist000000000")
    assert not world.fake.api_key_accepted(new.secret.reveal())
    other_id, other = world.fake.seed_api_key("other-agent")
    with pytest.raises(PermanentError, match="refusing to expire"):
        world.provider.revoke(world.key, other_id)
    assert world.fake.api_key_accepted(other)


def test_expire_propagation_is_visible_to_verify(world: World) -> None:
    """Stripe takes a few seconds to stop an expired key: verify reports what Stripe says
    now (still accepted), and the key dies once propagation ends."""
    world.fake.set_expire_propagation(0.3)
    new = world.provider.create(world.key, "r1")
    world.provider.revoke(world.key, new.key_id)
    assert world.provider.find_by_rotation(world.key, "r1") == []
    world.provider.verify(world.key, new.secret)
    threading.Event().wait(0.4)
    with pytest.raises(CredentialRejected):
        world.provider.verify(world.key, new.secret)


def test_api_key_identify(world: World, live_world: World) -> None:
    """Test mode compares listed tokens exactly; live mode fits the redacted form. Unknown
    values and keys of other names are None."""
    for w in (world, live_world):
        key_id, token = w.legacy_key
        assert w.provider.identify(w.key, Secret(token)) == key_id
        lookalike = token[:-4] + ("aaaa" if not token.endswith("aaaa") else "bbbb")
        assert w.provider.identify(w.key, Secret(lookalike)) is None
        _, other = w.fake.seed_api_key("other-agent")
        assert w.provider.identify(w.key, Secret(other)) is None


def test_concurrent_creates_from_threads(world: World) -> None:
    """One provider serves several rotations at once."""
    made: list[str] = []
    errors: list[BaseException] = []

    def rotate(i: int) -> None:
        try:
            made.append(world.provider.create(world.key, f"r{i}").key_id)
            made.append(world.provider.create(world.hook, f"r{i}").key_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 8


# -- errors and the admin key -----------------------------------------------------------------


def test_rate_limits_are_transient_with_retry_after(world: World) -> None:
    world.fake.inject_fault(429, path_contains="/v1/webhook_endpoints", retry_after=3)
    with pytest.raises(TransientError, match="rate limited") as caught:
        world.provider.find_by_rotation(world.hook, "r1")
    assert caught.value.retry_after == 3
    world.fake.inject_fault(429, path_contains="/v2/iam/api_keys")
    with pytest.raises(TransientError, match="rate limited"):
        world.provider.find_by_rotation(world.key, "r1")


@pytest.mark.parametrize("status", [409, 500, 503])
def test_server_errors_are_transient(world: World, status: int) -> None:
    world.fake.inject_fault(status, path_contains="/v1/balance")
    with pytest.raises(TransientError):
        world.provider.verify(world.key, Secret(world.legacy_key[1]))
    world.provider.verify(world.key, Secret(world.legacy_key[1]))


def test_unreachable_and_slow_stripe_is_transient(world: World) -> None:
    down = world.provider_for(api_base=f"http://127.0.0.1:{free_port()}")
    slow = world.provider_for(timeout=0.2)
    try:
        with pytest.raises(TransientError, match="could not reach Stripe"):
            down.find_by_rotation(world.hook, "r1")
        world.fake.set_latency(0.5)
        with pytest.raises(TransientError, match="could not reach Stripe"):
            slow.find_by_rotation(world.key, "r1")
    finally:
        world.fake.reset_faults()
        down.close()
        slow.close()


def test_refused_admin_key_is_permanent_and_resolved_again(world: World) -> None:
    """A 401 on an admin call is a ``PermanentError`` naming the setting (never a
    ``CredentialRejected``, never the key); the next call resolves ``api_key`` again, so a
    rotated admin key is picked up."""
    world.provider.find_by_rotation(world.hook, "r1")
    old_admin = world.fake.admin_key
    world.fake.replace_admin_key()
    with pytest.raises(PermanentError, match=r"api_key in \[providers.stripe-test\]") as caught:
        world.provider.find_by_rotation(world.hook, "r1")
    assert not isinstance(caught.value, CredentialRejected)
    _assert_no_secret(caught.value, [old_admin, world.fake.admin_key])
    assert world.provider.find_by_rotation(world.hook, "r1") == []
    assert len(world.resolved) == 2


def test_admin_key_without_rights_is_permanent(world: World) -> None:
    """A restricted key as the provider's key: a 403 saying what kind of key is needed."""
    _, restricted = world.fake.seed_api_key("ops", permissions=["balance_read"])
    weak = world.provider_for(lambda ref: Secret(restricted))
    try:
        with pytest.raises(PermanentError, match="may not do this"):
            weak.create(world.hook, "r1")
    finally:
        weak.close()


def test_check_access(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Lists webhook endpoints and API keys; a key that may manage endpoints but not API keys
    passes with a warning (the account may rotate webhook secrets only)."""
    world.provider.check_access()
    _, full = world.fake.seed_api_key("ops", permissions=None)
    endpoints_only = world.provider_for(lambda ref: Secret(full))
    bad = world.provider_for(lambda ref: Secret("sk_test_" + "Z" * 60))
    try:
        with caplog.at_level(logging.WARNING, logger="providers.stripe.provider"):
            endpoints_only.check_access()
        assert "api_key credentials cannot be rotated" in caplog.text
        with pytest.raises(PermanentError, match="refused the provider's key"):
            bad.check_access()
    finally:
        endpoints_only.close()
        bad.close()


def test_no_secret_reaches_exceptions_or_logs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Test-mode listings carry every key's token and the create response the signing secret:
    none of them reaches a log record (the SDK's DEBUG bodies included) or an exception."""
    caplog.set_level(logging.DEBUG)
    errors: list[RotatorError] = []
    hook = world.provider.create(world.hook, "r1")
    key = world.provider.create(world.key, "r1")
    world.provider.identify(world.key, Secret(world.legacy_key[1]))
    world.provider.find_by_rotation(world.key, "r1")
    world.provider.revoke(world.key, key.key_id)
    world.provider.revoke(world.hook, hook.key_id)
    for secret, key_id, cred in ((key.secret, key.key_id, world.key),
                                 (hook.secret, hook.key_id, world.hook)):
        try:
            world.provider.verify(cred, secret, key_id=key_id)
        except RotatorError as exc:
            errors.append(exc)
    for status in (400, 429, 500):
        world.fake.inject_fault(status, retry_after=1)
        try:
            world.provider.verify(world.key, Secret(world.legacy_key[1]))
        except RotatorError as exc:
            errors.append(exc)
    bad_key = "sk_test_" + "Z" * 60
    bad = world.provider_for(lambda ref: Secret(bad_key))
    try:
        bad.find_by_rotation(world.key, "r1")
    except RotatorError as exc:
        errors.append(exc)
    finally:
        bad.close()

    assert len(errors) == 6
    values = [*world.fake.issued_values(), bad_key]
    for error in errors:
        _assert_no_secret(error, values)
    for value in values:
        assert value not in caplog.text


def test_optional_settings_reach_the_sdk(world: World) -> None:
    """``api_version`` (for the v2 calls) and ``stripe_context`` are accepted by the SDK."""
    tuned = world.provider_for(api_version="2026-01-28.preview", stripe_context="acct_1Test")
    try:
        new = tuned.create(world.key, "r1")
        assert tuned.find_by_rotation(world.key, "r1") == [new.key_id]
        tuned.revoke(world.key, new.key_id)
    finally:
        tuned.close()


def test_close_then_reuse(world: World) -> None:
    world.provider.check_access()
    world.provider.close()
    world.provider.close()
    world.provider.check_access()
    assert len(world.resolved) == 2


# -- settings, params and helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "webhook_secret"}, 'kind = "webhook_secret" needs endpoint_url'),
        ({"kind": "api_key"}, 'kind = "api_key" needs key_name'),
        ({"kind": "webhook_secret", "endpoint_url": URL, "key_name": "a"},
         'key_name only applies to kind = "api_key": remove it or change kind'),
        ({"kind": "api_key", "key_name": "a", "endpoint_url": URL, "enabled_events": ["*"]},
         'endpoint_url, enabled_events only apply to kind = "webhook_secret"'),
        ({"kind": "webhook_secret", "endpoint_url": "ftp://x.example"},
         "endpoint_url must be the http\\(s\\) URL"),
        ({"kind": "webhook_secret", "endpoint_url": URL, "enabled_events": []},
         "enabled_events is empty"),
        ({"kind": "webhook_secret", "endpoint_url": URL, "enabled_events": ["Charge paid"]},
         "'Charge paid', which is not a Stripe event type"),
        ({"kind": "api_key", "key_name": "  "}, "key_name is empty"),
        ({"kind": "api_key", "key_name": "a", "permissions": []},
         "must list Stripe permission names"),
        ({"kind": "api-key", "key_name": "a"}, "'webhook_secret' or 'api_key'"),
        ({"kind": "api_key", "key_name": "a", "keyname": "b"}, "Extra inputs"),
    ],
)
def test_params_say_what_to_fix(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StripeParams.model_validate(params)


def test_settings_say_what_to_fix() -> None:
    with pytest.raises(ValidationError, match="drop the trailing 'v1'"):
        StripeSettings(api_key={"env": "K"}, api_base="https://api.stripe.com/v1")
    with pytest.raises(ValidationError, match="must start with https://"):
        StripeSettings(api_key={"env": "K"}, api_base="api.stripe.com")
    with pytest.raises(ValidationError, match="secrets never go in the policy file"):
        StripeSettings.model_validate({"api_key": "sk_live_pasted"})
    with pytest.raises(ValidationError, match="without spaces"):
        StripeSettings(api_key={"env": "K"}, stripe_context=" ")
    settings = StripeSettings(api_key={"env": "K"}, api_base="https://api.stripe.com/")
    assert (settings.api_base, settings.timeout) == ("https://api.stripe.com", 30)
    assert StripeProvider.type_name == "stripe"


def test_jwe_decryption_edge_cases() -> None:
    """The compact form may come base64-wrapped; anything tampered with or of an unknown
    algorithm is refused by name, never silently."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    compact = _jwe_encrypt("rk_live_token", pem, "RSA-OAEP-256", "kid")
    assert decrypt_jwe(compact, private) == "rk_live_token"
    assert decrypt_jwe(base64.b64encode(compact.encode()).decode(), private) == "rk_live_token"
    head, wrapped, iv, body, tag = compact.split(".")
    flipped = tag[:-2] + ("AA" if not tag.endswith("AA") else "BA")
    with pytest.raises(Undecryptable, match="does not decrypt"):
        decrypt_jwe(".".join([head, wrapped, iv, body, flipped]), private)
    with pytest.raises(Undecryptable, match="not a compact JWE"):
        decrypt_jwe("not-a-jwe", private)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Undecryptable, match="does not decrypt"):
        decrypt_jwe(compact, other)
    unknown_enc = base64.urlsafe_b64encode(b'{"alg":"RSA-OAEP-256","enc":"A128CBC-HS256"}')
    with pytest.raises(Undecryptable, match="A128CBC-HS256"):
        decrypt_jwe(".".join([unknown_enc.decode().rstrip("="), wrapped, iv, body, tag]),
                     private)


def test_redaction_matching_and_retry_after() -> None:
    value = "rk_live_51abcdefghijklmnop"
    assert redaction_fits("rk_live_...mnop", value)
    assert not redaction_fits("rk_live_...xxxx", value)
    assert not redaction_fits("sk_live_...mnop", value)
    assert not redaction_fits("", value)
    assert retry_after({"Retry-After": "3"}) == 3
    assert retry_after({}) is None and retry_after({"retry-after": "soon"}) is None


def test_importing_the_provider_does_not_import_the_sdk() -> None:
    code = ("import sys, providers.stripe.provider; "
            "assert 'stripe' not in sys.modules and 'cryptography' not in sys.modules")
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
