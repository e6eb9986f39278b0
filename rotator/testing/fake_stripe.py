"""A stateful fake of the parts of the Stripe API that ``rotator`` uses, over real HTTP on loopback.

Tests and demos drive the official ``stripe`` SDK against it, so the ``stripe`` provider goes
through the same paths, encodings, pagination and error shapes as against api.stripe.com:

- ``/v1/webhook_endpoints`` (form-encoded, like all of v1): create (the signing ``secret``
  ``whsec_...`` is in the create response only), list (newest first, ``starting_after`` /
  ``ending_before`` cursors), retrieve, update, delete (``{"deleted": true}``; a second delete is a
  404 ``resource_missing``).
- ``/v2/iam/api_keys`` (JSON, like all of v2): create, list (``next_page_url``, at most 100 per
  page), retrieve, update (``name``, ``note``, ``permissions``, ``connect_permissions`` only),
  ``/expire`` (``expire_in_minutes``) and ``/rotate`` (``expire_current_key_in_minutes``, at most
  10080). A ``public_key`` (PEM RSA >= 2048 bits, ``algorithm: "RSA"``) makes the response carry
  ``secret_key.encrypted_secret`` = ``{ciphertext: <compact JWE>, format: "jwe_compact",
  recipient_key_id}``, encrypted with RSA-OAEP-256 (``jwe_alg`` can switch to RSA-OAEP) and
  A256GCM. In test mode (the default) the plaintext ``secret_key.token`` is also returned, by
  create *and by list and retrieve*, as a Stripe sandbox does; with ``livemode=True`` only the
  encrypted form is, once, and a secret key cannot be created without a public key.
- ``GET /v1/balance`` and ``GET /v1/account``: cheap authenticated calls any live key may make
  (a restricted ``rk_`` key needs the ``balance_read`` permission for the balance: 403 otherwise).

Authentication is ``Authorization: Bearer <key>`` (or HTTP basic with the key as user name).
Unknown keys get Stripe's 401 ``Invalid API Key provided: sk_test_****abcd``; expired ones a 401
with code ``api_key_expired``. Only :attr:`FakeStripeServer.admin_key` may manage API keys (Stripe
lets no ordinary API key mint keys: that takes a Stripe App's key with ``api_key_write``); an
unrestricted key may also manage webhook endpoints; anything else is a 403 ``permission_error``.

Expiry follows the fake's clock (wall clock unless a test passes ``clock``): a key expired with
``expire_in_minutes`` or by a rotate's ``expire_current_key_in_minutes`` keeps working until then.
``set_expire_propagation`` makes an expired key keep authenticating a few seconds longer, as
Stripe's own caches do, while the API already reports it ``expired``.

Where the docs say nothing the fake assumes (and the ``stripe`` provider does not depend on it):
API key ids look like ``apikey_...``; expiring an expired key returns it unchanged; retrieve still
answers for an expired key; a secret key created without ``permissions`` is an unrestricted
``sk_`` key, with them a restricted ``rk_`` key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from rotator.testing.fake_server import ApiError, JsonApiFake, Request, random_text

__all__ = ["FakeStripeServer"]

_ALNUM = string.ascii_letters + string.digits
_MAX_V2_LIMIT = 100
_MAX_V1_LIMIT = 100
_MAX_EXPIRE_MINUTES = 10080
_EVENT_SHAPE = re.compile(r"\*|[a-z_]+(?:\.[a-z_]+)+")
_BALANCE_PERMISSION = "balance_read"


def _random(prefix: str, length: int = 24) -> str:
    return prefix + random_text(length, _ALNUM)


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(ts * 1000) % 1000:03d}Z"
    )


def _parse_rfc3339(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _mask(token: str) -> str:
    """How Stripe quotes a refused key: its prefix, asterisks, the last four characters."""
    match = re.match(r"(?:sk|rk|pk)_(?:test|live)_", token)
    head = match.group(0) if match else ""
    if len(token) <= len(head) + 4:
        return head + "*" * 4
    return head + "*" * 20 + token[-4:]


def _redacted(token: str) -> str:
    """``secret_token_redacted``: what Stripe shows of a key in listings."""
    match = re.match(r"(?:sk|rk|pk)_(?:test|live)_", token)
    head = match.group(0) if match else token[:3]
    return f"{head}...{token[-4:]}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _jwe_encrypt(plaintext: str, public_pem: str, alg: str, kid: str | None) -> str:
    """A compact JWE (RFC 7516) of ``plaintext`` for ``public_pem``: RSA-OAEP(-256) + A256GCM."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    public_key: Any = serialization.load_pem_public_key(public_pem.encode())
    header: dict[str, str] = {"alg": alg, "enc": "A256GCM"}
    if kid:
        header["kid"] = kid
    protected = _b64url(json.dumps(header, separators=(",", ":")).encode())
    cek = AESGCM.generate_key(bit_length=256)
    digest = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()
    wrapped = public_key.encrypt(
        cek, padding.OAEP(mgf=padding.MGF1(algorithm=digest), algorithm=digest, label=None)
    )
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext.encode(), protected.encode("ascii"))
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return ".".join([protected, _b64url(wrapped), _b64url(iv), _b64url(ciphertext), _b64url(tag)])


