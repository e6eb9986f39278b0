"""``rotator proxy``: the credential proxy, an aiohttp server forwarding to the routes' upstreams.

An agent calls ``http://proxy/PREFIX/path`` with a rotator token where the service's key
would go (``Authorization: Bearer``, or ``x-api-key`` for SDKs that send it there). The proxy
checks the token (signature, expiry, revocation), its scope (route, method, path), the token's
budget and the agent's rate, then forwards the call to the route's upstream with the
credential's *current* key attached, read from the vault and cached; after a rotation the
next read picks the new key (and an upstream 401 re-reads it at once and retries the call
once), so no agent reloads anything. Responses stream through unbuffered (server-sent events
of a streamed completion arrive as the upstream sends them). Bodies, header values, keys and
tokens are never logged; each call is an audit event and a metric.

aiohttp serves and forwards: one event loop, its C HTTP parser on both sides, and streaming
in both directions (``bench/proxy.py`` measured it against the alternatives; see the README).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from rotator.errors import NotFound, RotatorError
from rotator.interfaces import Secret
from rotator.proxy.settings import ProxyConfig, RouteConfig
from rotator.proxy.tokens import Claims, Denied, SigningKeys, verify_token

if TYPE_CHECKING:
    from aiohttp import ClientSession, web

    from rotator.config import Policies
    from rotator.runtime import Runtime
    from rotator.state.store import StateStore

__all__ = ["ProxyServer"]

log = logging.getLogger("rotator.proxy")

_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "trailers",
                         "transfer-encoding", "upgrade", "host", "content-length"})
_TRAVERSAL = re.compile(r"(^|/)\.{1,2}(/|$)")
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
        self._verified: dict[str, Claims] = {}
        """Tokens already verified (until they expire), so a call costs one dict lookup; a
        revocation or a retired signing key is still checked on every call."""
        self._session: ClientSession | None = None
        self._routes = sorted(((self.config.prefix_of(n), n, r)
                               for n, r in self.config.routes.items()),
                              key=lambda t: -len(t[0]))

    # -- the aiohttp application ---------------------------------------------------------------

    def app(self) -> web.Application:
        from aiohttp import web

        application = web.Application(client_max_size=64 * 1024 * 1024)
        application.router.add_route("*", "/{tail:.*}", self.handle)
        application.on_startup.append(lambda _app: self.open())
        application.on_cleanup.append(lambda _app: self.close())
        return application

    async def open(self) -> None:
        """Open the upstream connection pool (on the event loop that will serve)."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.config.upstream_timeout.total_seconds(),
                                        sock_connect=10)
        self._session = aiohttp.ClientSession(
            timeout=timeout, auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- one call ------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        found = self._route_of(request.rel_url.raw_path)
        if found is None:
            return self._deny_plain(404, "no_route", "no route of the proxy has this path")
        name, route, sub = found
        agent = "?"
        try:
            claims = await self._claims(request)
            agent = claims.agent
            self._authorize(claims, name, route, request.method, sub)
            response = await self._forward(request, name, route, sub, claims)
        except Denied as denied:
            self._record(CallRecord(agent, name, request.method, self._template(route, sub),
                                    denied.status, denied.code, time.monotonic() - started, 0))
            return self._deny(route, denied)
        body = getattr(response, "body", None)
        sent = len(body) if isinstance(body, bytes) else response.body_length
        self._record(CallRecord(agent, name, request.method, self._template(route, sub),
                                response.status, "ok" if response.status < 400
                                else "upstream_error", time.monotonic() - started, sent))
        return response

    def _route_of(self, raw_path: str) -> tuple[str, RouteConfig, str] | None:
        for prefix, name, route in self._routes:
            if raw_path == prefix or raw_path.startswith(prefix + "/"):
                return name, route, raw_path[len(prefix):] or "/"
        return None

    async def _claims(self, request: web.Request) -> Claims:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else \
            request.headers.get("x-api-key", "").strip()
        return await self.check_token(token)

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
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.signing.reload)
            except RotatorError as exc:  # no key read yet: nothing can be verified
                raise Denied(503, "signing_key_unavailable", "the proxy cannot read its "
                             "token signing key now; try again shortly") from exc

    async def _revocations(self) -> dict[str, datetime]:
        now = time.monotonic()
        if now - self._revoked_at >= REVOCATIONS_REFRESH:
            loop = asyncio.get_running_loop()
            try:
                self._revoked = await loop.run_in_executor(None, self.store.token_revocations)
            except Exception as exc:
                # Store away: keep the revocations read last (none can be added meanwhile,
                # revoking writes to the store) and ask again after the refresh.
                if self.store.is_unreachable(exc):
                    log.warning("state store unavailable for token revocations (%s); using "
                                "those read last", self.store.describe_error(exc))
                else:
                    raise
            self._revoked_at = now
        return self._revoked

    def _authorize(self, claims: Claims, name: str, route: RouteConfig, method: str,
                   sub: str) -> None:
        decoded = unquote(sub)
        if _TRAVERSAL.search(decoded) or "\\" in decoded or "\x00" in decoded:
            raise Denied(403, "bad_path", "the path has . or .. segments; the proxy forwards "
                         "only plain paths")
        if name not in claims.routes:
            raise Denied(403, "out_of_scope", f"this token may not call route {name} (it may "
                         f"call: {', '.join(claims.routes) or 'none'})")
        if not route.allows(method, decoded):
            raise Denied(403, "out_of_scope", f"route {name} does not allow {method} "
                         f"{self._template(route, sub)}")
        if claims.budget is not None:
            spent = self._spent.get(claims.token_id, 0)
            if spent >= claims.budget:
                raise Denied(429, "budget_exhausted", f"this token's budget of "
                             f"{claims.budget} request(s) is spent: get a new token")
            self._spent[claims.token_id] = spent + 1
        rate = route.rate_limit or self.config.rate_limit
        bucket = self._buckets.setdefault((claims.agent, name),
                                          _Bucket(rate, 2 * rate, time.monotonic()))
        wait = bucket.take(time.monotonic())
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
            self._keys[route.credential] = _Key(value.secret, time.monotonic())
            return value.secret

    async def send(self, route: RouteConfig, method: str, sub: str,
                   query: list[tuple[str, str]], headers: Any, body: bytes) -> Any:
        """Send a call to ``route``'s upstream with the credential's current key attached
        (an upstream 401 re-reads the key, which a rotation may just have replaced, and sends
        once more); the caller reads and releases the aiohttp response."""
        from yarl import URL

        kept = {k: v for k, v in headers
                if k.lower() not in _HOP_BY_HOP and k.lower() not in ("authorization",
                                                                      "x-api-key")}
        assert self._session is not None
        for attempt in (1, 2):
            key = await self._key(route, fresh=attempt == 2)
            sent = dict(kept)
            params = list(query)
            kind, _, attach_name = route.attach.partition(":")
            if kind == "bearer":
                sent["Authorization"] = f"Bearer {key.reveal()}"
            elif kind == "header":
                sent = {k: v for k, v in sent.items() if k.lower() != attach_name.lower()}
                sent[attach_name] = key.reveal()
            else:
                params = [(k, v) for k, v in params if k != attach_name]
                params.append((attach_name, key.reveal()))
            url = URL(route.upstream + sub, encoded=True).with_query(params)
            upstream = await self._session.request(method, url, headers=sent,
                                                   data=body or None, allow_redirects=False)
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
        import json as jsonlib

        started = time.monotonic()
        route = self.config.routes.get(route_name)
        if route is None:
            raise Denied(404, "no_route", f"no route named {route_name}")
        sub = path if path.startswith("/") else "/" + path
        agent = "?"
        try:
            claims = await self.check_token(token)
            agent = claims.agent
            self._authorize(claims, route_name, route, method.upper(), sub)
            body = b"" if json_body is None else jsonlib.dumps(json_body).encode()
            headers = [("Content-Type", "application/json")] if body else []
            upstream = await self.send(route, method.upper(), sub,
                                       list((query or {}).items()), headers, body)
        except Denied as denied:
            self._record(CallRecord(agent, route_name, method.upper(),
                                    self._template(route, sub), denied.status, denied.code,
                                    time.monotonic() - started, 0))
            raise
        try:
            data = await upstream.read()
            status, kind = upstream.status, upstream.headers.get("Content-Type", "")
        finally:
            upstream.release()
        self._record(CallRecord(agent, route_name, method.upper(), self._template(route, sub),
                                status, "ok" if status < 400 else "upstream_error",
                                time.monotonic() - started, len(data)))
        return status, data, kind

    async def _forward(self, request: web.Request, name: str, route: RouteConfig, sub: str,
                       claims: Claims) -> web.StreamResponse:
        import aiohttp
        from aiohttp import web

        upstream = await self.send(route, request.method, sub,
                                   list(request.rel_url.query.items()),
                                   request.headers.items(), await request.read())
        if "text/event-stream" not in upstream.headers.get("Content-Type", ""):
            # A whole answer (the common case) goes back in one write; only an event stream
            # is relayed chunk by chunk, as the upstream sends it.
            try:
                data = await upstream.read()
            finally:
                upstream.release()
            whole = web.Response(status=upstream.status, reason=upstream.reason, body=data)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding":
                    whole.headers.add(k, v)
            if "Content-Encoding" in upstream.headers:
                whole.headers["Content-Encoding"] = upstream.headers["Content-Encoding"]
            return whole
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        try:
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    response.headers.add(k, v)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The agent hung up, often right after the stream's last event: nothing to send.
            pass
        finally:
            upstream.release()
        return response

    # -- denials, audit, metrics ---------------------------------------------------------------

    def _deny(self, route: RouteConfig, denied: Denied) -> web.StreamResponse:
        from aiohttp import web

        headers = {"Retry-After": f"{max(1, int(denied.retry_after + 0.999))}"} \
            if denied.retry_after is not None else {}
        if route.error_shape == "openai":
            body = {"error": {"message": denied.message, "type": "rotator_proxy_denied",
                              "param": None, "code": denied.code}}
        else:
            body = {"error": denied.code, "message": denied.message}
        return web.json_response(body, status=denied.status, headers=headers)

    def _deny_plain(self, status: int, code: str, message: str) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response({"error": {"message": message, "type": "rotator_proxy_denied",
                                            "param": None, "code": code}}, status=status)

    @staticmethod
    def _template(route: RouteConfig, sub: str) -> str:
        """The route's path pattern the call matched (never its ids or query): the audit
        trail and the metrics record the pattern, not what the agent put in the path."""
        decoded = unquote(sub)
        return next((p for p in route.paths if fnmatch.fnmatchcase(decoded, p)), "(other)")

    def _record(self, record: CallRecord) -> None:
        if self.on_call is not None:
            try:
                self.on_call(record)
            except Exception:
                log.exception("recording a proxied call failed")

