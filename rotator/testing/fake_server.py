"""The threaded loopback JSON server every stateful HTTP fake in :mod:`rotator.testing` builds on.

The fakes of OpenAI, Stripe, SendGrid, Cloudflare and Anthropic differ only in their APIs; the
serving around them is the same, so it lives here once: start/stop and the context manager, a
request log (:meth:`JsonApiFake.request_count`, :meth:`JsonApiFake.answered`), injected
faults, latency (each request delayed on its own thread, never queued behind another), an
optional request-rate limit per caller (a token bucket, as a real API's, answering 429 above
it), routing, and the HTTP handler. A fake declares ``routes``, implements their handlers and,
through a few hooks, shapes errors and headers the way its service does.

Nothing here logs a header or a body, so no key value leaves through this module.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import string
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Answered", "ApiError", "EventStream", "JsonApiFake", "RateLimitState", "Request",
           "Route", "bearer", "random_text", "rfc3339"]

log = logging.getLogger(__name__)

_URLSAFE = string.ascii_letters + string.digits + "-_"

Route = tuple[str, re.Pattern[str], str]
"""``(method, path pattern, handler method name)``; named groups become keyword arguments."""


def random_text(length: int, alphabet: str = _URLSAFE) -> str:
    """``length`` characters of ``alphabet`` from a CSPRNG (ids, key values)."""
    return "".join(secrets.choice(alphabet) for _ in range(length))


def rfc3339(at: float) -> str:
    """``at`` (epoch seconds) as ``2025-01-02T03:04:05.123456Z``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class Request:
    """One request as a handler sees it.

    ``target`` is the request line's path and query as sent; ``path`` is its path decoded, without
    a trailing slash; ``query`` holds the last value of each non-blank parameter; ``headers`` keys
    are lower-case.
    """

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    raw_body: bytes

    @classmethod
    def parse(cls, method: str, target: str, headers: Mapping[str, str], raw: bytes) -> Request:
        split = urlsplit(target)
        path = unquote(split.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        return cls(method, target, path, query, headers, raw)

    def json(self) -> Any:
        """The body as JSON (``{}`` when empty); raises ``ValueError`` when it is not JSON."""
        if not self.raw_body:
            return {}
        return json.loads(self.raw_body)


class ApiError(Exception):
    """An error response: ``status`` with ``body`` (already in the service's shape)."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


@dataclass
class _Fault:
    status: int
    remaining: int
    path_contains: str
    method: str | None
    retry_after: float | None

    def matches(self, method: str, target: str) -> bool:
        return (self.remaining > 0 and self.path_contains in target
                and (self.method is None or self.method == method))


@dataclass(frozen=True)
class Answered:
    """One answered request of the log: when it arrived and was answered (``time.time()``),
    and its status. Never a header or a body."""

    at: float
    answered_at: float
    method: str
    target: str
    status: int


@dataclass(frozen=True)
class RateLimitState:
    """Where one caller stands against the rate limit, for the service's headers: ``limit``
    requests permitted before the limit is exhausted, ``remaining`` of them, ``reset`` seconds
    until it is back to its initial state, ``retry_after`` seconds until the next request
    would be let through (0 when this one was)."""

    limit: int
    remaining: int
    reset: float
    retry_after: float


@dataclass
class _Bucket:
    tokens: float
    updated: float


class JsonApiFake:
    """A JSON API on loopback: subclasses declare ``routes`` and implement the handlers.

    By default a handler is ``(request, **path_groups) -> (status, body)`` and runs with
    ``self._lock`` held; it raises :class:`ApiError` for an error response (a fake that calls
    its handlers otherwise overrides :meth:`dispatch`). The hooks :meth:`error_body`,
    :meth:`fault_error`, :meth:`no_route` and :meth:`response_headers` shape responses the way
    the service does; :meth:`rate_limit_key`, :meth:`rate_limit_error` and
    :meth:`rate_limit_headers` say who a rate limit applies to and how it answers.
    """

    routes: ClassVar[list[Route]] = []
    name: ClassVar[str] = "fake"
    """Names the server thread and prefixes debug log lines."""
    server_version: ClassVar[str] = BaseHTTPRequestHandler.server_version
    """The product in the ``Server`` response header."""
    tcp_nodelay: ClassVar[bool] = True
    """Send each response at once: with Nagle's algorithm, headers and body go out in two
    writes and the client's delayed ACK adds ~40 ms to every response on a kept-alive
    connection."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._faults: list[_Fault] = []
        self._requests: list[tuple[str, str]] = []
        self._latency = 0.0
        self._answered: list[Answered] = []
        self._rate: float | None = None
        self._burst = 0.0
        self._buckets: dict[str, _Bucket] = {}
        self._throttled = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind (port 0 picks a free one) and serve in a daemon thread; returns ``self``."""
        if self._server is None:
            server = _Server((self._host, self._port), _Handler)
            server.fake = self
            self._server = server
            self._port = server.server_address[1]
            self._thread = threading.Thread(target=server.serve_forever, name=self.name,
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def started(self) -> bool:
        """Whether it is serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash or path."""
        return f"http://{self._host}:{self._port}"

    # -- test controls -------------------------------------------------------------------------

    def inject_fault(self, status: int, count: int = 1, path_contains: str = "",
                     method: str | None = None, retry_after: float | None = None) -> None:
        """The next ``count`` requests matching ``method`` and ``path_contains`` (query string
        included) get ``status`` in the service's error shape, before authentication;
        ``retry_after`` sets the ``Retry-After`` header."""
        with self._lock:
            self._faults.append(_Fault(status, count, path_contains,
                                       method.upper() if method else None, retry_after))

    def set_latency(self, seconds: float) -> None:
        """Delay every response by ``seconds`` (for client timeout tests)."""
        with self._lock:
            self._latency = seconds

    def set_rate_limit(self, requests_per_second: float | None, burst: float | None = None
                       ) -> None:
        """Let each caller (:meth:`rate_limit_key`) make ``requests_per_second`` requests a
        second, ``burst`` (default: one second's worth) at once after a quiet spell, and answer
        the requests above that with :meth:`rate_limit_error` (a token bucket, counted at
        arrival, before latency). None lifts the limit."""
        if requests_per_second is not None and requests_per_second <= 0:
            raise ValueError("requests_per_second must be positive")
        with self._lock:
            self._rate = requests_per_second
            self._burst = max(1.0, burst if burst is not None else requests_per_second or 1.0)
            self._buckets.clear()

    def reset_faults(self) -> None:
        """Forget pending faults, latency and the rate limit."""
        with self._lock:
            self._faults.clear()
            self._latency = 0.0
            self._rate = None
            self._buckets.clear()

    @property
    def rate_limited_count(self) -> int:
        """How many requests the rate limit refused (429) so far."""
        with self._lock:
            return self._throttled

    def answered(self) -> list[Answered]:
        """Every answered request so far, in the order they were answered."""
        with self._lock:
            return list(self._answered)

    def request_count(self, method: str | None = None, path_contains: str = "") -> int:
        """How many requests (query string included in the path) matched so far."""
        wanted = method.upper() if method else None
        with self._lock:
            return sum(1 for m, p in self._requests
                       if (wanted is None or m == wanted) and path_contains in p)

    # -- hooks for subclasses ------------------------------------------------------------------

    def error_body(self, status: int, message: str) -> Any:
        """The service's error body for ``status`` (default faults, unknown routes, bad JSON)."""
        return {"error": message}

    def response_headers(self) -> dict[str, str]:
        """Headers added to every response (request ids)."""
        return {}

    def rate_limit_key(self, request: Request) -> str | None:
        """Who ``request`` counts against when a rate limit is set (None: nobody, it is not
        limited). By default nothing is limited; a fake names its service's unit (a key)."""
        return None

    def rate_limit_error(self, request: Request, state: RateLimitState) -> ApiError:
        """The answer to a request above the rate limit."""
        return ApiError(429, self.error_body(429, "rate limit exceeded"),
                        {"retry-after": f"{max(1, math.ceil(state.retry_after))}"})

    def rate_limit_headers(self, state: RateLimitState) -> dict[str, str]:
        """Headers telling a limited caller where it stands, on every answer it gets."""
        return {}

    def fault_error(self, request: Request, status: int, retry_after: float | None) -> ApiError:
        """What an injected fault answers ``request`` with."""
        headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
        return ApiError(status, self.error_body(status, "injected fault"), headers)

    def no_route(self, request: Request, other_method: bool) -> ApiError:
        """The answer when no route fits; ``other_method``: one fits the path, not the method."""
        path = urlsplit(request.target).path
        return ApiError(404, self.error_body(404, f"no route for {request.method} {path}"))

    def route(self, request: Request) -> tuple[str, dict[str, str]]:
        """The handler name and path groups of the first route fitting ``request``; raises
        :meth:`no_route`'s error when none does."""
        other_method = False
        for route_method, pattern, handler_name in self.routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if route_method == request.method:
                return handler_name, match.groupdict()
            other_method = True
        raise self.no_route(request, other_method)

    def dispatch(self, request: Request) -> tuple[int, Any]:
        """Answer ``request`` (faults and latency already applied): ``(status, body)``."""
        handler_name, groups = self.route(request)
        try:
            with self._lock:
                status, body = getattr(self, handler_name)(request, **groups)
        except ValueError:  # a body that is not JSON
            raise ApiError(400, self.error_body(400, "request body is not valid JSON")) from None
        return status, body

    # -- serving (server threads) --------------------------------------------------------------

    def _handle(self, method: str, target: str, headers: Mapping[str, str],
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        """Log the request, apply a pending fault or latency, then :meth:`dispatch`:
        ``(status, body, headers)``."""
        request = Request.parse(method, target, headers, raw)
        at = time.time()
        with self._lock:
            self._requests.append((method, target))
            latency = self._latency
            fault = next((f for f in self._faults if f.matches(method, target)), None)
            if fault is not None:
                fault.remaining -= 1
            limit = self._take(request) if fault is None else None
        log.debug("%s: %s %s", self.name, method, urlsplit(target).path)
        if latency:
            time.sleep(latency)  # on this request's own thread: concurrent requests overlap
        extra = self.response_headers()
        if limit is not None:
            extra.update(self.rate_limit_headers(limit))
        try:
            if fault is not None:
                raise self.fault_error(request, fault.status, fault.retry_after)
            if limit is not None and limit.retry_after > 0:
                raise self.rate_limit_error(request, limit)
            status, body = self.dispatch(request)
        except ApiError as exc:
            status, body, extra = exc.status, exc.body, {**extra, **exc.headers}
        with self._lock:
            self._answered.append(Answered(at, time.time(), method, target, status))
        return status, body, extra

    def _take(self, request: Request) -> RateLimitState | None:
        """Take a token of ``request``'s caller's bucket (``_lock`` held): None when no limit
        applies; ``retry_after`` > 0 when the bucket was empty (the request is refused)."""
        if self._rate is None:
            return None
        key = self.rate_limit_key(request)
        if key is None:
            return None
        now = time.monotonic()
        bucket = self._buckets.setdefault(key, _Bucket(self._burst, now))
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        wait = 0.0
        if bucket.tokens >= 1:
            bucket.tokens -= 1
        else:
            wait = (1 - bucket.tokens) / self._rate
            self._throttled += 1
        return RateLimitState(limit=int(self._burst), remaining=int(bucket.tokens),
                              reset=(self._burst - bucket.tokens) / self._rate, retry_after=wait)


@dataclass(frozen=True)
class EventStream:
    """A handler's answer sent as server-sent events (``text/event-stream``, chunked): each
    event's JSON as one ``data:`` line, ``gap`` seconds apart, then ``data: [DONE]``, the way
    OpenAI streams a completion."""

    events: tuple[Any, ...]
    gap: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a fleet's workers connecting at once are not refused a SYN
    fake: JsonApiFake

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that time out and hang up are expected here; stay quiet about them."""
        log.debug("%s: connection from %s ended with an error", self.fake.name, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.disable_nagle_algorithm = self.server.fake.tcp_nodelay
        super().setup()

    def version_string(self) -> str:
        return f"{self.server.fake.server_version} {self.sys_version}"

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the default writes request lines to stderr."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, extra = self.server.fake._handle(method, self.path, headers, raw)
        if isinstance(body, EventStream):
            self._stream(status, body, extra)
            return
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, status: int, stream: EventStream, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        lines = [f"data: {json.dumps(e)}\n\n".encode() for e in stream.events]
        for i, line in enumerate([*lines, b"data: [DONE]\n\n"]):
            if i and stream.gap:
                time.sleep(stream.gap)
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
