"""The daemon's health, as its probes and systemd see it.

``/healthz`` (liveness) asks one thing: is the scheduler still ticking? Only a restart fixes a
stuck scheduler, so nothing else fails it. ``/readyz`` (readiness) asks whether the daemon can do
its job now: the state store reachable, its schema this release's, this host's clock in step
with the database's (leases expire by the workers' clocks), and every vault answering. systemd's
watchdog follows liveness.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from rotator import systemd
from rotator.app import App
from rotator.errors import PermanentError
from rotator.probes import Check, ProbeResult, ReadinessProbe

__all__ = ["DaemonHealth"]

log = logging.getLogger("rotator.daemon")

LIVE_AFTER_POLLS = 3
LIVE_MIN_SECONDS = 60.0
"""``/healthz`` fails when no tick started for this many poll intervals (and this long)."""
SCHEMA_CHECK_SECONDS = 10.0
CLOCK_WARN_SECONDS = 2.0


class DaemonHealth:
    """Liveness from the scheduler's heartbeat; readiness from the store, schema, clock and
    vaults of ``app``'s current generation. ``stopping`` set: not ready."""

    def __init__(self, app: App, clock: Callable[[], datetime],
                 stopping: threading.Event) -> None:
        self.app = app
        self.clock = clock
        self.stopping = stopping
        self._last_tick = time.monotonic()
        self._schema_checked = (0.0, True)
        self._readiness = ReadinessProbe(self._ready_checks, describe=app.store.describe_error)

    def close(self) -> None:
        self._readiness.close()

    def heartbeat(self) -> None:
        """Called at the start of every tick, so at least every ``poll_interval``: the
        scheduler is alive. ``/healthz`` reads it, and systemd's watchdog through it."""
        self._last_tick = time.monotonic()

    def liveness(self) -> ProbeResult:
        """``/healthz``: fails only when the scheduler has stopped ticking (a stuck daemon,
        which a restart fixes), never because a dependency is down."""
        age = time.monotonic() - self._last_tick
        limit = max(LIVE_AFTER_POLLS * self.app.policies.settings.poll_interval.total_seconds(),
                    LIVE_MIN_SECONDS)
        if age > limit:
            return ProbeResult(False, {"scheduler": f"no tick for {age:.0f}s (limit "
                                                    f"{limit:.0f}s): the daemon is stuck"})
        return ProbeResult(True, {"scheduler": "ok"})

    def readiness(self) -> ProbeResult:
        """``/readyz``: the state store (reachable, schema at this release's head, clock in
        step with it) and every vault answer; 503 naming what is not ready otherwise."""
        if self.stopping.is_set():
            return ProbeResult(False, {"daemon": "stopping"})
        return self._readiness()

    def watchdog(self) -> None:
        """systemd's watchdog follows /healthz: the pings stop once the scheduler stops
        ticking, and systemd restarts the daemon."""
        if self.liveness().ok:
            systemd.watchdog()

    def check_clock(self, *, at_start: bool = False) -> None:
        """Leases expire by the workers' clocks: refuse a replica whose clock is off the
        PostgreSQL server's by more than a quarter of ``lock_ttl`` (SQLite shares this host's
        clock: nothing to compare)."""
        before = self.clock()
        server = self.app.store.database_time()
        if server is None:
            return
        skew = (server - (before + (self.clock() - before) / 2)).total_seconds()
        ttl = self.app.policies.settings.lock_ttl.total_seconds()
        if abs(skew) > ttl / 4:
            raise PermanentError(
                f"this host's clock is {skew:+.1f}s off the state database server's; replicas "
                f"must agree within {ttl / 4:.0f}s (a quarter of lock_ttl) for leases to keep "
                "them apart: synchronise the clocks (NTP)")
        if at_start and abs(skew) > CLOCK_WARN_SECONDS:
            log.warning("this host's clock is %+.1fs off the state database server's; keep "
                        "replicas' clocks synchronised (NTP)", skew)

    def schema_ok(self) -> bool:
        """Whether the schema is still this release's (another release's ``rotator db upgrade``
        may have run since start); checked every few seconds, and no new work starts until it
        matches again."""
        checked_at, ok = self._schema_checked
        if time.monotonic() - checked_at < SCHEMA_CHECK_SECONDS:
            return ok
        try:
            self.app.store.require_head()
            ok = True
        except PermanentError as exc:
            if self._schema_checked[1]:
                log.error("starting no new work: %s", exc)
            ok = False
        self._schema_checked = (time.monotonic(), ok)
        return ok

    def _ready_checks(self) -> dict[str, Check]:
        runtime, policies = self.app.runtime, self.app.policies
        checks: dict[str, Check] = {"state_store": self._check_store}
        for name in sorted(policies.vaults):
            checks[f"vaults.{name}"] = lambda name=name: runtime.vault(name).health()
        return checks

    def _check_store(self) -> None:
        self.app.store.require_head()
        self.check_clock()
