"""Running the proxy: ``rotator proxy`` in the foreground, or a :class:`ProxyRunner` in a thread
(tests, benchmarks), and the ``rotator token`` operations."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from rotator.app import App
from rotator.config import Policies
from rotator.errors import PermanentError
from rotator.proxy.http11 import HTTPServer, Incoming, Reply
from rotator.proxy.recorder import CallRecorder
from rotator.proxy.server import ProxyServer
from rotator.proxy.tokens import Claims, SigningKeys, issue_token
from rotator.service import Context

__all__ = ["ProxyRunner", "issue", "revoke"]

log = logging.getLogger("rotator.proxy")

SWITCH_INTERVAL = 0.001
"""Seconds a thread may hold the interpreter while another waits for it."""


class ProxyRunner:
    """The proxy on its own event loop in a thread: ``start()`` returns once it listens
    (``port`` is the bound port; ``listen`` port 0 picks one), ``stop()`` drains and closes."""

    def __init__(self, policies: Policies, listen: str | None = None,
                 metrics_listen: str | None = None, *, app: App | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        if policies.proxy is None:
            raise PermanentError("the policy file has no [proxy] section: add one with its "
                                 "routes (see the README's 'Credential proxy')")
        self.policies = policies
        self._owns_app = app is None
        self.app = app if app is not None else App(policies, actor="proxy")
        self.registry = registry if registry is not None else \
            CollectorRegistry(auto_describe=True)
        self.recorder = CallRecorder(self.app.audit, self.registry)
        self.server = ProxyServer(policies, self.app.runtime, self.app.store,
                                  on_call=self.recorder)
        self.listen = listen or policies.proxy.listen
        host, _, port = self.listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.metrics_listen = metrics_listen
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    def swap(self, policies: Policies) -> None:
        """Serve a reloaded policy file's routes, tokens and limits from the next call on (the
        daemon's reload); a changed ``listen`` needs a restart and is said so."""
        if policies.proxy is None or self._loop is None:
            return
        if policies.proxy.listen != self.listen:
            log.warning("[proxy] listen changed to %s: restart rotator to listen there (the "
                        "proxy keeps %s:%d)", policies.proxy.listen, self.host, self.port)
        fresh = ProxyServer(policies, self.app.runtime, self.app.store, on_call=self.recorder)
        fresh.inherit(self.server)
        asyncio.run_coroutine_threadsafe(fresh.open(), self._loop).result(10)
        old, self.server, self.policies = self.server, fresh, policies
        asyncio.run_coroutine_threadsafe(old.close(), self._loop).result(10)

    def start(self) -> ProxyRunner:
        self._thread = threading.Thread(target=self._main, name="rotator-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise PermanentError(f"the proxy could not start on {self.host}:{self.port}: "
                                 f"{self._error}") from self._error
        return self

    def run_forever(self) -> None:
        """Serve in this thread until SIGTERM/SIGINT (``rotator proxy``)."""
        import signal

        self.start()
        done = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: done.set())
        done.wait()
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(30)
        self.recorder.close()
        if self._owns_app:
            self.app.close(1.0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _main(self) -> None:
        # The audit writer and the vault reads run in other threads of this process: hand the
        # interpreter back to the event loop after 1 ms instead of 5, so a batch being written
        # never stalls the calls under way for long (their p99 halves under load).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        try:
            import uvloop  # the faster event loop where installed (the proxy extra has it)
        except ImportError:
            asyncio.run(self._serve())
        else:
            uvloop.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = HTTPServer(lambda request, reply: self.server.handle(request, reply))
        metrics: HTTPServer | None = None
        try:
            await self.server.open()
            self.port = await server.start(self.host, self.port)
            log.info("proxy listening on http://%s:%d (%d route(s))", self.host, self.port,
                     len(self.server.config.routes))
            if self.metrics_listen:
                metrics = HTTPServer(self._metrics)
                host, _, port = self.metrics_listen.rpartition(":")
                self.metrics_port = await metrics.start(host.strip("[]"), int(port))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await server.stop(0)
            await self.server.close()
            return
        self._ready.set()
        await self._stopped.wait()
        if metrics is not None:
            await metrics.stop(0)
        await server.stop()
        await self.server.close()

    async def _metrics(self, request: Incoming, reply: Reply) -> None:
        if request.path != "/metrics" or request.method not in ("GET", "HEAD"):
            reply.send(404, [(b"Content-Type", b"text/plain")], b"see /metrics")
            return
        reply.send(200, [(b"Content-Type", CONTENT_TYPE_LATEST.encode())],
                   generate_latest(self.registry))


def issue(app: App | Context, agent: str, routes: Sequence[str], ttl: timedelta,
          budget: int | None = None) -> tuple[str, Claims]:
    """A token for ``agent`` on ``routes`` (each a route of ``[proxy.routes]``), audited
    (kind ``token``: agent, routes, expiry, token id; never the token)."""
    proxy = app.policies.proxy
    if proxy is None:
        raise PermanentError("the policy file has no [proxy] section")
    unknown = [r for r in routes if r not in proxy.routes]
    if unknown or not routes:
        raise PermanentError(f"--routes: no route named {', '.join(unknown) or '(none)'} in "
                             f"[proxy.routes] (known: {', '.join(proxy.routes) or 'none'})")
    keys = SigningKeys(app.policies, app.runtime, app.store)
    token, claims = issue_token(keys, agent, routes, ttl, proxy.max_token_ttl, budget)
    app.audit.record("token", actor="operator", detail={
        "action": "issued", "agent": agent, "routes": list(routes),
        "expires_at": claims.expires_at.isoformat(), "token_id": claims.token_id,
        "budget": budget})
    return token, claims


def revoke(app: App | Context, agent: str, reason: str | None = None) -> datetime:
    """Refuse every token of ``agent`` issued until now; audited."""
    at = datetime.now(UTC)
    app.store.revoke_tokens(agent, at, reason)
    app.audit.record("token", actor="operator", reason=reason,
                     detail={"action": "revoked", "agent": agent, "before": at.isoformat()})
    return at
