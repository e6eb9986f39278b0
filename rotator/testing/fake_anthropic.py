"""A stateful fake of Anthropic's Admin API key endpoints, served over real HTTP on loopback.

Anthropic's API cannot create keys: the Admin API lists them, reads one, and updates its name or
status. That is all the ``anthropic`` provider uses (emergency revocation sets a key
``inactive``), so that is what this fake serves, with Anthropic's paths, cursor pagination,
object and error shapes:

- ``GET /v1/organizations/api_keys`` (``limit`` 1..1000, default 20; ``after_id``,
  ``before_id``, ``status``, ``workspace_id``, ``created_by_user_id``) ->
  ``{data, has_more, first_id, last_id}``
- ``GET /v1/organizations/api_keys/{id}`` -> the key object
- ``POST /v1/organizations/api_keys/{id}`` ``{name?, status?}`` -> the updated key object
- ``GET /v1/models`` with an ordinary key in ``x-api-key``: the cheap call a key is checked with

Every call needs the ``anthropic-version`` header. Admin calls need the admin key in
``x-api-key``. An inactive, archived or expired key gets 401 ``authentication_error`` from
``/v1/models``, which is what lets a revoke-first test see the key die. Errors have Anthropic's
shape ``{"type": "error", "error": {"type", "message"}, "request_id"}``. An archived key cannot
be updated (400), as in the console. Key values leave only through :meth:`seed_key`.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from rotator.testing.fake_server import (
    ApiError,
    JsonApiFake,
    Request,
    random_text,
    rfc3339,
)

__all__ = ["FakeAnthropicAdmin", "hint"]

_BASE58 = "".join(c for c in string.ascii_letters + string.digits if c not in "0OIl")
_STATUSES = ("active", "inactive", "archived")
_BUCKETS = {"1m": (60, 60, 1440), "1h": (3600, 24, 168), "1d": (86400, 7, 31)}
"""bucket_width -> (seconds, default limit, maximum limit), as documented."""


@dataclass(frozen=True)
class _Use:
    at: float
    key_id: str
    workspace_id: str | None
    model: str
    input_tokens: int
    output_tokens: int
_MODELS = (("claude-sonnet-4-5", "Claude Sonnet 4.5"), ("claude-haiku-4-5", "Claude Haiku 4.5"))
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 409: "conflict_error",
                413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                529: "overloaded_error"}


def _anthropic_id(prefix: str) -> str:
    return f"{prefix}_01" + random_text(22, _BASE58)


def hint(value: str) -> str:
    """How Anthropic shows a key in listings: ``sk-ant-api03-R2D...igAA``."""
    return f"{value[:16]}...{value[-4:]}"


@dataclass
class _Key:
    id: str
    name: str
    value: str
    workspace_id: str | None
    created_at: float
    created_by: str
    status: str = "active"
    expires_at: float | None = None

    def effective_status(self, now: float) -> str:
        if self.status == "active" and self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return self.status


class FakeAnthropicAdmin(JsonApiFake):
    """In-memory API keys and workspaces of one organization behind the Admin API.

    Usage::

        with FakeAnthropicAdmin() as fake:
            key_id, value = fake.seed_key(name="research-agent")
            ...  # point the provider at fake.url with fake.admin_key
    """

    name = "fake-anthropic"
    routes = [
        ("GET", re.compile(r"/v1/models"), "_models"),
        ("GET", re.compile(r"/v1/organizations/api_keys"), "_list"),
        ("GET", re.compile(r"/v1/organizations/api_keys/(?P<key_id>[^/]+)"), "_get"),
        ("POST", re.compile(r"/v1/organizations/api_keys/(?P<key_id>[^/]+)"), "_update"),
        ("POST", re.compile(r"/v1/messages"), "_messages"),
        ("GET", re.compile(r"/v1/organizations/usage_report/messages"), "_usage_report"),
    ]

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.admin_key = "sk-ant-admin01-" + random_text(93)
        self.user_id = _anthropic_id("user")
        self._keys: dict[str, _Key] = {}  # insertion order is listing order
        self._workspaces: dict[str, str] = {}
        self._uses: list[_Use] = []

    def error_body(self, status: int, message: str) -> Any:
        return {"type": "error",
                "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
                "request_id": _anthropic_id("req")}

    def response_headers(self) -> dict[str, str]:
        return {"request-id": _anthropic_id("req")}

    # -- test controls -------------------------------------------------------------------------

    def add_workspace(self, name: str = "agents") -> str:
        """A workspace (``wrkspc_…``) keys can belong to."""
        workspace_id = _anthropic_id("wrkspc")
        with self._lock:
            self._workspaces[workspace_id] = name
        return workspace_id

    def seed_key(self, name: str = "legacy", workspace_id: str | None = None,
                 value: str | None = None, status: str = "active",
                 expires_in: float | None = None) -> tuple[str, str]:
        """A key made in the console: ``(key_id, value)``. ``value`` lets a test choose it (two
        keys with the same prefix and suffix share a ``partial_key_hint``)."""
        value = value or "sk-ant-api03-" + random_text(93) + "AA"
        now = time.time()
        with self._lock:
            if workspace_id is not None and workspace_id not in self._workspaces:
                raise KeyError(f"no workspace {workspace_id}")
            if any(k.value == value for k in self._keys.values()):
                raise ValueError("that key value is already in use")
            key = _Key(_anthropic_id("apikey"), name, value, workspace_id, now, self.user_id,
                       status, now + expires_in if expires_in is not None else None)
            self._keys[key.id] = key
        return key.id, key.value

    def record_usage(self, key_id: str, at: float, input_tokens: int = 100,
                     output_tokens: int = 10, model: str = "claude-sonnet-4-5") -> None:
        """Tokens used with ``key_id`` at ``at`` (Unix seconds), as if its holder had called
        the Messages API then: synthetic history for baselines."""
        with self._lock:
            key = self._keys[key_id]
            self._uses.append(_Use(at, key.id, key.workspace_id, model, input_tokens,
                                   output_tokens))

    def set_status(self, key_id: str, status: str) -> None:
        """Change a key's status as the console would (``active``/``inactive``/``archived``)."""
        with self._lock:
            self._keys[key_id].status = status

    def key(self, key_id: str) -> dict[str, Any]:
        """The key object the API shows for ``key_id`` (no value)."""
        with self._lock:
            return self._object(self._keys[key_id])

    def is_valid(self, value: str) -> bool:
        """Whether ``GET /v1/models`` would accept ``value`` right now."""
        with self._lock:
            return self._usable(value) is not None

    def live_key_ids(self, workspace_id: str | None = None) -> set[str]:
        """Ids of the keys that still work, in ``workspace_id`` (None: every workspace)."""
        now = time.time()
        with self._lock:
            return {k.id for k in self._keys.values()
                    if k.effective_status(now) == "active"
                    and (workspace_id is None or k.workspace_id == workspace_id)}

    def issued_values(self) -> list[str]:
        """Every key value this fake ever held, and its admin key (for leak scans)."""
        with self._lock:
            return [self.admin_key, *(k.value for k in self._keys.values())]

    # -- handlers (lock held) ------------------------------------------------------------------

    def _fail(self, status: int, message: str) -> ApiError:
        return ApiError(status, self.error_body(status, message))

    def _versioned(self, request: Request) -> None:
        if not request.headers.get("anthropic-version"):
            raise self._fail(400, "anthropic-version: header is required")

    def _usable(self, value: str) -> _Key | None:
        now = time.time()
        return next((k for k in self._keys.values()
                     if secrets.compare_digest(k.value.encode(), value.encode())
                     and k.effective_status(now) == "active"), None)

    def _admin(self, request: Request) -> None:
        self._versioned(request)
        given = request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), self.admin_key.encode()):
            raise self._fail(401, "invalid x-api-key")

    def _object(self, key: _Key) -> dict[str, Any]:
        return {"id": key.id, "type": "api_key", "name": key.name,
                "workspace_id": key.workspace_id, "created_at": rfc3339(key.created_at),
                "created_by": {"id": key.created_by, "type": "user"},
                "partial_key_hint": hint(key.value),
                "status": key.effective_status(time.time()),
                "expires_at": rfc3339(key.expires_at) if key.expires_at else None}

    def _key(self, key_id: str) -> _Key:
        key = self._keys.get(key_id)
        if key is None:
            raise self._fail(404, f"API key {key_id} not found")
        return key

    def _models(self, request: Request) -> tuple[int, Any]:
        self._versioned(request)
        if self._usable(request.headers.get("x-api-key", "")) is None:
            raise self._fail(401, "invalid x-api-key")
        data = [{"type": "model", "id": m, "display_name": d, "created_at": "2025-09-29T00:00:00Z"}
                for m, d in _MODELS]
        return 200, {"data": data, "has_more": False, "first_id": data[0]["id"],
                     "last_id": data[-1]["id"]}

    def _list(self, request: Request) -> tuple[int, Any]:
        self._admin(request)
        query = request.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            raise self._fail(400, "limit: Input should be between 1 and 1000")
        status = query.get("status")
        if status is not None and status not in (*_STATUSES, "expired"):
            raise self._fail(400, "status: Input should be 'active', 'archived', 'expired' or "
                                  "'inactive'")
        now = time.time()
        keys = [k for k in self._keys.values()
                if (status is None or k.effective_status(now) == status)
                and ("workspace_id" not in query or k.workspace_id == query["workspace_id"])
                and query.get("created_by_user_id", k.created_by) == k.created_by]
        for cursor in ("after_id", "before_id"):
            if cursor in query and query[cursor] not in self._keys:
                raise self._fail(400, f"{cursor}: no API key {query[cursor]}")
        if "after_id" in query:
            order = list(self._keys)
            after = order.index(query["after_id"])
            keys = [k for k in keys if order.index(k.id) > after]
            page, has_more = keys[:limit], len(keys) > limit
        elif "before_id" in query:
            order = list(self._keys)
            before = order.index(query["before_id"])
            keys = [k for k in keys if order.index(k.id) < before]
            page, has_more = keys[-limit:], len(keys) > limit
        else:
            page, has_more = keys[:limit], len(keys) > limit
        return 200, {"data": [self._object(k) for k in page], "has_more": has_more,
                     "first_id": page[0].id if page else None,
                     "last_id": page[-1].id if page else None}

    def _get(self, request: Request, key_id: str) -> tuple[int, Any]:
        self._admin(request)
        return 200, self._object(self._key(key_id))

    def _messages(self, request: Request) -> tuple[int, Any]:
        """``POST /v1/messages`` (a fixed answer): what the usage report counts, per key."""
        self._versioned(request)
        key = self._usable(request.headers.get("x-api-key", ""))
        if key is None:
            raise self._fail(401, "invalid x-api-key")
        body = request.json()
        model = body.get("model") or _MODELS[0][0]
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []
                     if isinstance(m, dict))
        use = _Use(time.time(), key.id, key.workspace_id, str(model), max(1, prompt // 4), 5)
        self._uses.append(use)
        return 200, {"id": _anthropic_id("msg"), "type": "message", "role": "assistant",
                     "model": use.model, "content": [{"type": "text", "text": "ok"}],
                     "stop_reason": "end_turn", "stop_sequence": None,
                     "usage": {"input_tokens": use.input_tokens,
                               "output_tokens": use.output_tokens}}

    def _usage_report(self, request: Request) -> tuple[int, Any]:
        """``GET /v1/organizations/usage_report/messages``: buckets of ``bucket_width`` that
        start on or after ``starting_at`` and end before ``ending_at``, ``limit`` a page and
        ``page`` the cursor; grouped by ``group_by[]``, filtered by ``api_key_ids[]``,
        ``workspace_ids[]`` and ``models[]``. Token counts only: the report has no request
        count."""
        self._admin(request)
        every = parse_qs(urlsplit(request.target).query)

        def many(name: str) -> list[str]:
            return every.get(f"{name}[]", []) + every.get(name, [])

        def when(name: str) -> float | None:
            text = request.query.get(name)
            if text is None:
                return None
            try:
                return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise self._fail(400, f"{name}: Input should be a valid datetime") from None

        width_name = request.query.get("bucket_width", "1d")
        if width_name not in _BUCKETS:
            raise self._fail(400, "bucket_width: Input should be '1d', '1h' or '1m'")
        width, default_limit, max_limit = _BUCKETS[width_name]
        start = when("starting_at")
        if start is None:
            raise self._fail(400, "starting_at: Field required")
        end = when("ending_at")
        try:
            limit = int(request.query.get("limit", default_limit))
        except ValueError:
            limit = 0
        if not 1 <= limit <= max_limit:
            raise self._fail(400, f"limit: Input should be between 1 and {max_limit} for "
                                  f"bucket_width {width_name}")
        groups = many("group_by")
        allowed = {"api_key_id", "workspace_id", "model", "service_tier", "context_window"}
        if set(groups) - allowed:
            raise self._fail(400, "group_by: Input should be one of " + ", ".join(allowed))
        keys, workspaces, models = set(many("api_key_ids")), set(many("workspace_ids")), \
            set(many("models"))
        first = int(start) - int(start) % width
        last = int(end) if end is not None else int(time.time()) + width
        starts = [b for b in range(first, last, width) if end is None or b + width <= end]
        offset = 0
        if request.query.get("page"):
            try:
                offset = int(base64.b64decode(request.query["page"]).decode())
            except ValueError:
                raise self._fail(400, "page: invalid page token") from None
        page = starts[offset:offset + limit]
        uses = [u for u in self._uses if (not keys or u.key_id in keys)
                and (not workspaces or u.workspace_id in workspaces)
                and (not models or u.model in models)]
        data = []
        for bucket in page:
            totals: dict[tuple[Any, ...], list[int]] = {}
            for u in uses:
                if bucket <= u.at < bucket + width:
                    group = (u.key_id if "api_key_id" in groups else None,
                             u.workspace_id if "workspace_id" in groups else None,
                             u.model if "model" in groups else None)
                    t = totals.setdefault(group, [0, 0])
                    t[0] += u.input_tokens
                    t[1] += u.output_tokens
            data.append({"starting_at": rfc3339(bucket), "ending_at": rfc3339(bucket + width),
                         "results": [{
                             "uncached_input_tokens": t[0],
                             "cache_creation": {"ephemeral_1h_input_tokens": 0,
                                                "ephemeral_5m_input_tokens": 0},
                             "cache_read_input_tokens": 0, "output_tokens": t[1],
                             "server_tool_use": {"web_search_requests": 0},
                             "api_key_id": g[0], "workspace_id": g[1], "model": g[2],
                             "service_tier": None, "context_window": None}
                             for g, t in totals.items()]})
        more = offset + limit < len(starts)
        return 200, {"data": data, "has_more": more,
                     "next_page": base64.b64encode(str(offset + limit).encode()).decode()
                     if more else None}

    def _update(self, request: Request, key_id: str) -> tuple[int, Any]:
        self._admin(request)
        key = self._key(key_id)
        body = request.json()
        if not isinstance(body, dict):
            raise self._fail(400, "request body must be a JSON object")
        unknown = sorted(set(body) - {"name", "status"})
        if unknown:
            raise self._fail(400, f"{unknown[0]}: Extra inputs are not permitted")
        name, status = body.get("name"), body.get("status")
        if name is not None and not (isinstance(name, str) and 1 <= len(name) <= 500):
            raise self._fail(400, "name: String should have between 1 and 500 characters")
        if status is not None and status not in _STATUSES:
            raise self._fail(400, "status: Input should be 'active', 'inactive' or 'archived'")
        if key.status == "archived":
            raise self._fail(400, "archived API keys cannot be updated")
        if name is not None:
            key.name = name
        if status is not None:
            key.status = status
        return 200, self._object(key)
