"""A sample AI agent that reads its API key from Vault and uses it, as a no-outage probe.

It behaves like the agents rotator serves: every ``period`` seconds it reads its key from a KV v2
secret (as an agent re-reading its secret would) and makes one authenticated call with it
(``GET {base_url}/models``). Counting the calls the provider refused (``rejections``) turns the
SPEC's "no outage" invariant into a number a test or the demo can assert is zero, and
``rejected_at`` says when, to line them up with rotation steps.

It also serves ``GET /healthz`` on a loopback port so the rotator's health check has a real
consumer to ask: 200 while its last call worked, 503 otherwise (or on purpose, through
:meth:`SampleAgent.fail_health`, to exercise rollback). The body names the key id the agent used,
taken from the vault version's custom metadata (``<field>.key_id`` when ``<field>.version``
matches the version read), which lets a check confirm the agent really picked up the new key.

The key itself is never printed, logged or served: it lives in a :class:`~rotator.interfaces.Secret`
for the length of one call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from rotator.interfaces import Secret

if TYPE_CHECKING:
    import hvac

__all__ = ["SampleAgent", "main"]

log = logging.getLogger(__name__)

_CALL_TIMEOUT = 5.0


class SampleAgent:
    """Reads its key from Vault and calls the provider with it in a background thread.

    Counters: ``successes`` (2xx), ``rejections`` (401/403: the key the agent read from the vault
    was refused, which is an outage), ``errors`` (anything else: vault unreachable, connection
    refused, a 5xx). ``start()`` binds the health port and starts polling; ``stop()`` is
    idempotent; the object is also a context manager.
    """

    def __init__(self, vault_url: str, vault_token: str, path: str, field: str,
                 provider_base_url: str, mount: str = "secret", period: float = 0.2,
                 port: int = 0, probe_path: str = "/models") -> None:
        self.vault_url = vault_url
        self.path = path
        self.field = field
        self.mount = mount
        self.period = period
        self.provider_base_url = provider_base_url.rstrip("/")
        self.probe_path = probe_path
        """The authenticated call made with the key (``/key`` for OpenRouter)."""
        self._token = Secret(vault_token)
        self._requested_port = port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._successes = 0
        self._rejections = 0
        self._errors = 0
        self._rejected_at: list[float] = []
        self._last_ok = False
        self._last_key_id: str | None = None
        self._last_error: str | None = None
        self._fail_health = False
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._vault: hvac.Client | None = None
        self._http: httpx.Client | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> SampleAgent:
        """Bind ``/healthz`` and start polling; returns at once (the first call runs in the
        background, and ``/healthz`` answers 503 until it succeeded)."""
        if self._server is not None:
            return self
        import hvac

        self._stop.clear()
        self._vault = hvac.Client(url=self.vault_url, token=self._token.reveal(),
                                  timeout=_CALL_TIMEOUT)
        self._http = httpx.Client(timeout=_CALL_TIMEOUT)
        server = ThreadingHTTPServer(("127.0.0.1", self._requested_port), _HealthHandler)
        server.daemon_threads = True
        server.agent = self  # type: ignore[attr-defined]
        self._server = server
        self._threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                             name=f"sample-agent-health-{self.port}", daemon=True),
            threading.Thread(target=self._poll, name=f"sample-agent-{self.path}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and serving; safe to call twice or before ``start``."""
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=_CALL_TIMEOUT * 2)
        self._threads = []
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._vault is not None:
            self._vault.adapter.close()
            self._vault = None

    def __enter__(self) -> SampleAgent:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- observations ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SampleAgent is not started")
        return int(self._server.server_address[1])

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    @property
    def successes(self) -> int:
        with self._lock:
            return self._successes

    @property
    def rejections(self) -> int:
        with self._lock:
            return self._rejections

    @property
    def errors(self) -> int:
        with self._lock:
            return self._errors

    @property
    def rejected_at(self) -> list[float]:
        """Wall-clock times (``time.time()``) of each rejection; a copy."""
        with self._lock:
            return list(self._rejected_at)

    @property
    def last_key_id(self) -> str | None:
        """Key id of the key used by the last call, if the vault metadata named it."""
        with self._lock:
            return self._last_key_id

    @property
    def last_error(self) -> str | None:
        """Why the last call failed (no secret in it), or None after a success."""
        with self._lock:
            return self._last_error

    def fail_health(self, on: bool) -> None:
        """Make ``/healthz`` answer 503 regardless of the calls, to test the rollback path."""
        with self._lock:
            self._fail_health = on

    def health(self) -> tuple[int, dict[str, Any]]:
        """The ``/healthz`` status code and body."""
        with self._lock:
            ok = self._last_ok and not self._fail_health
            body = {"ok": ok, "key_id": self._last_key_id, "successes": self._successes,
                    "rejections": self._rejections}
        return (200 if ok else 503), body

    # -- the agent's work -----------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._tick()
            except Exception as exc:  # never let the probe die: count it and carry on
                self._record("error", None, f"unexpected {type(exc).__name__}")
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def _tick(self) -> None:
        try:
            key, key_id = self._read_key()
        except Exception as exc:
            # hvac's messages quote Vault's error list, not the secret; keep only the class.
            self._record("error", None, f"vault read failed: {type(exc).__name__}")
            return
        if key is None:
            self._record("error", None, f"field {self.field!r} missing at {self.path!r}")
            return
        http = self._http
        if http is None:
            return
        try:
            response = http.get(f"{self.provider_base_url}{self.probe_path}",
                                headers={"Authorization": f"Bearer {key.reveal()}"})
        except httpx.HTTPError as exc:
            self._record("error", key_id, f"provider call failed: {type(exc).__name__}")
            return
        if response.is_success:
            self._record("success", key_id, None)
        elif response.status_code in (401, 403):
            self._record("rejection", key_id, f"provider refused the key: {response.status_code}")
            log.warning("sample agent %s: key %s refused (%d)", self.path, key_id or "(unknown)",
                        response.status_code)
        else:
            self._record("error", key_id, f"provider answered {response.status_code}")

    def _read_key(self) -> tuple[Secret | None, str | None]:
        """The current value of the field and, if rotator recorded it for this version, its id."""
        vault = self._vault
        if vault is None:
            raise RuntimeError("not started")
        answer = vault.secrets.kv.v2.read_secret_version(
            path=self.path, mount_point=self.mount, raise_on_deleted_version=True)
        data = answer["data"]
        value = (data.get("data") or {}).get(self.field)
        metadata = data.get("metadata") or {}
        custom = metadata.get("custom_metadata") or {}
        key_id: str | None = None
        if str(custom.get(f"{self.field}.version")) == str(metadata.get("version")):
            key_id = custom.get(f"{self.field}.key_id") or None
        if not isinstance(value, str) or not value:
            return None, key_id
        return Secret(value), key_id

    def _record(self, kind: str, key_id: str | None, error: str | None) -> None:
        with self._lock:
            if kind == "success":
                self._successes += 1
                self._last_ok = True
            elif kind == "rejection":
                self._rejections += 1
                self._rejected_at.append(time.time())
                self._last_ok = False
            else:
                self._errors += 1
                self._last_ok = False
            self._last_key_id = key_id
            self._last_error = error