@dataclass
class _Endpoint:
    id: str
    url: str
    secret: str
    enabled_events: list[str]
    created: int
    seq: int
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    api_version: str | None = None
    status: str = "enabled"
    connect: bool = False
    deleted: bool = False


@dataclass
class _ApiKey:
    id: str
    token: str
    type: str
    name: str | None
    note: str | None
    created: float
    seq: int
    permissions: list[str] | None = None
    connect_permissions: list[str] | None = None
    ip_allowlist: list[str] = field(default_factory=list)
    expires_at: float | None = None
    propagation: float = 0.0
    """Seconds the key still authenticates after ``expires_at`` (Stripe's caches)."""
    last_used: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def authenticates(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at + self.propagation

    @property
    def restricted(self) -> bool:
        return self.permissions is not None


class _ApiError(ApiError):
    """An error in Stripe's shape: ``{"error": {type, code, message, param}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        error: dict[str, Any] = {"type": type_, "message": message}
        if code:
            error["code"] = code
        if param:
            error["param"] = param
        super().__init__(status, {"error": error}, headers)


def _missing(kind: str, object_id: str, param: str = "id") -> _ApiError:
    return _ApiError(
        404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


def _fault_error(status: int, retry_after: float | None, v2: bool) -> _ApiError:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    if status == 429:
        return _ApiError(
            429,
            "Request rate limit exceeded. Learn more about rate limits here "
            "https://stripe.com/docs/rate-limits.",
            type_="rate_limit" if v2 else "invalid_request_error",
            code="rate_limit",
            headers=headers,
        )
    if status >= 500:
        return _ApiError(
            status, "An unknown error occurred", type_="api_error", headers=headers
        )
    if status == 401:
        return _ApiError(401, "Invalid API Key provided: sk_test_****")
    if status == 403:
        return _ApiError(
            403,
            "The provided key does not have the required permissions for this endpoint.",
            type_="permission_error",
        )
    if status == 404:
        return _ApiError(404, "Unrecognized request URL.", code="resource_missing")
    if status == 409:
        return _ApiError(
            409,
            "This object cannot be accessed right now because another API request or Stripe "
            "process is currently accessing it.",
            code="lock_timeout",
            headers=headers,
        )
    return _ApiError(status, "Injected fault.", headers=headers)


_ID = r"(?P<id>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str, str]] = [
    # (method, path, handler, who may call it: "any" live key, "endpoints", "admin")
    ("GET", re.compile(r"/v1/balance"), "_balance", "any"),
    ("GET", re.compile(r"/v1/account"), "_account", "any"),
    ("POST", re.compile(r"/v1/webhook_endpoints"), "_create_endpoint", "endpoints"),
    ("GET", re.compile(r"/v1/webhook_endpoints"), "_list_endpoints", "endpoints"),
    ("GET", re.compile(rf"/v1/webhook_endpoints/{_ID}"), "_get_endpoint", "endpoints"),
    ("POST", re.compile(rf"/v1/webhook_endpoints/{_ID}"), "_update_endpoint", "endpoints"),
    ("DELETE", re.compile(rf"/v1/webhook_endpoints/{_ID}"), "_delete_endpoint", "endpoints"),
    ("POST", re.compile(r"/v2/iam/api_keys"), "_create_key", "admin"),
    ("GET", re.compile(r"/v2/iam/api_keys"), "_list_keys", "admin"),
    ("GET", re.compile(rf"/v2/iam/api_keys/{_ID}"), "_get_key", "admin"),
    ("POST", re.compile(rf"/v2/iam/api_keys/{_ID}"), "_update_key", "admin"),
    ("POST", re.compile(rf"/v2/iam/api_keys/{_ID}/expire"), "_expire_key", "admin"),
    ("POST", re.compile(rf"/v2/iam/api_keys/{_ID}/rotate"), "_rotate_key", "admin"),
]
_ACCESS = {handler: who for _, _, handler, who in _ROUTES}


class FakeStripeServer(JsonApiFake):
    """One Stripe account's webhook endpoints and API keys behind Stripe's HTTP surface.

    Usage::

        with FakeStripeServer() as fake:
            endpoint_id, secret = fake.seed_webhook_endpoint("https://agent.example/hook")
            client = stripe.StripeClient(fake.admin_key, base_addresses={"api": fake.base_url})

    All state is guarded by one lock; the HTTP server runs in a daemon thread.
    """

    name = "fake-stripe"
    server_version = "FakeStripe/1.0"
    routes = [(method, pattern, handler) for method, pattern, handler, _ in _ROUTES]
    jwe_alg: str = "RSA-OAEP-256"
    """The key-wrapping ``alg`` of the JWEs it issues (``RSA-OAEP`` is the other one Stripe
    may send)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        livemode: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(host, port)
        self.livemode = livemode
        self._mode = "live" if livemode else "test"
        self.admin_key = _random(f"sk_{self._mode}_51", 96)
        self.account_id = _random("acct_1", 15)
        self._clock = clock
        self._endpoints: dict[str, _Endpoint] = {}
        self._keys: dict[str, _ApiKey] = {}
        self._by_token: dict[str, str] = {}
        self._retired_admin_keys: list[str] = []
        self._seq = 0
        self._propagation = 0.0

    @property
    def base_url(self) -> str:
        """The API base to give a Stripe client (like ``https://api.stripe.com``: no ``/v1``)."""
        if not self.started:
            raise RuntimeError("FakeStripeServer is not started")
        return self.url

    # -- set-up --------------------------------------------------------------------------------

    def seed_webhook_endpoint(
        self,
        url: str,
        enabled_events: list[str] | tuple[str, ...] = ("charge.succeeded", "invoice.paid"),
        *,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        api_version: str | None = None,
        disabled: bool = False,
    ) -> tuple[str, str]:
        """An endpoint made outside rotator: ``(endpoint id, signing secret)``."""
        with self._lock:
            endpoint = self._new_endpoint(
                url, list(enabled_events), description, dict(metadata or {}), api_version, False
            )
            if disabled:
                endpoint.status = "disabled"
        return endpoint.id, endpoint.secret

    def seed_api_key(
        self,
        name: str,
        *,
        note: str | None = None,
        permissions: list[str] | tuple[str, ...] | None = (_BALANCE_PERMISSION,),
        connect_permissions: list[str] | tuple[str, ...] | None = None,
        ip_allowlist: list[str] | tuple[str, ...] = (),
    ) -> tuple[str, str]:
        """A secret API key made outside rotator (in the Dashboard): ``(key id, token)``.

        Restricted (``rk_``) with ``balance_read`` unless ``permissions`` is None.
        """
        with self._lock:
            key = self._mint(
                "secret_key",
                name,
                note,
                list(permissions) if permissions is not None else None,
                list(connect_permissions) if connect_permissions is not None else None,
            )
            key.ip_allowlist = list(ip_allowlist)
        return key.id, key.token

    def replace_admin_key(self) -> str:
        """A new admin key; the old one is refused from now on (for cache-drop tests)."""
        with self._lock:
            self._retired_admin_keys.append(self.admin_key)
            self.admin_key = _random(f"sk_{self._mode}_51", 96)
            return self.admin_key

    def set_expire_propagation(self, seconds: float) -> None:
        """Keys expired from now on keep authenticating ``seconds`` past their expiry."""
        with self._lock:
            self._propagation = seconds

    # -- inspection (never through HTTP, never a value but where asked) ------------------------

    def api_key_accepted(self, token: str) -> bool:
        """Whether ``GET /v1/balance`` would authenticate ``token`` right now."""
        with self._lock:
            if hmac.compare_digest(token.encode(), self.admin_key.encode()):
                return True
            key = self._key_by_token(token)
            return key is not None and key.authenticates(self._clock())

    def webhook_secret_live(self, secret: str, url: str | None = None) -> bool:
        """Whether ``secret`` signs deliveries of an existing, enabled endpoint (of ``url``)."""
        with self._lock:
            return any(
                hmac.compare_digest(e.secret.encode(), secret.encode())
                for e in self._endpoints.values()
                if not e.deleted and e.status == "enabled" and (url is None or e.url == url)
            )

    def sign_event(self, endpoint_id: str, payload: str, timestamp: int | None = None) -> str:
        """The ``Stripe-Signature`` header Stripe would send with ``payload`` to that endpoint.

        Raises ``KeyError`` for a deleted endpoint: Stripe delivers nothing to it.
        """
        with self._lock:
            endpoint = self._endpoints.get(endpoint_id)
            if endpoint is None or endpoint.deleted:
                raise KeyError(f"no webhook endpoint {endpoint_id}")
            secret = endpoint.secret
        ts = int(self._clock()) if timestamp is None else timestamp
        signature = hmac.new(secret.encode(), f"{ts}.{payload}".encode(), hashlib.sha256)
        return f"t={ts},v1={signature.hexdigest()}"

    def live_api_keys(self, name: str | None = None) -> list[dict[str, Any]]:
        """Keys that still authenticate (never their tokens), oldest first."""
        with self._lock:
            now = self._clock()
            return [
                self._key_summary(k)
                for k in sorted(self._keys.values(), key=lambda k: k.seq)
                if k.authenticates(now) and (name is None or k.name == name)
            ]

    def api_key_info(self, key_id: str) -> dict[str, Any] | None:
        """One key's summary (never its token), expired or not; None if never issued."""
        with self._lock:
            key = self._keys.get(key_id)
            return self._key_summary(key) if key else None

    def live_webhook_endpoints(self, url: str | None = None) -> list[dict[str, Any]]:
        """Endpoints not deleted (never their secrets), oldest first."""
        with self._lock:
            return [
                {
                    "id": e.id,
                    "url": e.url,
                    "enabled_events": list(e.enabled_events),
                    "status": e.status,
                    "description": e.description,
                    "metadata": dict(e.metadata),
                    "api_version": e.api_version,
                }
                for e in sorted(self._endpoints.values(), key=lambda e: e.seq)
                if not e.deleted and (url is None or e.url == url)
            ]

    def issued_values(self) -> list[str]:
        """Every secret this fake ever issued, dead ones included (for leak scans)."""
        with self._lock:
            return [
                self.admin_key,
                *self._retired_admin_keys,
                *(k.token for k in self._keys.values()),
                *(e.secret for e in self._endpoints.values()),
            ]

    # -- how Stripe answers (server threads) --------------------------------------------------

    def response_headers(self) -> dict[str, str]:
        return {"Request-Id": _random("req_", 14)}

    def fault_error(self, request: Request, status: int, retry_after: float | None) -> ApiError:
        """Stripe's error for ``status`` (v1 or v2 flavour); ``Retry-After`` with 409, 429, 5xx
        and other statuses, not with 401, 403 or 404."""
        return _fault_error(status, retry_after, request.path.startswith("/v2/"))

    def no_route(self, request: Request, other_method: bool) -> ApiError:
        return _ApiError(405 if other_method else 404,
                         f"Unrecognized request URL ({request.method}: {request.path}).")

    def dispatch(self, request: Request) -> tuple[int, Any]:
        """Parse the body (JSON on v2, a form on v1, whose GETs take it from the query string),
        route, authenticate for the route, then call the handler as ``(query=, body=,
        **path_groups)``."""
        query_string = urlsplit(request.target).query
        if request.path.startswith("/v2/"):
            body = _parse_json(request.raw_body) if request.method == "POST" else {}
        else:
            body = _parse_form(request.raw_body.decode() if request.method == "POST"
                               else query_string)
        query = dict(parse_qsl(query_string, keep_blank_values=True))
        handler_name, groups = self.route(request)
        with self._lock:
            self._authenticate(request.headers.get("authorization"), _ACCESS[handler_name],
                               request.path)
            return 200, getattr(self, handler_name)(query=query, body=body, **groups)

    # Everything below runs with self._lock held.

    def _authenticate(self, authorization: str | None, who: str, path: str) -> None:
        token = _credentials(authorization)
        if token is None:
            raise _ApiError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for details, "
                "or we can help at https://support.stripe.com/.",
            )
        if hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return
        key = self._key_by_token(token)
        now = self._clock()
        if key is None:
            raise _ApiError(401, f"Invalid API Key provided: {_mask(token)}")
        if not key.authenticates(now):
            raise _ApiError(
                401, f"Expired API Key provided: {_mask(token)}", code="api_key_expired"
            )
        key.last_used = now
        if who == "any":
            if path == "/v1/balance" and key.restricted and _BALANCE_PERMISSION not in (
                key.permissions or []
            ):
                raise _permission_error(key)
            return
        if who == "endpoints" and not key.restricted:
            return
        raise _permission_error(key)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # v1: balance and account

    def _balance(self, **_: Any) -> Any:
        amounts = [{"amount": 0, "currency": "usd", "source_types": {"card": 0}}]
        return {
            "object": "balance",
            "available": amounts,
            "connect_reserved": [{"amount": 0, "currency": "usd"}],
            "livemode": self.livemode,
            "pending": amounts,
        }

    def _account(self, **_: Any) -> Any:
        return {
            "id": self.account_id,
            "object": "account",
            "business_type": None,
            "charges_enabled": True,
            "country": "US",
            "default_currency": "usd",
            "details_submitted": True,
            "payouts_enabled": True,
            "type": "standard",
        }

    # v1: webhook endpoints

    def _new_endpoint(
        self,
        url: str,
        enabled_events: list[str],
        description: str | None,
        metadata: dict[str, str],
        api_version: str | None,
        connect: bool,
    ) -> _Endpoint:
        endpoint = _Endpoint(
            id=_random("we_1"),
            url=url,
            secret=_random("whsec_", 32),
            enabled_events=enabled_events,
            created=int(self._clock()),
            seq=self._next_seq(),
            description=description,
            metadata=metadata,
            api_version=api_version,
            connect=connect,
        )
        self._endpoints[endpoint.id] = endpoint
        return endpoint

    def _endpoint_object(self, endpoint: _Endpoint, *, with_secret: bool = False) -> Any:
        obj: dict[str, Any] = {
            "id": endpoint.id,
            "object": "webhook_endpoint",
            "api_version": endpoint.api_version,
            "application": None,
            "created": endpoint.created,
            "description": endpoint.description,
            "enabled_events": list(endpoint.enabled_events),
            "livemode": self.livemode,
            "metadata": dict(endpoint.metadata),
            "status": endpoint.status,
            "url": endpoint.url,
        }
        if with_secret:
            obj["secret"] = endpoint.secret
        return obj

    def _endpoint(self, endpoint_id: str) -> _Endpoint:
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None or endpoint.deleted:
            raise _missing("webhook endpoint", endpoint_id)
        return endpoint

    def _create_endpoint(self, body: dict[str, Any], **_: Any) -> Any:
        url = _required_str(body, "url")
        _check_url(url)
        events = _events(body)
        if events is None:
            raise _ApiError(400, "Missing required param: enabled_events.", param="enabled_events")
        endpoint = self._new_endpoint(
            url,
            events,
            _optional_str(body, "description"),
            _metadata(body.get("metadata"), {}),
            _optional_str(body, "api_version"),
            _bool(body, "connect") or False,
        )
        return self._endpoint_object(endpoint, with_secret=True)

    def _list_endpoints(self, body: dict[str, Any], **_: Any) -> Any:
        limit = _limit(body.get("limit"), default=10, maximum=_MAX_V1_LIMIT)
        ordered = sorted(
            (e for e in self._endpoints.values() if not e.deleted),
            key=lambda e: e.seq,
            reverse=True,
        )
        after, before = body.get("starting_after"), body.get("ending_before")
        if after and before:
            raise _ApiError(
                400, "You may only specify one of these parameters: ending_before, "
                "starting_after.", param="starting_after"
            )
        if after:
            index = next((i for i, e in enumerate(ordered) if e.id == after), None)
            if index is None:
                raise _missing("webhook endpoint", str(after), "starting_after")
            ordered = ordered[index + 1 :]
            page = ordered[:limit]
        elif before:
            index = next((i for i, e in enumerate(ordered) if e.id == before), None)
            if index is None:
                raise _missing("webhook endpoint", str(before), "ending_before")
            ordered = ordered[:index]
            page = ordered[-limit:]
        else:
            page = ordered[:limit]
        return {
            "object": "list",
            "data": [self._endpoint_object(e) for e in page],
            "has_more": len(ordered) > len(page),
            "url": "/v1/webhook_endpoints",
        }

    def _get_endpoint(self, id: str, **_: Any) -> Any:
        return self._endpoint_object(self._endpoint(id))

    def _update_endpoint(self, id: str, body: dict[str, Any], **_: Any) -> Any:
        endpoint = self._endpoint(id)
        if "url" in body:
            url = _required_str(body, "url")
            _check_url(url)
            endpoint.url = url
        events = _events(body)
        if events is not None:
            endpoint.enabled_events = events
        if "description" in body:
            endpoint.description = _optional_str(body, "description") or None
        if "metadata" in body:
            endpoint.metadata = _metadata(body["metadata"], endpoint.metadata)
        disabled = _bool(body, "disabled")
        if disabled is not None:
            endpoint.status = "disabled" if disabled else "enabled"
        return self._endpoint_object(endpoint)

    def _delete_endpoint(self, id: str, **_: Any) -> Any:
        endpoint = self._endpoint(id)
        endpoint.deleted = True
        return {"id": endpoint.id, "object": "webhook_endpoint", "deleted": True}

    # v2: API keys

    def _mint(
        self,
        type_: str,
        name: str | None,
        note: str | None,
        permissions: list[str] | None,
        connect_permissions: list[str] | None,
    ) -> _ApiKey:
        if type_ == "publishable_key":
            prefix = f"pk_{self._mode}_51"
        else:
            prefix = f"{'rk' if permissions is not None else 'sk'}_{self._mode}_51"
        key = _ApiKey(
            id=_random("apikey_"),
            token=_random(prefix, 96),
            type=type_,
            name=name,
            note=note,
            created=self._clock(),
            seq=self._next_seq(),
            permissions=permissions,
            connect_permissions=connect_permissions,
        )
        self._keys[key.id] = key
        self._by_token[key.token] = key.id
        return key

    def _key_by_token(self, token: str) -> _ApiKey | None:
        key_id = self._by_token.get(token)
        return self._keys.get(key_id) if key_id else None

    def _key(self, key_id: str) -> _ApiKey:
        key = self._keys.get(key_id)
        if key is None:
            raise _ApiError(404, f"No such api_key: '{key_id}'", code="resource_missing")
        return key

    def _key_summary(self, key: _ApiKey) -> dict[str, Any]:
        now = self._clock()
        return {
            "id": key.id,
            "name": key.name,
            "note": key.note,
            "type": key.type,
            "status": "expired" if key.expired(now) else "active",
            "expires_at": key.expires_at,
            "permissions": list(key.permissions) if key.permissions is not None else None,
            "restricted": key.restricted,
        }

    def _key_object(
        self,
        key: _ApiKey,
        *,
        encrypted: dict[str, Any] | None = None,
        reveal: bool | None = None,
    ) -> Any:
        """The ``v2.iam.api_key`` object; the token shows in test mode only (as in a sandbox)."""
        now = self._clock()
        show_token = (not self.livemode) if reveal is None else reveal
        secret_key = publishable_key = None
        if key.type == "publishable_key":
            publishable_key = {"token": key.token}
        else:
            secret_key = {
                "encrypted_secret": encrypted,
                "secret_token_redacted": _redacted(key.token),
                "token": key.token if show_token else None,
            }
        return {
            "id": key.id,
            "object": "v2.iam.api_key",
            "connect_permissions": key.connect_permissions,
            "created": _rfc3339(key.created),
            "expires_at": _rfc3339(key.expires_at),
            "ip_allowlist": list(key.ip_allowlist),
            "last_used": _rfc3339(key.last_used),
            "livemode": self.livemode,
            "managed_by": None,
            "name": key.name,
            "note": key.note,
            "permissions": key.permissions,
            "publishable_key": publishable_key,
            "secret_key": secret_key,
            "status": "expired" if key.expired(now) else "active",
            "type": key.type,
        }

    def _issue(self, key: _ApiKey, public_key: Any) -> Any:
        """The create/rotate response: the token encrypted to ``public_key`` if one was given."""
        encrypted = None
        if public_key is not None and key.type == "secret_key":
            pem, recipient = _public_key(public_key)
            encrypted = {
                "ciphertext": _jwe_encrypt(key.token, pem, self.jwe_alg, recipient),
                "format": "jwe_compact",
                "recipient_key_id": recipient,
            }
        return self._key_object(key, encrypted=encrypted)

    def _create_key(self, body: dict[str, Any], **_: Any) -> Any:
        _only(body, {"type", "name", "note", "permissions", "connect_permissions",
                     "expires_at", "public_key"})
        type_ = body.get("type")
        if type_ not in ("secret_key", "publishable_key"):
            raise _ApiError(
                400, "type: must be one of secret_key, publishable_key", param="type"
            )
        public_key = body.get("public_key")
        if type_ == "secret_key" and public_key is None and self.livemode:
            raise _ApiError(
                400,
                "public_key: a public key is required to create a live mode secret key",
                param="public_key",
            )
        if public_key is not None:
            _public_key(public_key)  # validate before minting
        expires_at = body.get("expires_at")
        when = None
        if expires_at is not None:
            try:
                when = _parse_rfc3339(str(expires_at))
            except ValueError:
                raise _ApiError(
                    400, "expires_at: must be an RFC 3339 timestamp", param="expires_at"
                ) from None
        key = self._mint(
            type_,
            _optional_str(body, "name"),
            _optional_str(body, "note"),
            _string_list(body, "permissions"),
            _string_list(body, "connect_permissions"),
        )
        key.expires_at = when
        return self._issue(key, public_key)

    def _list_keys(self, query: dict[str, str], **_: Any) -> Any:
        limit = _limit(query.get("limit"), default=20, maximum=_MAX_V2_LIMIT)
        include_expired = query.get("include_expired", "false").lower() == "true"
        now = self._clock()
        ordered = [
            k
            for k in sorted(self._keys.values(), key=lambda k: k.seq, reverse=True)
            if include_expired or not k.expired(now)
        ]
        start = 0
        page_token = query.get("page")
        if page_token:
            try:
                start = int(base64.urlsafe_b64decode(page_token.encode()).decode())
            except ValueError:
                raise _ApiError(400, "page: invalid page token", param="page") from None
        page = ordered[start : start + limit]
        next_url = None
        if start + limit < len(ordered):
            token = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
            params = {"limit": str(limit), "page": token}
            if include_expired:
                params["include_expired"] = "true"
            next_url = f"/v2/iam/api_keys?{urlencode(params)}"
        return {
            "data": [self._key_object(k) for k in page],
            "next_page_url": next_url,
            "previous_page_url": None,
        }

    def _get_key(self, id: str, **_: Any) -> Any:
        return self._key_object(self._key(id))

    def _update_key(self, id: str, body: dict[str, Any], **_: Any) -> Any:
        _only(body, {"name", "note", "permissions", "connect_permissions"})
        key = self._key(id)
        if body.get("name"):
            key.name = _optional_str(body, "name")
        if body.get("note"):
            key.note = _optional_str(body, "note")
        permissions = _string_list(body, "permissions")
        if permissions:
            key.permissions = permissions
        connect = _string_list(body, "connect_permissions")
        if connect:
            key.connect_permissions = connect
        return self._key_object(key)

    def _expire_key(self, id: str, body: dict[str, Any], **_: Any) -> Any:
        _only(body, {"expire_in_minutes"})
        key = self._key(id)
        minutes = _minutes(body, "expire_in_minutes", maximum=None)
        self._schedule_expiry(key, minutes)
        return self._key_object(key)

    def _rotate_key(self, id: str, body: dict[str, Any], **_: Any) -> Any:
        _only(body, {"expire_current_key_in_minutes", "public_key"})
        old = self._key(id)
        now = self._clock()
        if old.expired(now):
            raise _ApiError(400, f"api_key {id} is expired and cannot be rotated")
        minutes = _minutes(body, "expire_current_key_in_minutes", maximum=_MAX_EXPIRE_MINUTES)
        public_key = body.get("public_key")
        if old.type == "secret_key" and public_key is None and self.livemode:
            raise _ApiError(
                400,
                "public_key: a public key is required when rotating a live mode secret key",
                param="public_key",
            )
        if public_key is not None:
            _public_key(public_key)
        new = self._mint(old.type, old.name, old.note, old.permissions, old.connect_permissions)
        new.ip_allowlist = list(old.ip_allowlist)
        self._schedule_expiry(old, minutes)
        return self._issue(new, public_key)

    def _schedule_expiry(self, key: _ApiKey, minutes: int | None) -> None:
        """Expire ``key`` after ``minutes`` (now if None); never later than already set."""
        now = self._clock()
        when = now + 60 * minutes if minutes else now
        if key.expires_at is None or when < key.expires_at:
            key.expires_at = when
            key.propagation = self._propagation


