"""``rotator proxy``: the credential proxy, forwarding agents' calls to the routes' upstreams.

An agent calls ``http://proxy/PREFIX/path`` with a rotator token where the service's key
would go (``Authorization: Bearer``, or ``x-api-key`` for SDKs that send it there). The proxy
checks the token (signature, expiry, revocation), its scope (route, method, path), the token's
budget and the agent's rate, then forwards the call to the route's upstream with the
credential's *current* key attached, read from the vault and cached; after a rotation the
next read picks the new key (and an upstream 401 re-reads it at once and retries the call
once), so no agent reloads anything. Responses stream through unbuffered (server-sent events
of a streamed completion arrive as the upstream sends them). Bodies, header values, keys and
tokens are never logged; each call is an audit event and a metric.

HTTP on both sides is :mod:`rotator.proxy.http11` (asyncio protocols and llhttp, on uvloop):
``bench/proxy.py --stacks`` measured it against aiohttp and starlette/uvicorn/httpx; see the
README.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

from rotator.errors import NotFound, RotatorError
from rotator.interfaces import Secret
from rotator.proxy.http11 import (
    Headers,
    Incoming,
    Origin,
    Reply,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    dropped,
    header_safe,
)
from rotator.proxy.settings import ProxyConfig, RouteConfig
from rotator.proxy.tokens import Claims, Denied, SigningKeys, verify_token

if TYPE_CHECKING:
    from rotator.config import Policies
    from rotator.runtime import Runtime
    from rotator.state.store import StateStore

__all__ = ["ProxyServer"]

log = logging.getLogger("rotator.proxy")

_CALLER_AUTH = frozenset({b"authorization", b"x-api-key"})
"""Where the agent's token comes: never forwarded."""
_JSON: Headers = [(b"Content-Type", b"application/json")]
_TRAVERSAL = re.compile(r"(^|/)\.{1,2}(/|$)")
HEAD_FLUSH_SECONDS = 0.05
"""How long a streamed answer's head waits to go out with its first event."""
REVOCATIONS_REFRESH = 1.0
"""Seconds between reads of the agents' token revocations from the state store."""


