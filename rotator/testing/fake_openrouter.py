"""A stateful fake of OpenRouter's key management API and the calls a key makes, on loopback.

It follows the documented API: a *management key* (Bearer) creates keys with ``POST
/api/v1/keys`` (``name``, ``limit`` in USD, ``limit_reset`` daily/weekly/monthly, ``expires_at``
in UTC), lists them with ``GET /api/v1/keys`` (``offset``, ``include_disabled``), reads, updates
and deletes one with ``GET``/``PATCH``/``DELETE /api/v1/keys/{hash}``; a key reads itself with
``GET /api/v1/key`` and spends with ``POST /api/v1/chat/completions``. Keys carry ``usage``,
``usage_daily``, ``usage_weekly``, ``usage_monthly`` and ``limit_remaining``; a key over its
limit gets 402, a deleted, disabled or expired one 401, so a test can fail.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rotator.testing.fake_server import ApiError, JsonApiFake, Request, bearer, random_text

__all__ = ["FakeOpenRouter", "label_of"]

PAGE_SIZE = 100
_RESETS = {"daily", "weekly", "monthly"}


def label_of(value: str) -> str:
    """How OpenRouter shows a key: ``sk-or-v1-abc...123``."""
    return f"{value[:12]}...{value[-3:]}"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Key:
    hash: str
    name: str
    value: str
    created_at: float
    limit: float | None = None
    limit_reset: str | None = None
    expires_at: float | None = None
    disabled: bool = False
    spends: list[tuple[float, float]] = field(default_factory=list)
    """(when, USD) of each call."""

    def usable(self, now: float) -> bool:
        return not self.disabled and (self.expires_at is None or now < self.expires_at)

    def spent_since(self, since: float) -> float:
        return round(sum(usd for at, usd in self.spends if at >= since), 6)


def _period_start(now: float, period: str | None) -> float:
    """Midnight UTC starting the current day, week (Monday) or month; 0 for all time."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day.timestamp()
    if period == "weekly":
        return day.timestamp() - day.weekday() * 86400
    if period == "monthly":
        return day.replace(day=1).timestamp()
    return 0.0


