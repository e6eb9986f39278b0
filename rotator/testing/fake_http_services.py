"""Stateful fakes of SendGrid's API keys API and Cloudflare's API tokens API, over real HTTP.

The ``http`` provider is tested against these, so they follow each service's documented paths,
bodies and error envelopes (SendGrid ``{"errors": [{"field", "message"}]}``, Cloudflare
``{"success", "errors", "messages", "result"}``), and keep state: a deleted key really stops
working, which is what lets "no outage" and "old key revoked" fail when they should.

:class:`~rotator.testing.fake_server.JsonApiFake` serves them (routing, fault injection, latency
and a request log); it is re-exported here with ``ApiError`` and ``Request``. Nothing here logs a
key value; values leave only in create responses and in ``seed_*`` return values, where the real
services hand them out.
"""

from __future__ import annotations

import hmac
import re
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

from rotator.testing.fake_server import (
    ApiError,
    JsonApiFake,
    Request,
    bearer,
    random_text,
    rfc3339,
)

__all__ = ["ApiError", "FakeCloudflare", "FakeSendGrid", "JsonApiFake", "Request"]


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# -- SendGrid ------------------------------------------------------------------------------------

_SG_FULL_ACCESS = ("mail.send", "api_keys.create", "api_keys.read", "api_keys.update",
                   "api_keys.delete", "scopes.read")


@dataclass
class _SgKey:
    id: str
    name: str
    value: str
    owner: str
    """``""`` for the parent account, else a subuser's username."""
    scopes: list[str]
    deleted: bool = False


