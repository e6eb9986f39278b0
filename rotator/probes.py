"""Readiness checks for ``/readyz``: each dependency asked at once, with a deadline.

A probe must answer fast (Kubernetes gives it one second by default) even when a vault hangs,
and a burst of probes must not pile up threads on a dependency that is down. So the checks run
on a small pool, each at most once at a time, the answer waits ``timeout`` seconds at most, and
a result is reused for ``cache`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

from rotator import redaction

__all__ = ["Check", "ProbeResult", "ReadinessProbe"]

Check = Callable[[], None]
"""Returns when the dependency is usable; raises with a message that says why not (and holds
no secret)."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    checks: dict[str, str]
    """Check name -> ``ok`` or what is wrong."""

    def as_json(self) -> dict[str, object]:
        return {"status": "ok" if self.ok else "fail", "checks": self.checks}


class ReadinessProbe:
    """Runs the checks ``checks()`` returns (name -> callable) and says whether all passed."""

    def __init__(self, checks: Callable[[], Mapping[str, Check]], *, timeout: float = 3.0,
                 cache: float = 1.0, describe: Callable[[BaseException], str] = str) -> None:
        self._checks = checks
        self.timeout = timeout
        self.cache = cache
        self._describe = describe
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="readyz")
        self._running: dict[str, tuple[Future[None], float]] = {}
        self._lock = threading.Lock()
        self._last: tuple[float, ProbeResult] | None = None

    def __call__(self) -> ProbeResult:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.cache:
                return self._last[1]
            futures = {}
            for name, check in self._checks().items():
                running = self._running.get(name)
                if running is None or running[0].done():
                    running = (self._pool.submit(check), now)
                    self._running[name] = running
                futures[name] = running
            wait_futures([f for f, _ in futures.values()], timeout=self.timeout)
            checks = {name: self._verdict(future, since)
                      for name, (future, since) in futures.items()}
            result = ProbeResult(all(v == "ok" for v in checks.values()), checks)
            self._last = (time.monotonic(), result)
            return result

    def _verdict(self, future: Future[None], since: float) -> str:
        if not future.done():
            return f"no answer after {time.monotonic() - since:.0f}s"
        exc = future.exception()
        if exc is None:
            return "ok"
        return redaction.scrub(self._describe(exc))[:300]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
