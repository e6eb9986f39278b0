"""The fake Stripe API follows Stripe's documented shapes, driven through the official SDK.

If the fake drifted from Stripe (a secret in a listing, a missing cursor, a 200 for an expired
key) the provider tests would pass against something that is not Stripe; these tests pin the
shapes the ``stripe`` provider relies on, and that dead keys and deleted endpoints really die.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import stripe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from providers.stripe.provider import quiet_sdk_debug_logs
from rotator.testing.fake_stripe import FakeStripeServer
from tests.support import serve_fake


class Clock:
    """A clock tests move by hand (the fake's expiries follow it)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def client_for(fake: FakeStripeServer, key: str | None = None) -> stripe.StripeClient:
    return stripe.StripeClient(
        key or fake.admin_key,
        base_addresses={"api": fake.base_url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=5),
    )


def key_pair() -> tuple[Any, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, pem


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _serve(livemode: bool, clock: Clock) -> Iterator[FakeStripeServer]:
    quiet_sdk_debug_logs()
    yield from serve_fake(FakeStripeServer(livemode=livemode, clock=clock))


@pytest.fixture
def live_fake(clock: Clock) -> Iterator[FakeStripeServer]:
    """A live-mode account on a hand-moved clock."""
    yield from _serve(True, clock)


@pytest.fixture
def clocked_fake(clock: Clock) -> Iterator[FakeStripeServer]:
    """A test-mode account on a hand-moved clock."""
    yield from _serve(False, clock)


# -- webhook endpoints (v1) -------------------------------------------------------------------


def test_webhook_endpoint_secret_only_at_creation(fake_stripe: FakeStripeServer) -> None:
    """Create returns ``secret`` (whsec_...); retrieve and list never do; delete answers
    ``deleted: true`` and the endpoint is gone (404 ``resource_missing``), twice."""
    client = client_for(fake_stripe)
    created = client.v1.webhook_endpoints.create(params={
        "url": "https://agent.example/hook",
        "enabled_events": ["charge.succeeded", "invoice.paid"],
        "description": "agent hook",
        "metadata": {"team": "a"},
        "api_version": "2024-06-20",
    })
    assert created.object == "webhook_endpoint"
    assert created.id.startswith("we_")
    assert created.secret.startswith("whsec_")
    assert created.status == "enabled"
    assert created.enabled_events == ["charge.succeeded", "invoice.paid"]
    assert created.metadata.to_dict() == {"team": "a"}
    assert (created.description, created.api_version) == ("agent hook", "2024-06-20")

    fetched = client.v1.webhook_endpoints.retrieve(created.id)
    assert "secret" not in fetched and fetched.url == "https://agent.example/hook"
    listed = client.v1.webhook_endpoints.list().data
    assert [e.id for e in listed] == [created.id] and "secret" not in listed[0]

    deleted = client.v1.webhook_endpoints.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    for call in (client.v1.webhook_endpoints.retrieve, client.v1.webhook_endpoints.delete):
        with pytest.raises(stripe.InvalidRequestError) as caught:
            call(created.id)
        assert caught.value.http_status == 404 and caught.value.code == "resource_missing"


def test_webhook_list_pages_newest_first(fake_stripe: FakeStripeServer) -> None:
    """The list is newest first, pages with ``has_more``/``starting_after`` as the SDK's
    auto-pagination expects, and refuses a limit above 100."""
    ids = [fake_stripe.seed_webhook_endpoint(f"https://a.example/{i}")[0] for i in range(5)]
    client = client_for(fake_stripe)
    first = client.v1.webhook_endpoints.list(params={"limit": 2})
    assert first.has_more and [e.id for e in first.data] == ids[::-1][:2]
    assert [e.id for e in first.auto_paging_iter()] == ids[::-1]
    with pytest.raises(stripe.InvalidRequestError, match="maximum page limit is 100"):
        client.v1.webhook_endpoints.list(params={"limit": 101})


def test_webhook_create_and_update_validate_like_stripe(fake_stripe: FakeStripeServer) -> None:
    """Missing params and malformed event names are 400s naming the param; ``disabled``
    switches ``status``; an empty metadata value unsets that key."""
    client = client_for(fake_stripe)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.webhook_endpoints.create(params={"enabled_events": ["*"]})  # type: ignore[typeddict-item]
    assert caught.value.param == "url"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.webhook_endpoints.create(
            params={"url": "https://a.example/h", "enabled_events": ["Not An Event"]})
    assert caught.value.param == "enabled_events[0]"
    endpoint_id, _ = fake_stripe.seed_webhook_endpoint("https://a.example/h",
                                                       metadata={"a": "1", "b": "2"})
    updated = client.v1.webhook_endpoints.update(
        endpoint_id, params={"disabled": True, "metadata": {"a": ""}})
    assert updated.status == "disabled" and updated.metadata.to_dict() == {"b": "2"}


def test_signed_event_verifies_and_dies_with_its_endpoint(fake_stripe: FakeStripeServer) -> None:
    """A delivery signed with the endpoint's secret passes the SDK's own signature check; once
    the endpoint is deleted its secret is no longer live and nothing is signed with it."""
    url = "https://agent.example/hook"
    endpoint_id, secret = fake_stripe.seed_webhook_endpoint(url)
    payload = json.dumps({"id": "evt_1", "object": "event", "type": "charge.succeeded",
                          "data": {"object": {}}})
    header = fake_stripe.sign_event(endpoint_id, payload)
    event = stripe.Webhook.construct_event(payload, header, secret)
    assert event.id == "evt_1"
    assert fake_stripe.webhook_secret_live(secret, url=url)
    assert not fake_stripe.webhook_secret_live(secret, url="https://other.example/hook")
    client_for(fake_stripe).v1.webhook_endpoints.delete(endpoint_id)
    assert not fake_stripe.webhook_secret_live(secret)
    with pytest.raises(KeyError):
        fake_stripe.sign_event(endpoint_id, payload)


# -- authentication ---------------------------------------------------------------------------


def test_unknown_key_gets_401_that_masks_it(fake_stripe: FakeStripeServer) -> None:
    """An unknown key is refused with Stripe's 401, quoting only its last four characters."""
    bogus = "sk_test_51" + "Q" * 90 + "wxyz"
    with pytest.raises(stripe.AuthenticationError) as caught:
        client_for(fake_stripe, bogus).v1.balance.retrieve()
    assert caught.value.http_status == 401
    assert bogus not in str(caught.value) and "wxyz" in str(caught.value)


def test_only_the_admin_key_manages_keys(fake_stripe: FakeStripeServer) -> None:
    """A restricted key may read the balance (with ``balance_read``) but not manage webhook
    endpoints or API keys; an unrestricted one may manage endpoints but not API keys."""
    _, restricted = fake_stripe.seed_api_key("r", permissions=["balance_read"])
    _, narrow = fake_stripe.seed_api_key("n", permissions=["charge_read"])
    _, full = fake_stripe.seed_api_key("f", permissions=None)
    assert restricted.startswith("rk_test_") and full.startswith("sk_test_")
    client_for(fake_stripe, restricted).v1.balance.retrieve()
    with pytest.raises(stripe.PermissionError):
        client_for(fake_stripe, narrow).v1.balance.retrieve()
    with pytest.raises(stripe.PermissionError):
        client_for(fake_stripe, restricted).v1.webhook_endpoints.list()
    client_for(fake_stripe, full).v1.webhook_endpoints.list()
    for key in (restricted, full):
        with pytest.raises(stripe.PermissionError):
            client_for(fake_stripe, key).raw_request("get", "/v2/iam/api_keys")


# -- API keys (v2) ----------------------------------------------------------------------------


def test_live_mode_secret_comes_back_encrypted_once(live_fake: FakeStripeServer) -> None:
    """Live mode: a secret key needs a ``public_key``; the response carries
    ``secret_key.encrypted_secret`` (a standard compact JWE, RSA-OAEP-256 + A256GCM, that an
    independent JOSE library decrypts) and no token; listings show only the redacted form."""
    pytest.importorskip("joserfc", reason="joserfc checks the JWE independently of rotator")
    from joserfc import jwe
    from joserfc.jwk import RSAKey

    client = client_for(live_fake)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.raw_request("post", "/v2/iam/api_keys", type="secret_key", name="x")
    assert caught.value.http_status == 400
    private, pem = key_pair()
    data = client.raw_request(
        "post", "/v2/iam/api_keys", type="secret_key", name="agent", note="rotator-r1",
        permissions=["balance_read"],
        public_key={"id": "rotator-r1", "pem_key": {"algorithm": "RSA", "data": pem}},
    ).data
    assert data["object"] == "v2.iam.api_key" and data["status"] == "active"
    assert (data["name"], data["note"], data["livemode"]) == ("agent", "rotator-r1", True)
    encrypted = data["secret_key"]["encrypted_secret"]
    assert encrypted["format"] == "jwe_compact" and encrypted["recipient_key_id"] == "rotator-r1"
    assert data["secret_key"]["token"] is None
    jwk = RSAKey.import_key(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    plain = jwe.decrypt_compact(encrypted["ciphertext"], jwk,
                                algorithms=["RSA-OAEP-256", "A256GCM"]).plaintext
    token = plain.decode()
    assert token.startswith("rk_live_") and live_fake.api_key_accepted(token)
    listed = client.raw_request("get", "/v2/iam/api_keys").data["data"]
    assert listed[0]["secret_key"]["token"] is None
    assert listed[0]["secret_key"]["encrypted_secret"] is None
    redacted = listed[0]["secret_key"]["secret_token_redacted"]
    assert redacted == f"rk_live_...{token[-4:]}"
    with pytest.raises(stripe.InvalidRequestError):
        client.raw_request("post", "/v2/iam/api_keys", type="secret_key",
                           public_key={"pem_key": {"algorithm": "EC", "data": pem}})


def test_test_mode_shows_tokens_everywhere(fake_stripe: FakeStripeServer) -> None:
    """Test mode, as a Stripe sandbox: create, list and retrieve carry the plaintext token."""
    client = client_for(fake_stripe)
    created = client.raw_request("post", "/v2/iam/api_keys", type="secret_key",
                                 name="agent").data
    token = created["secret_key"]["token"]
    assert token.startswith("sk_test_") and created["secret_key"]["encrypted_secret"] is None
    assert client.raw_request("get", f"/v2/iam/api_keys/{created['id']}").data[
        "secret_key"]["token"] == token
    assert client.raw_request("get", "/v2/iam/api_keys").data["data"][0][
        "secret_key"]["token"] == token


def test_api_key_list_pages_with_next_page_url(fake_stripe: FakeStripeServer) -> None:
    """The list pages through ``next_page_url`` (newest first) and refuses limit > 100."""
    ids = [fake_stripe.seed_api_key(f"k{i}")[0] for i in range(5)]
    client = client_for(fake_stripe)
    seen: list[str] = []
    page = client.raw_request("get", "/v2/iam/api_keys", limit=2).data
    while True:
        seen += [item["id"] for item in page["data"]]
        if not page["next_page_url"]:
            break
        page = client.raw_request("get", page["next_page_url"]).data
    assert seen == ids[::-1]
    with pytest.raises(stripe.InvalidRequestError, match="maximum page limit is 100"):
        client.raw_request("get", "/v2/iam/api_keys", limit=101)


def test_expired_key_is_refused_with_stripe_401(fake_stripe: FakeStripeServer) -> None:
    """``/expire`` kills the key at once (401 ``api_key_expired``), hides it from the default
    listing, and is harmless to repeat."""
    key_id, token = fake_stripe.seed_api_key("agent")
    client = client_for(fake_stripe)
    expired = client.raw_request("post", f"/v2/iam/api_keys/{key_id}/expire").data
    assert expired["status"] == "expired" and expired["expires_at"]
    with pytest.raises(stripe.AuthenticationError) as caught:
        client_for(fake_stripe, token).v1.balance.retrieve()
    body: Any = caught.value.json_body
    assert body["error"]["code"] == "api_key_expired"
    assert body["error"]["message"].startswith("Expired API Key provided")
    assert client.raw_request("post", f"/v2/iam/api_keys/{key_id}/expire").data["status"] == (
        "expired")
    assert client.raw_request("get", "/v2/iam/api_keys").data["data"] == []
    listed = client.raw_request("get", "/v2/iam/api_keys", include_expired="true").data["data"]
    assert [item["id"] for item in listed] == [key_id]


def test_rotate_honours_expire_current_key_in_minutes(
    live_fake: FakeStripeServer, clock: Clock
) -> None:
    """``/rotate`` makes a new key with the old one's name, note and permissions; the old key
    works until ``expire_current_key_in_minutes`` have passed on the clock, then gets 401.
    More than 7 days is refused."""
    old_id, old = live_fake.seed_api_key("agent", note="legacy", permissions=["balance_read"])
    client = client_for(live_fake)
    _, pem = key_pair()
    public_key = {"pem_key": {"algorithm": "RSA", "data": pem}}
    with pytest.raises(stripe.InvalidRequestError):
        client.raw_request("post", f"/v2/iam/api_keys/{old_id}/rotate",
                           expire_current_key_in_minutes=10081, public_key=public_key)
    new = client.raw_request("post", f"/v2/iam/api_keys/{old_id}/rotate",
                             expire_current_key_in_minutes=30, public_key=public_key).data
    assert new["id"] != old_id
    assert (new["name"], new["note"], new["permissions"]) == ("agent", "legacy", ["balance_read"])
    clock.now += 29 * 60
    assert live_fake.api_key_accepted(old)
    client_for(live_fake, old).v1.balance.retrieve()
    clock.now += 2 * 60
    assert not live_fake.api_key_accepted(old)
    with pytest.raises(stripe.AuthenticationError):
        client_for(live_fake, old).v1.balance.retrieve()


def test_expiry_propagation_and_expire_in_minutes(
    clocked_fake: FakeStripeServer, clock: Clock
) -> None:
    """``expire_in_minutes`` schedules the expiry; with propagation set, an expired key still
    authenticates for a few seconds while the API already says ``expired``; a later expire
    never pushes an expiry back."""
    fake = clocked_fake
    later_id, later = fake.seed_api_key("later")
    now_id, now = fake.seed_api_key("now")
    client = client_for(fake)
    client.raw_request("post", f"/v2/iam/api_keys/{later_id}/expire", expire_in_minutes=5)
    fake.set_expire_propagation(10)
    client.raw_request("post", f"/v2/iam/api_keys/{now_id}/expire")
    assert fake.api_key_info(now_id)["status"] == "expired"  # type: ignore[index]
    assert fake.api_key_accepted(now) and fake.api_key_accepted(later)
    clock.now += 11
    assert not fake.api_key_accepted(now) and fake.api_key_accepted(later)
    client.raw_request("post", f"/v2/iam/api_keys/{now_id}/expire", expire_in_minutes=60)
    assert not fake.api_key_accepted(now)
    clock.now += 5 * 60
    assert not fake.api_key_accepted(later)


def test_update_takes_only_documented_fields(fake_stripe: FakeStripeServer) -> None:
    """Update changes ``name``/``note``; ``ip_allowlist`` is an unknown field, as at Stripe."""
    key_id, _ = fake_stripe.seed_api_key("agent")
    client = client_for(fake_stripe)
    updated = client.raw_request("post", f"/v2/iam/api_keys/{key_id}", name="renamed",
                                 note="hello").data
    assert (updated["name"], updated["note"]) == ("renamed", "hello")
    with pytest.raises(stripe.InvalidRequestError, match="ip_allowlist: Unknown field"):
        client.raw_request("post", f"/v2/iam/api_keys/{key_id}", ip_allowlist=["10.0.0.1"])


# -- faults and helpers -----------------------------------------------------------------------


def test_injected_faults_have_stripe_shapes(fake_stripe: FakeStripeServer) -> None:
    """429 is a ``RateLimitError`` carrying ``Retry-After`` (v1 and v2), 5xx an ``APIError``;
    a fault fires ``count`` times, then requests succeed again."""
    client = client_for(fake_stripe)
    fake_stripe.inject_fault(429, path_contains="/v1/balance", retry_after=7)
    with pytest.raises(stripe.RateLimitError) as caught:
        client.v1.balance.retrieve()
    assert caught.value.headers["Retry-After"] == "7"
    fake_stripe.inject_fault(429, path_contains="/v2/")
    with pytest.raises(stripe.RateLimitError):
        client.raw_request("get", "/v2/iam/api_keys")
    fake_stripe.inject_fault(503, count=2, method="GET")
    for _ in range(2):
        with pytest.raises(stripe.APIError) as server_error:
            client.v1.balance.retrieve()
        assert server_error.value.http_status == 503
    client.v1.balance.retrieve()
    assert fake_stripe.request_count("GET", "/v1/balance") == 4


def test_helpers_never_show_values_and_issued_values_has_all(
    fake_stripe: FakeStripeServer,
) -> None:
    """``live_*`` helpers list ids, names and URLs, never a token or secret; ``issued_values``
    has every secret ever issued, dead ones included (for the leak scan)."""
    endpoint_id, secret = fake_stripe.seed_webhook_endpoint("https://a.example/h")
    key_id, token = fake_stripe.seed_api_key("agent")
    client = client_for(fake_stripe)
    client.v1.webhook_endpoints.delete(endpoint_id)
    client.raw_request("post", f"/v2/iam/api_keys/{key_id}/expire")
    new_id, new_token = fake_stripe.seed_api_key("agent")
    shown = repr(fake_stripe.live_api_keys()) + repr(fake_stripe.live_webhook_endpoints())
    assert token not in shown and new_token not in shown and secret not in shown
    assert [k["id"] for k in fake_stripe.live_api_keys("agent")] == [new_id]
    assert fake_stripe.live_webhook_endpoints() == []
    issued = set(fake_stripe.issued_values())
    assert {fake_stripe.admin_key, secret, token, new_token} <= issued