@dataclass
class _Bucket:
    """A token bucket: ``rate`` per second, bursts of ``2 * rate``."""

    rate: float
    tokens: float
    at: float

    def take(self, now: float) -> float | None:
        """None if a request may go now, else the seconds until one may."""
        self.tokens = min(2 * self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


@dataclass
class _Key:
    secret: Secret
    read_at: float
    key_id: str | None = None


@dataclass
class CallRecord:
    """One proxied call, as the audit trail and the metrics see it (never a body, a header
    value or a token)."""

    agent: str
    route: str
    method: str
    path: str
    status: int
    outcome: str
    """``ok``, ``upstream_error`` (the upstream answered 4xx/5xx), or the denial's code."""
    duration: float
    bytes_out: int
    at: float = field(default_factory=time.time)
    """When the call ended (Unix time)."""
    credential: str | None = None
    """The credential whose key went upstream (None when refused before that)."""
    key_id: str | None = None
    """Which of its keys (the vault's ``key_id``; None if the vault does not say)."""


class ProxyServer:
    """The proxy of one policy generation: routes, tokens, keys, limits."""

    def __init__(self, policies: Policies, runtime: Runtime, store: StateStore, *,
                 on_call: Callable[[CallRecord], None] | None = None) -> None:
        if policies.proxy is None:
            raise RotatorError("the policy file has no [proxy] section")
        self.policies, self.runtime, self.store = policies, runtime, store
        self.config: ProxyConfig = policies.proxy
        self.on_call = on_call
        self.signing = SigningKeys(policies, runtime, store)
        self._keys: dict[str, _Key] = {}
        self._key_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._spent: dict[str, int] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._revoked: dict[str, datetime] = {}
        self._revoked_at = -1e18
        self._reading: dict[str, asyncio.Future[None]] = {}
        self._verdicts: dict[tuple[str, str, str], tuple[str, tuple[str, str] | None]] = {}
        self._verified: dict[str, Claims] = {}
        """Tokens already verified (until they expire), so a call costs one dict lookup; a
        revocation or a retired signing key is still checked on every call."""
        self._pool: UpstreamPool | None = None
        self._upstreams: dict[str, tuple[Origin, str]] = {
            r.upstream: UpstreamPool.origin(r.upstream) for r in self.config.routes.values()}
        self._routes = sorted(((self.config.prefix_of(n), n, r)
                               for n, r in self.config.routes.items()),
                              key=lambda t: -len(t[0]))

    # -- serving ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Ready the upstream connection pool (on the event loop that will serve)."""
        self._pool = UpstreamPool(timeout=self.config.upstream_timeout.total_seconds())

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def inherit(self, old: ProxyServer) -> None:
        """Carry the spent budgets and rate limits over from the proxy of the previous policy
        generation (a reload must not hand every token its budget back)."""
        self._spent = old._spent
        self._buckets = old._buckets

    # -- one call ------------------------------------------------------------------------------

    async def handle(self, request: Incoming, reply: Reply) -> None:
        """Answer one agent call (the :class:`HTTPServer`'s handler)."""
        started = time.monotonic()
        path = request.path
        found = self._route_of(path)
        if found is None:
            reply.send(404, _JSON, _denial_body("openai", Denied(
                404, "no_route", "no route of the proxy has this path")))
            return
        name, route, sub = found
        agent = "?"
        template = self._template(name, route, request.method, sub)
        try:
            claims = await self._claims(request)
            agent = claims.agent
            self._authorize(claims, name, route, request.method, sub)
            await self._forward(request, reply, route, sub)
        except Denied as denied:
            if reply.started:  # the upstream failed mid-answer: nothing more can be said
                reply.abort()
            else:
                reply.send(denied.status, _denial_headers(denied),
                           _denial_body(route.error_shape, denied))
            self._record(CallRecord(agent, name, request.method, template, denied.status,
                                    denied.code, time.monotonic() - started, 0))
            return
        key = self._keys.get(route.credential)
        self._record(CallRecord(agent, name, request.method, template, reply.status,
                                "ok" if reply.status < 400 else "upstream_error",
                                time.monotonic() - started, reply.sent,
                                credential=route.credential,
                                key_id=key.key_id if key is not None else None))

    def _route_of(self, raw_path: str) -> tuple[str, RouteConfig, str] | None:
        for prefix, name, route in self._routes:
            if raw_path == prefix or raw_path.startswith(prefix + "/"):
                return name, route, raw_path[len(prefix):] or "/"
        return None

    async def _claims(self, request: Incoming) -> Claims:
        header = request.header(b"authorization") or b""
        raw = header[7:] if header[:7].lower() == b"bearer " else \
            request.header(b"x-api-key") or b""
        return await self.check_token(raw.strip().decode("latin-1"))

    async def check_token(self, token: str) -> Claims:
        """The claims of a valid token (cached once verified); :class:`Denied` otherwise."""
        if not token:
            raise Denied(401, "missing_token", "no token: send your rotator token as "
                         "Authorization: Bearer (the SDK's api_key)")
        revoked = await self._revocations()
        await self._signing_keys()
        cached = self._verified.get(token)
        if cached is not None:
            cut = revoked.get(cached.agent)
            if cached.expires_at.timestamp() > time.time() and (
                    cut is None or cached.issued_at > cut) and \
                    self.signing.accepted(cached.key_id) is not None:
                return cached
        claims = verify_token(self.signing, token, revoked)
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    async def _signing_keys(self) -> None:
        """Re-read the signing keys off the event loop (the vault client blocks) when due, so
        verifying a token never waits for the vault."""
        if self.signing.due():
            try:
                await self._once("signing", self.signing.reload)
            except RotatorError as exc:  # no key read yet: nothing can be verified
                raise Denied(503, "signing_key_unavailable", "the proxy cannot read its "
                             "token signing key now; try again shortly") from exc

    async def _revocations(self) -> dict[str, datetime]:
        if time.monotonic() - self._revoked_at >= REVOCATIONS_REFRESH:
            await self._once("revocations", self._read_revocations)
        return self._revoked

    def _read_revocations(self) -> None:
        try:
            self._revoked = self.store.token_revocations()
        except Exception as exc:
            # Store away: keep the revocations read last (none can be added meanwhile,
            # revoking writes to the store) and ask again after the refresh.
            if not self.store.is_unreachable(exc):
                raise
            log.warning("state store unavailable for token revocations (%s); using those "
                        "read last", self.store.describe_error(exc))
        self._revoked_at = time.monotonic()

    async def _once(self, what: str, read: Callable[[], None]) -> None:
        """Run the blocking ``read`` in a thread, once for all the calls that find it due
        together: they wait for the same read instead of each starting one."""
        pending = self._reading.get(what)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(
                None, read))
            self._reading[what] = pending
            pending.add_done_callback(lambda _f: self._reading.pop(what, None))
        await asyncio.shield(pending)

    def _authorize(self, claims: Claims, name: str, route: RouteConfig, method: str,
                   sub: str) -> None:
        if name not in claims.routes:
            raise Denied(403, "out_of_scope", f"this token may not call route {name} (it may "
                         f"call: {', '.join(claims.routes) or 'none'})")
        problem = self._verdict(name, route, method, sub)[1]
        if problem is not None:
            raise Denied(403, *problem)
        if claims.budget is not None:
            spent = self._spent.get(claims.token_id, 0)
            if spent >= claims.budget:
                raise Denied(429, "budget_exhausted", f"this token's budget of "
                             f"{claims.budget} request(s) is spent: get a new token")
            self._spent[claims.token_id] = spent + 1
        rate = route.rate_limit or self.config.rate_limit
        now = time.monotonic()
        bucket = self._buckets.get((claims.agent, name))
        if bucket is None:
            bucket = self._buckets[(claims.agent, name)] = _Bucket(rate, 2 * rate, now)
        wait = bucket.take(now)
        if wait is not None:
            raise Denied(429, "rate_limited", f"agent {claims.agent} is over {rate:g} "
                         f"request(s) per second on route {name}", retry_after=wait)

    async def _key(self, route: RouteConfig, fresh: bool = False) -> Secret:
        cached = self._keys.get(route.credential)
        refresh = self.config.vault_refresh.total_seconds()
        if cached is not None and not fresh and time.monotonic() - cached.read_at < refresh:
            return cached.secret
        async with self._key_locks[route.credential]:
            cached = self._keys.get(route.credential)
            if cached is not None and time.monotonic() - cached.read_at < (
                    0.2 if fresh else refresh):
                return cached.secret
            cred = self.policies.credential(route.credential)
            vault = self.runtime.vault(cred.vault)
            loop = asyncio.get_running_loop()
            try:
                value = await loop.run_in_executor(None, vault.read, cred.path, cred.field)
            except NotFound:
                value = None
            except RotatorError as exc:  # vault sealed or away
                if cached is not None:
                    log.warning("vault %r unavailable (%s); route credential %s keeps the key "
                                "read last", cred.vault, exc, cred.name)
                    cached.read_at = time.monotonic()
                    return cached.secret
                raise Denied(503, "no_key", f"the proxy cannot read the key of route "
                             f"credential {cred.name} now (its vault is unavailable)") from exc
            if value is None or value.secret is None:
                if cached is not None:
                    return cached.secret
                raise Denied(503, "no_key", f"the proxy has no key for route credential "
                             f"{cred.name} yet")
            self._keys[route.credential] = _Key(value.secret, time.monotonic(),
                                                str(value.metadata.get("key_id") or "") or None)
            return value.secret

    async def send(self, route: RouteConfig, method: str, sub: str, query: bytes,
                   headers: Headers, body: bytes) -> UpstreamResponse:
        """Send a call to ``route``'s upstream with the credential's current key attached
        (an upstream 401 re-reads the key, which a rotation may just have replaced, and sends
        once more); the caller reads and releases the response. ``sub`` and ``query`` are as
        the agent sent them (still percent-encoded)."""
        assert self._pool is not None, "open() the proxy first"
        origin, base = self._upstreams[route.upstream]
        skip = dropped(headers) | _CALLER_AUTH
        kind, _, attach_name = route.attach.partition(":")
        attach = attach_name.lower().encode("latin-1")
        if kind == "header":
            skip = skip | {attach}
        kept = [(k, v) for k, v in headers if k.lower() not in skip]
        for attempt in (1, 2):
            key = (await self._key(route, fresh=attempt == 2)).reveal()
            if not header_safe(key):
                raise Denied(503, "no_key", f"the key of route credential {route.credential} "
                             "holds a control character and cannot be sent: store it again")
            sent = list(kept)
            target = (base + sub).encode("latin-1")
            if kind == "bearer":
                sent.append((b"Authorization", b"Bearer " + key.encode("latin-1")))
            elif kind == "header":
                sent.append((attach_name.encode("latin-1"), key.encode("latin-1")))
            if kind == "query":
                pairs = [(k, v) for k, v in parse_qsl(query.decode("latin-1"),
                                                      keep_blank_values=True)
                         if k != attach_name]
                target += b"?" + urlencode([*pairs, (attach_name, key)]).encode("latin-1")
            elif query:
                target += b"?" + query
            try:
                upstream = await self._pool.request(origin, method, target, sent, body)
            except UpstreamError as exc:
                raise Denied(502, "upstream_unavailable", f"the upstream of route "
                             f"{route.upstream} did not answer: {exc}") from None
            if upstream.status == 401 and attempt == 1:
                upstream.release()  # the key may have just been rotated: read it again
                continue
            return upstream
        raise AssertionError("unreachable")

    async def call(self, token: str, route_name: str, method: str, path: str,
                   query: dict[str, str] | None = None, json_body: Any = None
                   ) -> tuple[int, bytes, str]:
        """One call on behalf of a token holder, answered whole: the MCP server's tools use
        it, with the proxy's checks, limits, audit and metrics. ``(status, body, content
        type)``; :class:`Denied` when refused."""
        started = time.monotonic()
        route = self.config.routes.get(route_name)
        if route is None:
            raise Denied(404, "no_route", f"no route named {route_name}")
        method = method.upper()
        sub = quote(path if path.startswith("/") else "/" + path, safe="/%:@!$&'()*+,;=-._~")
        template = self._template(route_name, route, method, sub)
        agent = "?"
        try:
            claims = await self.check_token(token)
            agent = claims.agent
            self._authorize(claims, route_name, route, method, sub)
            body = b"" if json_body is None else json.dumps(json_body).encode()
            headers = [(b"Content-Type", b"application/json")] if body else []
            upstream = await self.send(route, method, sub,
                                       urlencode(list((query or {}).items())).encode(),
                                       headers, body)
            try:
                data = await upstream.read()
            except UpstreamError as exc:
                raise Denied(502, "upstream_unavailable", f"the upstream of route "
                             f"{route.upstream} failed mid-answer: {exc}") from None
            finally:
                upstream.release()
        except Denied as denied:
            self._record(CallRecord(agent, route_name, method, template, denied.status,
                                    denied.code, time.monotonic() - started, 0))
            raise
        status = upstream.status
        kind = (upstream.header(b"content-type") or b"").decode("latin-1")
        key = self._keys.get(route.credential)
        self._record(CallRecord(agent, route_name, method, template, status,
                                "ok" if status < 400 else "upstream_error",
                                time.monotonic() - started, len(data),
                                credential=route.credential,
                                key_id=key.key_id if key is not None else None))
        return status, data, kind

    async def _forward(self, request: Incoming, reply: Reply, route: RouteConfig,
                       sub: str) -> None:
        upstream = await self.send(route, request.method, sub, request.query, request.headers,
                                   request.body)
        try:
            headers = [(k, v) for k, v in upstream.headers
                       if k.lower() not in dropped(upstream.headers)]
            if b"text/event-stream" not in (upstream.header(b"content-type") or b""):
                # A whole answer (the common case) goes back in one write; only an event
                # stream is relayed piece by piece, as the upstream sends it.
                reply.send(upstream.status, headers, await upstream.read())
                return
            reply.start(upstream.status, headers)
            # The head goes with the first event (one write, one wake-up of the agent), or
            # alone if the upstream takes a moment to send one.
            flush = None if upstream.buffered else \
                asyncio.get_running_loop().call_later(HEAD_FLUSH_SECONDS, reply.flush)
            async for chunk in upstream.chunks():
                if flush is not None:
                    flush.cancel()
                    flush = None
                if reply.write(chunk, last=upstream.complete):
                    try:
                        await reply.drain()
                    except ConnectionError:
                        reply.abort()  # the agent hung up, often right after the last event
                        return
            if flush is not None:
                flush.cancel()
            reply.end()
        except UpstreamError as exc:
            raise Denied(502, "upstream_unavailable", f"the upstream of route "
                         f"{route.upstream} failed mid-answer: {exc}") from None
        finally:
            upstream.release()

    # -- denials, audit, metrics ---------------------------------------------------------------

    def _verdict(self, name: str, route: RouteConfig, method: str, sub: str
                 ) -> tuple[str, tuple[str, str] | None]:
        """The route's path pattern a call matches (what the audit trail and the metrics
        record: never its ids or query) and why its method and path are refused, if they are;
        remembered per (route, method, path), as agents repeat the same few calls."""
        key = (name, method, sub)
        known = self._verdicts.get(key)
        if known is not None:
            return known
        decoded = unquote(sub)
        template = next((p for p in route.paths if fnmatch.fnmatchcase(decoded, p)), "(other)")
        problem: tuple[str, str] | None = None  # a 403's code and message
        if _TRAVERSAL.search(decoded) or "\\" in decoded or "\x00" in decoded:
            problem = ("bad_path", "the path has . or .. segments; the proxy forwards only "
                       "plain paths")
        elif method not in route.methods or template == "(other)":
            problem = ("out_of_scope", f"route {name} does not allow {method} {template}")
        if len(self._verdicts) >= 10_000:
            self._verdicts.clear()
        self._verdicts[key] = (template, problem)
        return template, problem

    def _template(self, name: str, route: RouteConfig, method: str, sub: str) -> str:
        return self._verdict(name, route, method, sub)[0]

    def _record(self, record: CallRecord) -> None:
        if self.on_call is not None:
            try:
                self.on_call(record)
            except Exception:
                log.exception("recording a proxied call failed")


def _denial_headers(denied: Denied) -> Headers:
    headers = list(_JSON)
    if denied.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % max(1, int(denied.retry_after + 0.999))))
    return headers


def _denial_body(shape: str, denied: Denied) -> bytes:
    """A denial in the upstream's error shape, so the agent's SDK raises its usual error."""
    if shape == "openai":
        body: dict[str, Any] = {"error": {"message": denied.message,
                                          "type": "rotator_proxy_denied", "param": None,
                                          "code": denied.code}}
    else:
        body = {"error": denied.code, "message": denied.message}
    return json.dumps(body).encode()
