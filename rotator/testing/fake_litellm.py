"""A stateful fake of a LiteLLM proxy's virtual keys, on loopback.

It follows the open-source proxy's documented API: the *master key* (Bearer) generates virtual
keys with ``POST /key/generate`` (``key_alias``, ``duration`` like ``"30d"``, ``max_budget`` in
USD, ``budget_duration`` like ``"1d"``, ``metadata``), reads one with ``GET /key/info?key=``
(the key or its hashed token), lists them with ``GET /key/list`` (``page``, ``size``,
``return_full_object``) and deletes with ``POST /key/delete`` (``{"keys": [...]}``); ``GET
/spend/logs`` (``api_key``, ``start_date``, ``end_date``) lists each call's spend. A virtual key
calls ``GET /v1/models`` and ``POST /v1/chat/completions``: a deleted or expired key gets 401,
one over its budget 400 (``budget_exceeded``), so a test can fail. Keys are stored by their
hashed token (SHA-256 of the key), as the proxy does.
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

__all__ = ["FakeLiteLLM", "hash_token"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}
_DURATION = re.compile(r"(\d+)(mo|s|m|h|d|w)")


def hash_token(value: str) -> str:
    """The proxy's id of a virtual key: the SHA-256 of the key, in hex."""
    return hashlib.sha256(value.encode()).hexdigest()


def _seconds(text: Any, what: str) -> int:
    match = _DURATION.fullmatch(str(text))
    if match is None:
        raise ApiError(400, {"error": {"message": f"Invalid {what} {text!r}: use a number and "
                                                  "s, m, h, d, w or mo", "type": "bad_request",
                                       "param": what, "code": "400"}})
    return int(match.group(1)) * _UNITS[match.group(2)]


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