class FakeSendGrid(JsonApiFake):
    """SendGrid's v3 API keys endpoints for a parent account and its subusers.

    - ``POST /v3/api_keys`` ``{name, scopes?}`` -> 201 ``{api_key, api_key_id, name, scopes}``
    - ``GET /v3/api_keys?limit=N`` -> ``{result: [{name, api_key_id}]}``
    - ``GET /v3/api_keys/{id}`` -> ``{api_key_id, name, scopes}``
    - ``DELETE /v3/api_keys/{id}`` -> 204
    - ``GET /v3/scopes`` with any live key -> ``{scopes: [...]}`` (the cheap verify call)

    Key management needs the parent's admin key (``Authorization: Bearer``); the
    ``on-behalf-of`` header acts for a subuser. Keys look like SendGrid's, 69 characters
    ``SG.<22-character api_key_id>.<43 characters>``. A missing, wrong or deleted key gets
    401 ``authorization required``; a live key without key-management rights gets 403.
    """

    name = "fake-sendgrid"
    routes = [
        ("POST", re.compile(r"/v3/api_keys"), "_create"),
        ("GET", re.compile(r"/v3/api_keys"), "_list"),
        ("GET", re.compile(r"/v3/api_keys/(?P<key_id>[^/]+)"), "_get"),
        ("DELETE", re.compile(r"/v3/api_keys/(?P<key_id>[^/]+)"), "_delete"),
        ("GET", re.compile(r"/v3/scopes"), "_scopes"),
    ]

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._keys: dict[str, _SgKey] = {}
        self._subusers: set[str] = set()
        admin = self._mint("", "rotator admin", list(_SG_FULL_ACCESS))
        self.admin_key = admin.value
        self.admin_key_id = admin.id

    def error_body(self, status: int, message: str) -> Any:
        return {"errors": [{"field": None, "message": message}]}

    # -- test controls -------------------------------------------------------------------------

    def add_subuser(self, username: str | None = None) -> str:
        """A subuser the parent's key can act for with ``on-behalf-of``."""
        name = username or "agent-" + random_text(8, string.ascii_lowercase + string.digits)
        with self._lock:
            self._subusers.add(name)
        return name

    def seed_key(self, subuser: str = "", name: str = "legacy",
                 scopes: tuple[str, ...] = ("mail.send",)) -> tuple[str, str]:
        """A pre-existing key of ``subuser`` (``""``: the parent): ``(api_key_id, value)``."""
        with self._lock:
            if subuser and subuser not in self._subusers:
                raise KeyError(f"no subuser {subuser}")
            key = self._mint(subuser, name, list(scopes))
        return key.id, key.value

    def is_valid(self, value: str) -> bool:
        """Whether ``GET /v3/scopes`` would accept ``value`` right now."""
        with self._lock:
            return self._live_by_value(value) is not None

    def live_keys(self, subuser: str = "") -> list[dict[str, Any]]:
        """``subuser``'s live keys as ``{id, name, scopes}`` (never values), oldest first; the
        parent's admin key is not listed."""
        with self._lock:
            return [{"id": k.id, "name": k.name, "scopes": list(k.scopes)}
                    for k in self._keys.values()
                    if not k.deleted and k.owner == subuser and k.id != self.admin_key_id]

    def issued_values(self) -> list[str]:
        """Every key value ever issued, the admin key and deleted keys included (leak scans)."""
        with self._lock:
            return [k.value for k in self._keys.values()]

    # -- handlers (lock held) ------------------------------------------------------------------

    def _mint(self, owner: str, name: str, scopes: list[str]) -> _SgKey:
        key_id = random_text(22)
        key = _SgKey(key_id, name, f"SG.{key_id}.{random_text(43)}", owner, scopes)
        self._keys[key_id] = key
        return key

    def _live_by_value(self, value: str) -> _SgKey | None:
        key_id = value.split(".")[1] if value.count(".") == 2 else ""
        key = self._keys.get(key_id)
        if key is None or key.deleted or not _same(key.value, value):
            return None
        return key

    def _caller(self, request: Request) -> _SgKey:
        token = bearer(request.headers.get("authorization"))
        key = self._live_by_value(token) if token else None
        if key is None:
            raise ApiError(401, self.error_body(401, "authorization required"))
        return key

    def _owner(self, request: Request) -> str:
        """The account acted on: the parent, or the ``on-behalf-of`` subuser."""
        caller = self._caller(request)
        if caller.id != self.admin_key_id:
            raise ApiError(403, self.error_body(403, "access forbidden"))
        subuser = request.headers.get("on-behalf-of", "")
        if subuser and subuser not in self._subusers:
            raise ApiError(403, self.error_body(403, "access forbidden"))
        return subuser

    def _key(self, owner: str, key_id: str) -> _SgKey:
        key = self._keys.get(key_id)
        if key is None or key.deleted or key.owner != owner:
            raise ApiError(404, self.error_body(404, "unable to find API Key"))
        return key

    def _create(self, request: Request) -> tuple[int, Any]:
        owner = self._owner(request)
        body = request.json()
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, {"errors": [{"field": "name",
                                             "message": "missing required argument"}]})
        scopes = body.get("scopes") or list(_SG_FULL_ACCESS)
        if not (isinstance(scopes, list) and all(isinstance(s, str) for s in scopes)):
            raise ApiError(400, {"errors": [{"field": "scopes",
                                             "message": "scopes must be an array of strings"}]})
        key = self._mint(owner, name, scopes)
        return 201, {"api_key": key.value, "api_key_id": key.id, "name": key.name,
                     "scopes": key.scopes}

    def _list(self, request: Request) -> tuple[int, Any]:
        owner = self._owner(request)
        keys = [k for k in self._keys.values() if not k.deleted and k.owner == owner]
        if "limit" in request.query:
            try:
                limit = int(request.query["limit"])
            except ValueError:
                limit = 0
            if limit < 1:
                raise ApiError(400, {"errors": [{"field": "limit",
                                                 "message": "limit must be a positive integer"}]})
            keys = keys[:limit]
        return 200, {"result": [{"name": k.name, "api_key_id": k.id} for k in keys]}

    def _get(self, request: Request, key_id: str) -> tuple[int, Any]:
        key = self._key(self._owner(request), key_id)
        return 200, {"api_key_id": key.id, "name": key.name, "scopes": key.scopes}

    def _delete(self, request: Request, key_id: str) -> tuple[int, Any]:
        self._key(self._owner(request), key_id).deleted = True
        return 204, None

    def _scopes(self, request: Request) -> tuple[int, Any]:
        return 200, {"scopes": list(self._caller(request).scopes)}


