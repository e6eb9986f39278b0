"""A stateful fake of the OpenAI Admin API, served over real HTTP on loopback.

Tests and ``rotator demo`` drive the real ``openai`` SDK against it, so the provider is exercised
through the same paths, fields, pagination and error shapes as against api.openai.com. Keys it
mints really stop working when deleted (``GET /v1/models`` refuses them), which is what lets the
"no outage" and "old key revoked" invariants fail when they should.

Nothing here logs or returns a key value except the create response and :meth:`seed_key`, exactly
where OpenAI itself hands the value out.
"""

from __future__ import annotations

import base64
import hmac
import json
import math
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from rotator.testing.fake_server import (
    ApiError,
    EventStream,
    JsonApiFake,
    RateLimitState,
    Request,
    bearer,
    random_text,
)

__all__ = ["FakeOpenAIServer", "service_account_key_value"]

_BUCKETS = {"1m": (60, 60, 1440), "1h": (3600, 24, 168), "1d": (86400, 7, 31)}
"""``bucket_width`` -> (seconds, default limit, maximum limit), as the Usage API documents."""

_ALNUM = string.ascii_letters + string.digits
_DEFAULT_LIMIT = 20
_MAX_LIMIT = 100
_MODELS = ("gpt-4o-mini", "gpt-4.1", "text-embedding-3-small")
_PROJECT = r"/v1/organization/projects/(?P<project_id>[^/]+)"


def _random_id(prefix: str, length: int = 24) -> str:
    return prefix + random_text(length, _ALNUM)


def redact(value: str) -> str:
    """What OpenAI shows for a key in listings: the first 6 and last 4 characters."""
    return f"{value[:6]}...{value[-4:]}"


def _mask_for_error(value: str) -> str:
    """How OpenAI quotes a rejected key in a 401 message (never the whole value)."""
    if len(value) <= 12:
        return "*" * len(value)
    return f"{value[:8]}{'*' * 20}{value[-4:]}"


@dataclass(frozen=True)
class _Use:
    """Model requests one key made at one moment (what the Usage API aggregates)."""

    at: float
    key_id: str
    project_id: str
    requests: int
    input_tokens: int
    output_tokens: int
    model: str


@dataclass
class _Project:
    id: str
    name: str
    created_at: int


@dataclass
class _ServiceAccount:
    id: str
    name: str
    project_id: str
    created_at: int
    role: str = "member"


@dataclass
class _Key:
    id: str
    name: str
    value: str
    project_id: str
    service_account_id: str
    created_at: int
    expires_at: int | None = None
    last_used_at: int | None = None
    scopes: list[str] = field(default_factory=list)
    deleted: bool = False

    def usable(self, now: float) -> bool:
        return not self.deleted and (self.expires_at is None or now < self.expires_at)