@dataclass
class _Key:
    token: str
    value: str
    alias: str | None
    created_at: float
    expires_at: float | None = None
    max_budget: float | None = None
    budget_seconds: int | None = None
    budget_duration: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    spends: list[tuple[float, float, int]] = field(default_factory=list)
    """(when, USD, tokens) of each call."""

    def usable(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def spend_now(self, now: float) -> float:
        """Spend in the current budget window (the whole life without budget_duration)."""
        if self.budget_seconds is None:
            return sum(s for _, s, _ in self.spends)
        start = self.created_at + ((now - self.created_at) // self.budget_seconds
                                   ) * self.budget_seconds
        return sum(s for at, s, _ in self.spends if at >= start)


class FakeLiteLLM(JsonApiFake):
    """One LiteLLM proxy's virtual keys behind its master key."""

    name = "fake-litellm"
    routes = [
        ("POST", re.compile(r"/key/generate"), "_generate"),
        ("GET", re.compile(r"/key/info"), "_info"),
        ("GET", re.compile(r"/key/list"), "_list"),
        ("POST", re.compile(r"/key/delete"), "_delete"),
        ("GET", re.compile(r"/spend/logs"), "_spend_logs"),
        ("GET", re.compile(r"/(?:v1/)?models"), "_models"),
        ("POST", re.compile(r"/(?:v1/)?chat/completions"), "_chat"),
    ]

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 price_per_call: float = 0.001) -> None:
        super().__init__(host, port)
        self.master_key = "sk-master-" + secrets.token_hex(16)
        self.price_per_call = price_per_call
        self.clock: Callable[[], float] = time.time
        self._keys: dict[str, _Key] = {}

    def error_body(self, status: int, message: str) -> Any:
        return {"error": {"message": message, "type": "auth_error" if status == 401 else
                          "bad_request", "param": None, "code": str(status)}}

    # -- test controls -------------------------------------------------------------------------

    def seed_key(self, alias: str = "legacy") -> tuple[str, str]:
        """A key made before rotator: ``(hashed token, value)``."""
        with self._lock:
            key = self._mint(alias, None, None, None, None, {})
        return key.token, key.value

    def record_spend(self, token: str, at: float, usd: float, tokens: int = 100) -> None:
        with self._lock:
            self._keys[token].spends.append((at, usd, tokens))

    def is_valid(self, value: str) -> bool:
        with self._lock:
            key = self._keys.get(hash_token(value))
            return key is not None and key.usable(self.clock())

    def key(self, token: str) -> dict[str, Any]:
        with self._lock:
            return self._object(self._keys[token])

    def live_tokens(self) -> set[str]:
        now = self.clock()
        with self._lock:
            return {t for t, k in self._keys.items() if k.usable(now)}

    def issued_values(self) -> list[str]:
        with self._lock:
            return [self.master_key, *(k.value for k in self._keys.values())]

    # -- handlers (lock held) ------------------------------------------------------------------

    def _mint(self, alias: str | None, duration: str | None, max_budget: float | None,
              budget_duration: str | None, budget_seconds: int | None,
              metadata: dict[str, Any]) -> _Key:
        value = "sk-" + random_text(22)
        now = self.clock()
        key = _Key(hash_token(value), value, alias, now,
                   now + _seconds(duration, "duration") if duration else None, max_budget,
                   budget_seconds, budget_duration, metadata)
        self._keys[key.token] = key
        return key

    def _master(self, request: Request) -> None:
        token = bearer(request.headers.get("authorization")) or ""
        if not secrets.compare_digest(token.encode(), self.master_key.encode()):
            raise ApiError(401, self.error_body(401, "Authentication Error, invalid proxy "
                                                     "admin key"))

    def _virtual(self, request: Request) -> _Key:
        value = bearer(request.headers.get("authorization")) or ""
        key = self._keys.get(hash_token(value))
        if key is None or not key.usable(self.clock()):
            raise ApiError(401, self.error_body(401, "Authentication Error, Invalid proxy "
                                                     "server token passed."))
        return key

    def _object(self, key: _Key) -> dict[str, Any]:
        return {"token": key.token, "key_name": f"sk-...{key.value[-4:]}",
                "key_alias": key.alias, "spend": round(sum(s for _, s, _ in key.spends), 6),
                "max_budget": key.max_budget, "budget_duration": key.budget_duration,
                "expires": _iso(key.expires_at) if key.expires_at else None,
                "metadata": key.metadata, "models": [], "created_at": _iso(key.created_at)}

    def _lookup(self, given: str) -> _Key:
        key = self._keys.get(given) or self._keys.get(hash_token(given))
        if key is None:
            raise ApiError(404, self.error_body(404, "Key not found"))
        return key

    def _generate(self, request: Request) -> tuple[int, Any]:
        self._master(request)
        body = request.json()
        max_budget = body.get("max_budget")
        if max_budget is not None and (isinstance(max_budget, bool)
                                       or not isinstance(max_budget, int | float)
                                       or max_budget < 0):
            raise ApiError(400, self.error_body(400, "max_budget must be a number >= 0"))
        budget_duration = body.get("budget_duration")
        seconds = _seconds(budget_duration, "budget_duration") if budget_duration else None
        key = self._mint(body.get("key_alias"), body.get("duration"),
                         float(max_budget) if max_budget is not None else None,
                         budget_duration, seconds, dict(body.get("metadata") or {}))
        return 200, {"key": key.value, "token_id": key.token, "key_alias": key.alias,
                     "expires": _iso(key.expires_at) if key.expires_at else None,
                     "max_budget": key.max_budget, "budget_duration": key.budget_duration,
                     "metadata": key.metadata}

    def _info(self, request: Request) -> tuple[int, Any]:
        given = request.query.get("key")
        if given is None:
            self._master(request)
            raise ApiError(400, self.error_body(400, "key is required"))
        caller = bearer(request.headers.get("authorization")) or ""
        if not secrets.compare_digest(caller.encode(), self.master_key.encode()):
            own = self._virtual(request)  # a virtual key may read itself only
            if self._lookup(given) is not own:
                raise ApiError(403, self.error_body(403, "a key can only read itself"))
        key = self._lookup(given)
        return 200, {"key": key.token, "info": self._object(key)}

    def _list(self, request: Request) -> tuple[int, Any]:
        self._master(request)
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get("size", "10"))
        except ValueError:
            raise ApiError(400, self.error_body(400, "page and size are integers")) from None
        if page < 1 or not 1 <= size <= 100:
            raise ApiError(400, self.error_body(400, "page >= 1 and size 1..100"))
        keys = list(self._keys.values())
        chunk = keys[(page - 1) * size:page * size]
        full = request.query.get("return_full_object") == "true"
        return 200, {"keys": [self._object(k) if full else k.token for k in chunk],
                     "total_count": len(keys), "current_page": page,
                     "total_pages": max(1, -(-len(keys) // size))}

    def _delete(self, request: Request) -> tuple[int, Any]:
        self._master(request)
        given = request.json().get("keys")
        if not isinstance(given, list) or not given:
            raise ApiError(400, self.error_body(400, "keys is a non-empty list"))
        found = [self._lookup(str(k)) for k in given]
        for key in found:
            del self._keys[key.token]
        return 200, {"deleted_keys": [str(k) for k in given]}

    def _spend_logs(self, request: Request) -> tuple[int, Any]:
        self._master(request)
        given = request.query.get("api_key")
        try:
            start = datetime.strptime(request.query["start_date"], "%Y-%m-%d").replace(
                tzinfo=UTC).timestamp()
            end = datetime.strptime(request.query["end_date"], "%Y-%m-%d").replace(
                tzinfo=UTC).timestamp() + 86400
        except (KeyError, ValueError):
            raise ApiError(400, self.error_body(
                400, "start_date and end_date are required, as YYYY-MM-DD")) from None
        keys = [self._keys[given]] if given in self._keys else (
            [self._lookup(given)] if given else list(self._keys.values()))
        logs = [{"request_id": f"chatcmpl-{i}-{k.token[:8]}", "api_key": k.token,
                 "spend": usd, "total_tokens": tokens, "startTime": _iso(at),
                 "endTime": _iso(at), "model": "gpt-4o-mini"}
                for k in keys for i, (at, usd, tokens) in enumerate(k.spends)
                if start <= at < end]
        return 200, sorted(logs, key=lambda log: log["startTime"])

    def _models(self, request: Request) -> tuple[int, Any]:
        self._virtual(request)
        return 200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}

    def _chat(self, request: Request) -> tuple[int, Any]:
        key = self._virtual(request)
        now = self.clock()
        if key.max_budget is not None and key.spend_now(now) + self.price_per_call \
                > key.max_budget + 1e-9:
            raise ApiError(400, {"error": {
                "message": f"Budget has been exceeded! Current cost: {key.spend_now(now):g}, "
                           f"Max budget: {key.max_budget:g}",
                "type": "budget_exceeded", "param": None, "code": "400"}})
        key.spends.append((now, self.price_per_call, 6))
        return 200, {"id": "chatcmpl-" + random_text(20), "object": "chat.completion",
                     "created": int(now), "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "ok"}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