# -- Cloudflare ----------------------------------------------------------------------------------


@dataclass
class _CfToken:
    id: str
    name: str
    value: str
    policies: list[dict[str, Any]]
    issued_on: float
    admin: bool = False
    deleted: bool = False
    modified_on: float = field(default=0.0)

    def resources(self) -> list[str]:
        return [r for p in self.policies for r in (p.get("resources") or {})]


class FakeCloudflare(JsonApiFake):
    """Cloudflare's user API tokens under ``/client/v4``, in Cloudflare's envelope
    ``{success, errors: [{code, message}], messages, result}``.

    - ``POST /user/tokens`` ``{name, policies}`` -> ``result`` with ``id`` and ``value``
    - ``GET /user/tokens?page=&per_page=`` (per_page 5..50, default 20) -> ``result`` plus
      ``result_info {page, per_page, count, total_count, total_pages}``; a page past the last is
      empty
    - ``GET /user/tokens/{id}``, ``DELETE /user/tokens/{id}`` -> ``result {id}``
    - ``GET /user/tokens/verify`` with any live token -> ``result {id, status}`` (the cheap
      verify call); a missing, wrong or deleted token gets 401 code 1000 ``Invalid API Token``

    Managing tokens needs the admin token (``API Tokens Write``); another live token gets 403.
    """

    name = "fake-cloudflare"
    routes = [
        ("GET", re.compile(r"/client/v4/user/tokens/verify"), "_verify"),
        ("POST", re.compile(r"/client/v4/user/tokens"), "_create"),
        ("GET", re.compile(r"/client/v4/user/tokens"), "_list"),
        ("GET", re.compile(r"/client/v4/user/tokens/(?P<token_id>[^/]+)"), "_get"),
        ("DELETE", re.compile(r"/client/v4/user/tokens/(?P<token_id>[^/]+)"), "_delete"),
    ]

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self._tokens: dict[str, _CfToken] = {}
        admin = self._mint("rotator admin", [{
            "id": secrets.token_hex(16), "effect": "allow",
            "permission_groups": [{"id": secrets.token_hex(16), "name": "API Tokens Write"}],
            "resources": {"com.cloudflare.api.user.*": "*"}}])
        admin.admin = True
        self.admin_token = admin.value
        self.admin_token_id = admin.id

    @property
    def api_url(self) -> str:
        """``url`` + ``/client/v4``: what ``base_url`` is for Cloudflare's API."""
        return self.url + "/client/v4"

    def error_body(self, status: int, message: str) -> Any:
        return _cf(None, errors=[{"code": 10000 + status, "message": message}])

    # -- test controls -------------------------------------------------------------------------

    def seed_token(self, name: str = "legacy", zone_id: str | None = None) -> tuple[str, str]:
        """A pre-existing token allowed to read ``zone_id``'s DNS: ``(id, value)``."""
        zone = zone_id or secrets.token_hex(16)
        with self._lock:
            token = self._mint(name, [{
                "id": secrets.token_hex(16), "effect": "allow",
                "permission_groups": [{"id": "82e64a83756745bbbb1c9c2701bf816b",
                                       "name": "DNS Read"}],
                "resources": {f"com.cloudflare.api.account.zone.{zone}": "*"}}])
        return token.id, token.value

    def is_valid(self, value: str) -> bool:
        """Whether ``GET /user/tokens/verify`` would accept ``value`` right now."""
        with self._lock:
            return self._live_by_value(value) is not None

    def live_tokens(self, resource_contains: str = "") -> list[dict[str, Any]]:
        """Live tokens (never values) with a policy resource containing ``resource_contains``,
        oldest first; the admin token is not listed."""
        with self._lock:
            return [{"id": t.id, "name": t.name, "resources": t.resources()}
                    for t in self._tokens.values()
                    if not t.deleted and not t.admin
                    and any(resource_contains in r for r in t.resources())]

    def issued_values(self) -> list[str]:
        """Every token value ever issued, the admin token and deleted ones included."""
        with self._lock:
            return [t.value for t in self._tokens.values()]

    # -- handlers (lock held) ------------------------------------------------------------------

    def _mint(self, name: str, policies: list[dict[str, Any]]) -> _CfToken:
        now = time.time()
        token = _CfToken(secrets.token_hex(16), name, random_text(40), policies, now,
                         modified_on=now)
        self._tokens[token.id] = token
        return token

    def _live_by_value(self, value: str) -> _CfToken | None:
        return next((t for t in self._tokens.values()
                     if not t.deleted and _same(t.value, value)), None)

    def _caller(self, request: Request) -> _CfToken:
        value = bearer(request.headers.get("authorization"))
        token = self._live_by_value(value) if value else None
        if token is None:
            raise ApiError(401, _cf(None, errors=[{"code": 1000,
                                                   "message": "Invalid API Token"}]))
        return token

    def _admin(self, request: Request) -> None:
        if not self._caller(request).admin:
            raise ApiError(403, _cf(None, errors=[{
                "code": 9109, "message": "Unauthorized to access requested resource"}]))

    def _token(self, token_id: str) -> _CfToken:
        token = self._tokens.get(token_id)
        if token is None or token.deleted or token.admin:
            raise ApiError(404, _cf(None, errors=[{"code": 1003,
                                                   "message": "Invalid or missing token"}]))
        return token

    def _verify(self, request: Request) -> tuple[int, Any]:
        token = self._caller(request)
        return 200, _cf({"id": token.id, "status": "active"}, messages=[
            {"code": 10000, "message": "This API Token is valid and active", "type": None}])

    def _create(self, request: Request) -> tuple[int, Any]:
        self._admin(request)
        body = request.json()
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not 1 <= len(name) <= 120:
            raise ApiError(400, _cf(None, errors=[{"code": 1001,
                                                   "message": "name: 1 to 120 characters"}]))
        policies = body.get("policies")
        if not (isinstance(policies, list) and policies
                and all(_valid_policy(p) for p in policies)):
            raise ApiError(400, _cf(None, errors=[{
                "code": 1001, "message": "policies: each needs effect, permission_groups and "
                                         "resources"}]))
        token = self._mint(name, policies)
        return 200, _cf({**_token_object(token), "value": token.value})

    def _list(self, request: Request) -> tuple[int, Any]:
        self._admin(request)
        try:
            page = int(request.query.get("page", "1"))
            per_page = int(request.query.get("per_page", "20"))
        except ValueError:
            page = per_page = 0
        if page < 1 or not 5 <= per_page <= 50:
            raise ApiError(400, _cf(None, errors=[{
                "code": 1001, "message": "page must be >= 1 and per_page 5 to 50"}]))
        tokens = [t for t in self._tokens.values() if not t.deleted and not t.admin]
        chunk = tokens[(page - 1) * per_page: page * per_page]
        info = {"page": page, "per_page": per_page, "count": len(chunk),
                "total_count": len(tokens), "total_pages": -(-len(tokens) // per_page)}
        return 200, {**_cf([_token_object(t) for t in chunk]), "result_info": info}

    def _get(self, request: Request, token_id: str) -> tuple[int, Any]:
        self._admin(request)
        return 200, _cf(_token_object(self._token(token_id)))

    def _delete(self, request: Request, token_id: str) -> tuple[int, Any]:
        self._admin(request)
        self._token(token_id).deleted = True
        return 200, _cf({"id": token_id})


def _cf(result: Any, errors: list[dict[str, Any]] | None = None,
        messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"success": not errors, "errors": errors or [], "messages": messages or [],
            "result": result}


def _valid_policy(policy: Any) -> bool:
    return (isinstance(policy, dict) and policy.get("effect") in ("allow", "deny")
            and isinstance(policy.get("permission_groups"), list)
            and bool(policy["permission_groups"])
            and all(isinstance(g, dict) and isinstance(g.get("id"), str)
                    for g in policy["permission_groups"])
            and isinstance(policy.get("resources"), dict) and bool(policy["resources"]))


def _token_object(token: _CfToken) -> dict[str, Any]:
    return {"id": token.id, "name": token.name, "status": "active",
            "issued_on": rfc3339(token.issued_on), "modified_on": rfc3339(token.modified_on),
            "policies": token.policies}