class _ApiError(ApiError):
    """An error response in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        super().__init__(status, body, headers)


def _fault_error(status: int, retry_after: float | None) -> _ApiError:
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
    if status == 429:
        return _ApiError(
            429,
            "Rate limit reached for requests. Please try again later.",
            type_="requests",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if status == 500:
        return _ApiError(
            500,
            "The server had an error while processing your request. Sorry about that!",
            type_="server_error",
            headers=headers,
        )
    if status >= 500:
        return _ApiError(
            status,
            "The server is overloaded or not ready yet.",
            type_="server_error",
            headers=headers,
        )
    if status == 401:
        return _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if status == 403:
        return _ApiError(403, "You have insufficient permissions for this operation.")
    if status == 404:
        return _ApiError(404, "The requested resource was not found.")
    return _ApiError(status, "Injected fault.", headers=headers)


def service_account_key_value() -> str:
    """A service-account key in OpenAI's published shape: ``sk-svcacct-``, 74 characters, the
    ``T3BlbkFJ`` marker, 74 more (so secret scanners recognise it as a real one would be)."""
    alphanumeric = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

    def part() -> str:  # ends with a letter or digit, as the keys shown in listings do
        return random_text(73) + random_text(1, alphanumeric)

    return f"sk-svcacct-{part()}T3BlbkFJ{part()}"


class FakeOpenAIServer(JsonApiFake):
    """In-memory projects, service accounts and keys behind the Admin API's HTTP surface.

    Usage::

        with FakeOpenAIServer() as fake:
            project = fake.add_project()
            sa = fake.add_service_account(project)
            ...  # point a client at fake.base_url with fake.admin_key

    All state is guarded by one lock; the HTTP server runs in a daemon thread.
    """

    name = "fake-openai"
    server_version = "FakeOpenAI/1.0"
    tcp_nodelay = False  # keeps its ~40 ms a response, which bench/ figures were measured with
    routes = [
        ("GET", re.compile(r"/v1/models"), "_list_models"),
        ("POST", re.compile(r"/v1/chat/completions"), "_chat_completion"),
        ("GET", re.compile(r"/v1/organization/usage/completions"), "_usage_completions"),
        ("GET", re.compile(_PROJECT), "_get_project"),
        ("GET", re.compile(rf"{_PROJECT}/service_accounts/(?P<sa_id>[^/]+)"),
         "_get_service_account"),
        ("POST", re.compile(rf"{_PROJECT}/service_accounts/(?P<sa_id>[^/]+)/api_keys"),
         "_create_key"),
        ("GET", re.compile(rf"{_PROJECT}/api_keys"), "_list_keys"),
        ("GET", re.compile(rf"{_PROJECT}/api_keys/(?P<key_id>[^/]+)"), "_get_key"),
        ("DELETE", re.compile(rf"{_PROJECT}/api_keys/(?P<key_id>[^/]+)"), "_delete_key"),
    ]

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, admin_key: str | None = None
    ) -> None:
        super().__init__(host, port)
        self.admin_key = admin_key or "sk-admin-" + secrets.token_urlsafe(32)
        self.clock: Callable[[], float] = time.time
        self.stream_gap = 0.0
        """Seconds between the events of a streamed completion."""
        """Unix time as the fake sees it: model calls are counted then and keys expire by it
        (a test shares one clock with the daemon to move both forward)."""
        self._projects: dict[str, _Project] = {}
        self._service_accounts: dict[str, _ServiceAccount] = {}
        self._keys: dict[str, _Key] = {}  # insertion order is listing order
        self._by_value: dict[str, str] = {}
        self._uses: list[_Use] = []

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client (``…/v1``, like ``https://api.openai.com/v1``)."""
        if not self.started:
            raise RuntimeError("FakeOpenAIServer is not started")
        return self.url + "/v1"

    # -- state set-up and inspection -----------------------------------------------------------

    def add_project(self, project_id: str | None = None, name: str = "Default project") -> str:
        project = _Project(project_id or _random_id("proj_"), name, int(time.time()))
        with self._lock:
            self._projects[project.id] = project
        return project.id

    def add_service_account(self, project_id: str, name: str = "rotator") -> str:
        """A service account in ``project_id``; returns its ``svc_acct_…`` id."""
        with self._lock:
            if project_id not in self._projects:
                raise KeyError(f"no project {project_id}")
            sa = _ServiceAccount(_random_id("svc_acct_"), name, project_id, int(time.time()))
            self._service_accounts[sa.id] = sa
        return sa.id

    def seed_key(
        self,
        project_id: str,
        service_account_id: str,
        name: str = "legacy",
        value: str | None = None,
    ) -> tuple[str, str]:
        """A pre-existing key rotator did not create: ``(key_id, value)``.

        ``value`` lets a test choose it (two keys redacted alike make ``identify`` ambiguous).
        """
        with self._lock:
            key = self._mint(project_id, service_account_id, name, value=value)
        return key.id, key.value

    def record_usage(self, key_id: str, at: float, requests: int = 1, input_tokens: int = 0,
                     output_tokens: int = 0, model: str = "gpt-4o-mini") -> None:
        """Usage of ``key_id`` at ``at`` (Unix seconds), as if its holder had made the calls
        then: synthetic traffic for baselines, without waiting days."""
        with self._lock:
            key = self._keys[key_id]
            self._uses.append(_Use(at, key.id, key.project_id, requests, input_tokens,
                                   output_tokens, model))

    def is_valid(self, value: str) -> bool:
        """Whether ``GET /v1/models`` would accept ``value`` right now."""
        with self._lock:
            key = self._lookup_value(value)
            return key is not None and key.usable(self.clock())

    def live_keys(self, project_id: str | None = None) -> list[dict[str, Any]]:
        """Non-deleted keys (never their values), in creation order."""
        with self._lock:
            return [
                {
                    "id": k.id,
                    "name": k.name,
                    "service_account_id": k.service_account_id,
                    "project_id": k.project_id,
                    "created_at": k.created_at,
                    "expires_at": k.expires_at,
                }
                for k in self._keys.values()
                if not k.deleted and (project_id is None or k.project_id == project_id)
            ]

    def issued_values(self) -> list[str]:
        """Every key value this fake ever issued, deleted ones included, and its admin key
        (for leak scans)."""
        with self._lock:
            return [self.admin_key, *(k.value for k in self._keys.values())]

    # -- how OpenAI answers (server threads) --------------------------------------------------

    def response_headers(self) -> dict[str, str]:
        return {"x-request-id": _random_id("req_", 32)}

    def fault_error(self, request: Request, status: int, retry_after: float | None) -> ApiError:
        """OpenAI's error for ``status``; ``retry_after`` is sent with all but 401, 403 and 404."""
        return _fault_error(status, retry_after)

    def rate_limit_key(self, request: Request) -> str | None:
        """:meth:`set_rate_limit` limits the admin key (every Admin API call made with it); the
        keys it mints have limits of their own, not modelled here."""
        token = bearer(request.headers.get("authorization"))
        if token is not None and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return "admin"
        return None

    def rate_limit_error(self, request: Request, state: RateLimitState) -> ApiError:
        """OpenAI's 429 for requests over a rate limit: ``type`` ``requests``, ``code``
        ``rate_limit_exceeded``, the wait in the message and in ``retry-after-ms`` and
        ``retry-after`` (whole seconds), which the SDK reads in that order."""
        wait_ms = max(1, math.ceil(state.retry_after * 1000))
        return _ApiError(
            429,
            f"Rate limit reached for requests in organization org-fake on requests per "
            f"second: Limit {state.limit}, Used {state.limit}, Requested 1. Please try again "
            f"in {_go_duration(wait_ms / 1000)}. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            type_="requests",
            code="rate_limit_exceeded",
            headers={"retry-after-ms": str(wait_ms),
                     "retry-after": str(max(1, math.ceil(wait_ms / 1000)))},
        )

    def rate_limit_headers(self, state: RateLimitState) -> dict[str, str]:
        """``x-ratelimit-*-requests`` as OpenAI documents them: requests permitted before the
        limit is exhausted, how many remain, and the time until it is back to its initial
        state (a Go duration such as ``12ms`` or ``6m0s``)."""
        return {"x-ratelimit-limit-requests": str(state.limit),
                "x-ratelimit-remaining-requests": str(state.remaining),
                "x-ratelimit-reset-requests": _go_duration(state.reset)}

    def no_route(self, request: Request, other_method: bool) -> ApiError:
        return _ApiError(404, f"Invalid URL ({request.method} {request.path})")

    def dispatch(self, request: Request) -> tuple[int, Any]:
        """Every call but ``GET /v1/models`` needs the admin key; then the JSON body is parsed
        and the handler called as ``(authorization=, query=, body=, **path_groups)``."""
        handler_name, groups = self.route(request)
        authorization = request.headers.get("authorization")
        with self._lock:
            if handler_name not in ("_list_models", "_chat_completion"):
                self._check_admin(authorization)
            handler = getattr(self, handler_name)
            return 200, handler(authorization=authorization, query=request.query,
                                body=_parse_body(request.raw_body), target=request.target,
                                **groups)

    # The handlers below run with self._lock held.

    def _check_admin(self, authorization: str | None) -> None:
        token = bearer(authorization)
        if token is None:
            raise _ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
                "or as the password field (with blank username) if you're accessing the API "
                "from your browser and are prompted for a username and password. You can obtain "
                "an API key from https://platform.openai.com/account/api-keys.",
            )
        if hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return
        key = self._lookup_value(token)
        if key is not None and key.usable(self.clock()):
            raise _ApiError(
                403,
                "You have insufficient permissions for this operation. Missing scopes: "
                "api.management.read. Check that you have the correct role in your organization "
                "(Owner), and if you're using a restricted API key, that it has the necessary "
                "scopes.",
            )
        raise _invalid_key(token)

    def _using_key(self, authorization: str | None) -> tuple[_Key, float]:
        """The live key a model call is made with (401 otherwise), marked used now."""
        token = bearer(authorization)
        if token is None:
            raise _ApiError(401, "You didn't provide an API key.")
        key = self._lookup_value(token)
        now = self.clock()
        if key is None or not key.usable(now):
            raise _invalid_key(token)
        key.last_used_at = int(now)
        return key, now

    def _list_models(self, authorization: str | None, **_: Any) -> Any:
        self._using_key(authorization)
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
                for m in _MODELS
            ],
        }

    def _chat_completion(self, authorization: str | None, body: dict[str, Any],
                         **_: Any) -> Any:
        """A completion (its text is fixed): what the Usage API counts, per key."""
        key, now = self._using_key(authorization)
        model = body.get("model") or "gpt-4o-mini"
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages") or []
                     if isinstance(m, dict))
        use = _Use(now, key.id, key.project_id, 1, max(1, prompt // 4), 8, str(model))
        self._uses.append(use)
        if body.get("stream") is True:  # chat.completion.chunk events, as the SDK reads them
            ident, created = _random_id("chatcmpl-"), int(now)

            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": use.model, "choices": [{"index": 0, "delta": delta,
                                                         "finish_reason": finish}]}

            return EventStream((chunk({"role": "assistant", "content": ""}, None),
                                *(chunk({"content": word}, None) for word in ("o", "k")),
                                chunk({}, "stop")), gap=self.stream_gap)
        return {"id": _random_id("chatcmpl-"), "object": "chat.completion",
                "created": int(now), "model": use.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": use.input_tokens,
                          "completion_tokens": use.output_tokens,
                          "total_tokens": use.input_tokens + use.output_tokens}}

    def _usage_completions(self, query: dict[str, str], target: str, **_: Any) -> Any:
        """``GET /v1/organization/usage/completions``: buckets of ``bucket_width`` from
        ``start_time`` (inclusive) to ``end_time`` (exclusive, default now), ``limit`` a page,
        ``page`` the cursor; grouped by ``group_by`` fields, filtered by ``api_key_ids``,
        ``project_ids`` and ``models`` (arrays as ``name[]=`` or repeated ``name=``)."""
        every = parse_qs(urlsplit(target).query)

        def many(name: str) -> list[str]:
            return every.get(f"{name}[]", []) + every.get(name, [])

        def number(name: str, default: int | None = None) -> int:
            text = query.get(name)
            if text is None:
                if default is None:
                    raise _ApiError(400, f"Missing required parameter: '{name}'.", param=name)
                return default
            try:
                return int(text)
            except ValueError:
                raise _ApiError(400, f"Invalid '{name}': expected an integer.",
                                param=name) from None

        width_name = query.get("bucket_width", "1d")
        if width_name not in _BUCKETS:
            raise _ApiError(400, "Invalid 'bucket_width': expected one of 1m, 1h, 1d.",
                            param="bucket_width")
        width, default_limit, max_limit = _BUCKETS[width_name]
        start = number("start_time")
        end = number("end_time", int(self.clock()) + 1)
        limit = number("limit", default_limit)
        if not 1 <= limit <= max_limit:
            raise _ApiError(400, f"Invalid 'limit': must be between 1 and {max_limit} for "
                            f"bucket_width={width_name}.", param="limit")
        groups = many("group_by")
        allowed = {"project_id", "user_id", "api_key_id", "model", "batch", "service_tier",
                   "api_source"}
        if set(groups) - allowed:
            raise _ApiError(400, "Invalid 'group_by'.", param="group_by")
        keys, projects, models = set(many("api_key_ids")), set(many("project_ids")), \
            set(many("models"))
        first = start - start % width
        starts = list(range(first, end, width))
        offset = 0
        if query.get("page"):
            try:
                offset = int(base64.b64decode(query["page"]).decode())
            except ValueError:
                raise _ApiError(400, "Invalid 'page'.", param="page") from None
        page = starts[offset:offset + limit]
        uses = [u for u in self._uses if (not keys or u.key_id in keys)
                and (not projects or u.project_id in projects)
                and (not models or u.model in models) and start <= u.at < end]
        data = []
        for bucket in page:
            totals: dict[tuple[Any, ...], list[int]] = {}
            for u in uses:
                if bucket <= u.at < bucket + width:
                    group = (u.project_id if "project_id" in groups else None,
                             u.key_id if "api_key_id" in groups else None,
                             u.model if "model" in groups else None)
                    t = totals.setdefault(group, [0, 0, 0])
                    t[0] += u.requests
                    t[1] += u.input_tokens
                    t[2] += u.output_tokens
            data.append({"object": "bucket", "start_time": bucket, "end_time": bucket + width,
                         "results": [{
                             "object": "organization.usage.completions.result",
                             "input_tokens": t[1], "output_tokens": t[2],
                             "input_cached_tokens": 0, "input_audio_tokens": 0,
                             "output_audio_tokens": 0, "num_model_requests": t[0],
                             "project_id": g[0], "user_id": None, "api_key_id": g[1],
                             "model": g[2], "batch": None}
                             for g, t in totals.items()]})
        more = offset + limit < len(starts)
        return {"object": "page", "data": data, "has_more": more,
                "next_page": base64.b64encode(str(offset + limit).encode()).decode()
                if more else None}

    def _get_project(self, project_id: str, **_: Any) -> Any:
        project = self._project(project_id)
        return {
            "id": project.id,
            "object": "organization.project",
            "name": project.name,
            "created_at": project.created_at,
            "archived_at": None,
            "status": "active",
        }

    def _get_service_account(self, project_id: str, sa_id: str, **_: Any) -> Any:
        sa = self._service_account(project_id, sa_id)
        return {
            "object": "organization.project.service_account",
            "id": sa.id,
            "name": sa.name,
            "role": sa.role,
            "created_at": sa.created_at,
        }

    def _create_key(self, project_id: str, sa_id: str, body: dict[str, Any], **_: Any) -> Any:
        self._service_account(project_id, sa_id)
        name = body.get("name", "Secret key")
        if not isinstance(name, str):
            raise _ApiError(400, "Invalid type for 'name': expected a string.", param="name")
        expires_in = body.get("expires_in_seconds")
        if expires_in is not None and (not isinstance(expires_in, int)
                                       or not 1 <= expires_in <= 31_536_000):
            raise _ApiError(
                400,
                "Invalid 'expires_in_seconds': expected an integer from 1 to 31536000.",
                param="expires_in_seconds",
            )
        scopes = body.get("scopes") or []
        key = self._mint(project_id, sa_id, name, expires_in=expires_in, scopes=list(scopes))
        return {
            "object": "organization.project.service_account.api_key",
            "value": key.value,
            "name": key.name,
            "created_at": key.created_at,
            "id": key.id,
            "expires_at": key.expires_at,
        }

    def _list_keys(self, project_id: str, query: dict[str, str], **_: Any) -> Any:
        self._project(project_id)
        try:
            limit = int(query.get("limit", _DEFAULT_LIMIT))
        except ValueError:
            raise _ApiError(400, "Invalid 'limit': expected an integer.", param="limit") from None
        if not 1 <= limit <= _MAX_LIMIT:
            raise _ApiError(
                400, f"Invalid 'limit': must be between 1 and {_MAX_LIMIT}.", param="limit"
            )
        access = query.get("owner_project_access")
        if access not in (None, "active", "inactive", "any"):
            raise _ApiError(
                400,
                "Invalid 'owner_project_access': expected active, inactive or any.",
                param="owner_project_access",
            )
        ordered = [k for k in self._keys.values() if k.project_id == project_id]
        after = query.get("after")
        if after:
            position = next((i for i, k in enumerate(ordered) if k.id == after), None)
            if position is None:
                raise _ApiError(400, f"Invalid 'after': no API key {after}.", param="after")
            ordered = ordered[position + 1 :]
        live = [k for k in ordered if not k.deleted]
        if access == "inactive":  # every owner in the fake has project access
            live = []
        page = live[:limit]
        return {
            "object": "list",
            "data": [self._key_object(k) for k in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(live) > limit,
        }

    def _get_key(self, project_id: str, key_id: str, **_: Any) -> Any:
        return self._key_object(self._key(project_id, key_id))

    def _delete_key(self, project_id: str, key_id: str, **_: Any) -> Any:
        key = self._key(project_id, key_id)
        key.deleted = True
        return {"object": "organization.project.api_key.deleted", "id": key.id, "deleted": True}

    # -- helpers (lock held) -------------------------------------------------------------------

    def _project(self, project_id: str) -> _Project:
        project = self._projects.get(project_id)
        if project is None:
            raise _ApiError(404, f"Project with id '{project_id}' not found.")
        return project

    def _service_account(self, project_id: str, sa_id: str) -> _ServiceAccount:
        self._project(project_id)
        sa = self._service_accounts.get(sa_id)
        if sa is None or sa.project_id != project_id:
            raise _ApiError(404, f"Service account with id '{sa_id}' not found.")
        return sa

    def _key(self, project_id: str, key_id: str) -> _Key:
        self._project(project_id)
        key = self._keys.get(key_id)
        if key is None or key.deleted or key.project_id != project_id:
            raise _ApiError(404, f"API key with id '{key_id}' not found.")
        return key

    def _lookup_value(self, value: str) -> _Key | None:
        key_id = self._by_value.get(value)
        return self._keys.get(key_id) if key_id else None

    def _mint(
        self,
        project_id: str,
        sa_id: str,
        name: str,
        *,
        value: str | None = None,
        expires_in: int | None = None,
        scopes: list[str] | None = None,
    ) -> _Key:
        sa = self._service_accounts.get(sa_id)
        if sa is None or sa.project_id != project_id:
            raise KeyError(f"no service account {sa_id} in project {project_id}")
        # Keys share their first characters (sk-svcacct-), so a listing's redaction leaves only
        # the last 4 to tell them apart: draw again rather than mint a key that looks like
        # another live key of the project, which would make ``identify`` refuse to guess at
        # random in tests (a test that wants look-alikes passes ``value``).
        while value is None:
            drawn = service_account_key_value()
            if not any(redact(k.value) == redact(drawn) for k in self._keys.values()
                       if k.project_id == project_id and not k.deleted):
                value = drawn
        if value in self._by_value:
            raise ValueError("that key value is already in use")
        now = int(self.clock())
        key = _Key(
            id=_random_id("key_", 16),
            name=name,
            value=value,
            project_id=project_id,
            service_account_id=sa_id,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
            scopes=scopes or [],
        )
        self._keys[key.id] = key
        self._by_value[value] = key.id
        return key

    def _key_object(self, key: _Key) -> dict[str, Any]:
        sa = self._service_accounts[key.service_account_id]
        return {
            "object": "organization.project.api_key",
            "redacted_value": redact(key.value),
            "name": key.name,
            "created_at": key.created_at,
            "last_used_at": key.last_used_at,
            "expires_at": key.expires_at,
            "id": key.id,
            "owner": {
                "type": "service_account",
                "service_account": {
                    "id": sa.id,
                    "name": sa.name,
                    "created_at": sa.created_at,
                    "role": sa.role,
                },
            },
            "owner_project_access": "active",
        }


def _go_duration(seconds: float) -> str:
    """``seconds`` the way OpenAI's rate-limit headers write a duration (Go's
    ``time.Duration``): ``0s``, ``12ms``, ``1.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _invalid_key(token: str) -> _ApiError:
    return _ApiError(
        401,
        f"Incorrect API key provided: {_mask_for_error(token)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


def _parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
        ) from None
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    return body