class _HealthHandler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sample agent health: " + format, *args)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/healthz":
            self._send(404, {"error": "not found; try /healthz"})
            return
        agent: SampleAgent = self.server.agent  # type: ignore[attr-defined]
        status, body = agent.health()
        self._send(status, body)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def main(argv: list[str] | None = None) -> int:
    """Run one sample agent until Ctrl-C or SIGTERM, printing a status line every second."""
    parser = argparse.ArgumentParser(
        prog="python -m rotator.testing.agent",
        description="A sample agent that reads its key from Vault KV v2 and calls GET "
                    "{base-url}/models with it. The Vault token comes from $VAULT_TOKEN.")
    parser.add_argument("--vault-url", default=os.environ.get("VAULT_ADDR"),
                        required="VAULT_ADDR" not in os.environ)
    parser.add_argument("--mount", default="secret")
    parser.add_argument("--path", required=True)
    parser.add_argument("--field", required=True)
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--port", type=int, default=0, help="health port (0: any free port)")
    parser.add_argument("--period", type=float, default=0.2)
    args = parser.parse_args(argv)
    token = os.environ.get("VAULT_TOKEN")
    if not token:
        parser.error("set VAULT_TOKEN to a token that can read the secret")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    agent = SampleAgent(args.vault_url, token, args.path, args.field, args.base_url,
                        mount=args.mount, period=args.period, port=args.port)
    with agent:
        print(f"sample agent for {args.mount}/{args.path}#{args.field}: "
              f"health {agent.health_url}", flush=True)
        try:
            while not stopping.wait(1.0):
                status, body = agent.health()
                print(f"{time.strftime('%H:%M:%S')} {'healthy' if status == 200 else 'UNHEALTHY'}"
                      f" successes={agent.successes} rejections={agent.rejections}"
                      f" errors={agent.errors} key_id={body['key_id'] or '-'}"
                      + (f" last_error={agent.last_error}" if agent.last_error else ""),
                      flush=True)
        except KeyboardInterrupt:
            pass
    print(f"stopped: successes={agent.successes} rejections={agent.rejections} "
          f"errors={agent.errors}", flush=True)
    return 1 if agent.rejections else 0


if __name__ == "__main__":
    sys.exit(main())