# -- request parsing -------------------------------------------------------------------------------


def _credentials(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            user = base64.b64decode(value).decode().partition(":")[0]
        except ValueError:
            return None
        return user or None
    return None


def _permission_error(key: _ApiKey) -> _ApiError:
    return _ApiError(
        403,
        f"The provided key '{_mask(key.token)}' does not have the required permissions for "
        "this endpoint on account. Having more permissions would allow this request to "
        "continue.",
        type_="permission_error",
    )


def _parse_form(raw: str) -> dict[str, Any]:
    """v1 form encoding as the SDK sends it: ``a=1``, ``list[0]=x``, ``map[key]=v``."""
    out: dict[str, Any] = {}
    indexed: dict[str, dict[int, str]] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        match = re.fullmatch(r"([^\[\]]+)\[([^\[\]]*)\]", key)
        if match is None:
            out[key] = value
            continue
        name, sub = match.groups()
        if sub.isdigit() or sub == "":
            slots = indexed.setdefault(name, {})
            slots[int(sub) if sub else len(slots)] = value
        else:
            target = out.setdefault(name, {})
            if not isinstance(target, dict):
                raise _ApiError(400, f"Invalid {name}: mixes a value and a hash.", param=name)
            target[sub] = value
    for name, slots in indexed.items():
        out[name] = [slots[i] for i in sorted(slots)]
    return out


def _parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _ApiError(400, "Invalid JSON body.") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    return body


def _only(body: dict[str, Any], known: set[str]) -> None:
    for key in body:
        if key not in known:
            hint = ", ".join(sorted(known))
            raise _ApiError(400, f"{key}: Unknown field, did you mean one of {hint}?", param=key)


def _required_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise _ApiError(400, f"Missing required param: {name}.", param=name)
    if not isinstance(value, str):
        raise _ApiError(400, f"Invalid string: {name}.", param=name)
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _ApiError(400, f"Invalid string: {name}.", param=name)
    return value


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise _ApiError(400, f"Invalid boolean: {value}", param=name)


def _check_url(url: str) -> None:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise _ApiError(400, "Invalid URL: URL must be publicly accessible.", param="url")


def _events(body: dict[str, Any]) -> list[str] | None:
    events = body.get("enabled_events")
    if events is None:
        return None
    if not isinstance(events, list) or not events:
        raise _ApiError(400, "Invalid array", param="enabled_events")
    for i, event in enumerate(events):
        if not isinstance(event, str) or not _EVENT_SHAPE.fullmatch(event):
            raise _ApiError(
                400, f"Invalid enabled_events[{i}]: must be a known event type or '*'",
                param=f"enabled_events[{i}]",
            )
    return list(events)


def _metadata(value: Any, current: dict[str, str]) -> dict[str, str]:
    """Stripe's metadata update rules: keys merge, an empty value unsets a key."""
    if value in (None, ""):
        return {} if value == "" else dict(current)
    if not isinstance(value, dict):
        raise _ApiError(400, "Invalid hash", param="metadata")
    merged = dict(current)
    for key, item in value.items():
        if len(key) > 40:
            raise _ApiError(
                400, f"Metadata key too long: {key[:40]}... (max 40 characters)",
                param=f"metadata[{key}]",
            )
        if item == "":
            merged.pop(key, None)
        elif not isinstance(item, str) or len(item) > 500:
            raise _ApiError(
                400, f"Invalid metadata[{key}]: values are strings of at most 500 characters",
                param=f"metadata[{key}]",
            )
        else:
            merged[key] = item
    if len(merged) > 50:
        raise _ApiError(400, "Metadata can have at most 50 keys", param="metadata")
    return merged


def _limit(raw: Any, *, default: int, maximum: int) -> int:
    if raw is None:
        return default
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        raise _ApiError(400, "limit: must be an integer", param="limit") from None
    if limit < 1:
        raise _ApiError(400, "limit: must be at least 1", param="limit")
    if limit > maximum:
        raise _ApiError(400, f"limit: The maximum page limit is {maximum}", param="limit")
    return limit


def _minutes(body: dict[str, Any], name: str, maximum: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _ApiError(400, f"{name}: must be a non-negative integer", param=name)
    if maximum is not None and value > maximum:
        raise _ApiError(400, f"{name}: must be at most {maximum} (7 days)", param=name)
    return value


def _string_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _ApiError(400, f"{name}: must be a list of strings", param=name)
    return list(value)


def _public_key(value: Any) -> tuple[str, str | None]:
    """``(PEM, caller's id)`` of a ``public_key`` param, checked as Stripe documents it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if not isinstance(value, dict) or not isinstance(value.get("pem_key"), dict):
        raise _ApiError(400, "public_key.pem_key: required", param="public_key.pem_key")
    pem_key = value["pem_key"]
    algorithm, data = pem_key.get("algorithm"), pem_key.get("data")
    if not isinstance(algorithm, str) or algorithm.upper() != "RSA":
        raise _ApiError(
            400, "public_key.pem_key.algorithm: must be RSA", param="public_key.pem_key.algorithm"
        )
    try:
        parsed = serialization.load_pem_public_key(str(data).encode())
    except ValueError:
        raise _ApiError(
            400, "public_key.pem_key.data: not a PEM-encoded public key",
            param="public_key.pem_key.data",
        ) from None
    if not isinstance(parsed, rsa.RSAPublicKey) or parsed.key_size < 2048:
        raise _ApiError(
            400, "public_key.pem_key.data: must be an RSA key of at least 2048 bits",
            param="public_key.pem_key.data",
        )
    recipient = value.get("id")
    return str(data), recipient if isinstance(recipient, str) else None