class FakeOpenRouter(JsonApiFake):
    """In-memory keys of one OpenRouter account behind its management key."""

    name = "fake-openrouter"
    routes = [
        ("POST", re.compile(r"/api/v1/keys"), "_create"),
        ("GET", re.compile(r"/api/v1/keys"), "_list"),
        ("GET", re.compile(r"/api/v1/keys/(?P<key_hash>[^/]+)"), "_get"),
        ("PATCH", re.compile(r"/api/v1/keys/(?P<key_hash>[^/]+)"), "_update"),
        ("DELETE", re.compile(r"/api/v1/keys/(?P<key_hash>[^/]+)"), "_delete"),
        ("GET", re.compile(r"/api/v1/key"), "_current"),
        ("POST", re.compile(r"/api/v1/chat/completions"), "_chat"),
    ]

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 price_per_call: float = 0.002) -> None:
        super().__init__(host, port)
        self.management_key = "sk-or-v1-" + secrets.token_hex(32)
        self.price_per_call = price_per_call
        self.clock: Callable[[], float] = time.time
        self._keys: dict[str, _Key] = {}

    def error_body(self, status: int, message: str) -> Any:
        return {"error": {"code": status, "message": message}}

    @property
    def base_url(self) -> str:
        return f"{self.url}/api/v1"

    # -- test controls -------------------------------------------------------------------------

    def seed_key(self, name: str = "legacy", limit: float | None = None) -> tuple[str, str]:
        """A key made in the dashboard: ``(hash, value)``."""
        with self._lock:
            key = self._mint(name, limit, None, None)
        return key.hash, key.value

    def record_spend(self, key_hash: str, at: float, usd: float) -> None:
        """Spend of ``key_hash`` at ``at`` (synthetic history)."""
        with self._lock:
            self._keys[key_hash].spends.append((at, usd))

    def is_valid(self, value: str) -> bool:
        with self._lock:
            key = self._by_value(value)
            return key is not None and key.usable(self.clock())

    def key(self, key_hash: str) -> dict[str, Any]:
        with self._lock:
            return self._object(self._keys[key_hash])

    def live_hashes(self) -> set[str]:
        now = self.clock()
        with self._lock:
            return {k.hash for k in self._keys.values() if k.usable(now)}

    def issued_values(self) -> list[str]:
        with self._lock:
            return [self.management_key, *(k.value for k in self._keys.values())]

    # -- handlers (lock held) ------------------------------------------------------------------

    def _mint(self, name: str, limit: float | None, reset: str | None,
              expires_at: float | None) -> _Key:
        value = "sk-or-v1-" + secrets.token_hex(32)
        key = _Key(hashlib.sha256(value.encode()).hexdigest(), name, value, self.clock(),
                   limit, reset, expires_at)
        self._keys[key.hash] = key
        return key

    def _by_value(self, value: str) -> _Key | None:
        return next((k for k in self._keys.values()
                     if secrets.compare_digest(k.value.encode(), value.encode())), None)

    def _management(self, request: Request) -> None:
        token = bearer(request.headers.get("authorization")) or ""
        if not secrets.compare_digest(token.encode(), self.management_key.encode()):
            raise ApiError(401, self.error_body(401, "No auth credentials found"))

    def _caller(self, request: Request) -> _Key:
        key = self._by_value(bearer(request.headers.get("authorization")) or "")
        if key is None or not key.usable(self.clock()):
            raise ApiError(401, self.error_body(401, "User not found."))
        return key

    def _object(self, key: _Key) -> dict[str, Any]:
        now = self.clock()
        usage = key.spent_since(0)
        in_period = key.spent_since(_period_start(now, key.limit_reset))
        return {
            "hash": key.hash, "name": key.name, "label": label_of(key.value),
            "disabled": key.disabled, "limit": key.limit, "limit_reset": key.limit_reset,
            "limit_remaining": None if key.limit is None else max(0.0, key.limit - in_period),
            "include_byok_in_limit": False, "usage": usage,
            "usage_daily": key.spent_since(_period_start(now, "daily")),
            "usage_weekly": key.spent_since(_period_start(now, "weekly")),
            "usage_monthly": key.spent_since(_period_start(now, "monthly")),
            "byok_usage": 0, "byok_usage_daily": 0, "byok_usage_weekly": 0,
            "byok_usage_monthly": 0, "created_at": _iso(key.created_at),
            "updated_at": None,
            "expires_at": _iso(key.expires_at) if key.expires_at else None}

    def _key(self, key_hash: str) -> _Key:
        key = self._keys.get(key_hash)
        if key is None:
            raise ApiError(404, self.error_body(404, "API key not found"))
        return key

    def _terms(self, body: dict[str, Any]) -> tuple[float | None, str | None]:
        limit, reset = body.get("limit"), body.get("limit_reset")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)
                                  or limit < 0):
            raise ApiError(400, self.error_body(400, "limit must be a non-negative number"))
        if reset is not None and reset not in _RESETS:
            raise ApiError(400, self.error_body(
                400, "limit_reset must be one of daily, weekly, monthly or null"))
        return (float(limit) if limit is not None else None), reset

    def _create(self, request: Request) -> tuple[int, Any]:
        self._management(request)
        body = request.json()
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, self.error_body(400, "name is required"))
        limit, reset = self._terms(body)
        expires = body.get("expires_at")
        expires_at = None
        if expires is not None:
            if not isinstance(expires, str) or not expires.endswith("Z"):
                raise ApiError(400, self.error_body(
                    400, "expires_at must be an ISO 8601 UTC timestamp (ending in Z)"))
            try:
                expires_at = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise ApiError(400, self.error_body(400, "expires_at is not a date")) from None
            if expires_at <= self.clock():
                raise ApiError(400, self.error_body(400, "expires_at must be in the future"))
        key = self._mint(name, limit, reset, expires_at)
        return 201, {"data": self._object(key), "key": key.value}

    def _list(self, request: Request) -> tuple[int, Any]:
        self._management(request)
        try:
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise ApiError(400, self.error_body(400, "offset must be an integer")) from None
        disabled = request.query.get("include_disabled") == "true"
        keys = [k for k in self._keys.values() if disabled or not k.disabled]
        return 200, {"data": [self._object(k) for k in keys[offset:offset + PAGE_SIZE]]}

    def _get(self, request: Request, key_hash: str) -> tuple[int, Any]:
        self._management(request)
        return 200, {"data": self._object(self._key(key_hash))}

    def _update(self, request: Request, key_hash: str) -> tuple[int, Any]:
        self._management(request)
        key = self._key(key_hash)
        body = request.json()
        if "disabled" in body:
            key.disabled = bool(body["disabled"])
        if "name" in body:
            key.name = str(body["name"])
        if "limit" in body or "limit_reset" in body:
            key.limit, key.limit_reset = self._terms({"limit": key.limit,
                                                      "limit_reset": key.limit_reset, **body})
        return 200, {"data": self._object(key)}

    def _delete(self, request: Request, key_hash: str) -> tuple[int, Any]:
        self._management(request)
        self._key(key_hash)
        del self._keys[key_hash]
        return 200, {"deleted": True}

    def _current(self, request: Request) -> tuple[int, Any]:
        key = self._caller(request)
        data = self._object(key)
        return 200, {"data": {k: data[k] for k in (
            "label", "limit", "limit_reset", "limit_remaining", "include_byok_in_limit",
            "usage", "usage_daily", "usage_weekly", "usage_monthly", "expires_at")}
            | {"is_free_tier": False}}

    def _chat(self, request: Request) -> tuple[int, Any]:
        key = self._caller(request)
        now = self.clock()
        if key.limit is not None and \
                key.spent_since(_period_start(now, key.limit_reset)) + self.price_per_call \
                > key.limit + 1e-9:
            raise ApiError(402, self.error_body(
                402, "Key limit exceeded: this key's credit limit is spent"))
        key.spends.append((now, self.price_per_call))
        body = request.json()
        return 200, {"id": "gen-" + random_text(24), "object": "chat.completion",
                     "created": int(now), "model": body.get("model") or "openai/gpt-4o-mini",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "ok"}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6,
                               "cost": self.price_per_call}}
