"""The daemon loop: the only module that runs APScheduler.

APScheduler wakes the daemon (a periodic tick, and a one-shot wake-up at the earliest due time);
a worker that frees up asks for a tick too. The state store decides what is due, so a restart
or another replica sees the same schedule. Each tick *claims* due credentials in the store (row
locks with SKIP LOCKED plus leases), so any number of replicas on PostgreSQL share the work and
each due rotation runs once; rotations whose worker died are taken over once their lease
expires. Rotations run on a bounded worker pool of ``max_concurrent_rotations`` threads.

What is not scheduling lives beside it: the App (``rotator.app``) holds the store, engine and
policy generation and reloads the file; ``rotator.daemon_health`` answers the probes.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from apscheduler.schedulers.background import BackgroundScheduler

from rotator import systemd
from rotator.app import App
from rotator.config import Policies
from rotator.daemon_health import DaemonHealth
from rotator.engine import Engine, RotationRequest, RotationResult, utcnow
from rotator.errors import PermanentError
from rotator.log import log_event
from rotator.memory import release_freed_memory, settle_allocator
from rotator.metrics import Metrics
from rotator.monitor.poller import UsageMonitor
from rotator.notify import EXIT_WAIT_SECONDS, Notifier
from rotator.runtime import Runtime
from rotator.state.daemon_lock import DaemonLock
from rotator.state.urls import safe_url

__all__ = ["Daemon"]

if TYPE_CHECKING:
    from rotator.proxy.runner import ProxyRunner

log = logging.getLogger("rotator.daemon")
T = TypeVar("T")
RELOAD_CHECK_SECONDS = 2.0
ORPHAN_WARNING_SECONDS = 3600.0
MIN_WAKEUP_SECONDS = 0.25
"""Due work that could not be claimed (all taken, or claimed by others an instant ago) is looked
at again this soon, not in a tight loop."""
TICK_COALESCE_SECONDS = 0.02
USAGE_CHECK_SECONDS = 15.0
TOKEN_CHECK_SECONDS = 30.0
"""How often the daemon looks for a [proxy.agents] token due for renewal."""
"""How often the daemon looks for a provider whose usage poll is due."""
STORE_RETRY_MAX_SECONDS = 10.0
"""Longest pause between tries while the state store is away at start."""


class Daemon:
    """``rotator run``: schedules due rotations, resumes interrupted ones, reloads policies."""

    def __init__(self, config_path: Path, policies: Policies, *,
                 clock: Callable[[], datetime] = utcnow,
                 on_engine: Callable[[Engine], None] | None = None) -> None:
        self.config_path = config_path
        self.clock = clock
        settings = policies.settings
        # Before the store opens (and, on SQLite, upgrades itself): a second daemon on the same
        # SQLite file is refused before it touches anything.
        self._daemon_lock = DaemonLock.acquire(settings.state_url)
        try:
            self.app = App(policies, actor="daemon", clock=clock,
                           pool_size=settings.max_concurrent_rotations + 4)
        except BaseException:
            if self._daemon_lock is not None:
                self._daemon_lock.release()
            raise
        self.store, self.engine, self.audit = self.app.store, self.app.engine, self.app.audit
        self.metrics = Metrics(self.store, lambda: self.policies,
                               due=self.engine.due_decisions)
        self.metrics_url: str | None = None
        self.proxy: ProxyRunner | None = None
        """The credential proxy when it runs in the daemon (``[proxy] in_daemon``)."""
        self.engine.listeners.append(self.metrics.on_event)
        self.engine.call_observers.append(self.metrics.on_call)
        self.engine.listeners.append(log_event)
        self.app.notifier.on_delivery = self.metrics.on_notification
        if on_engine is not None:
            on_engine(self.engine)
        self.stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._mtime = self._file_mtime()
        self._in_flight: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(policies.settings.max_concurrent_rotations,
                                           thread_name_prefix="rotation")
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self._tick_lock = threading.Lock()
        self._tick_wanted = threading.Event()
        self._tick_requested = threading.Event()
        self._orphans_warned = 0.0
        self._bad_vaults: set[str] = set()
        """Vaults that failed ``preflight``: their credentials' reads are not tried."""
        self.health = DaemonHealth(self.app, clock, self.stopping)
        self._store_down_since: float | None = None  # monotonic time the store was lost
        self.metrics.live = self.health.liveness
        self.metrics.ready = self.health.readiness
        self.monitor = UsageMonitor(
            self.app, clock, run_action=self._run_misuse_action,
            listeners=[self.metrics.on_misuse], on_usage=self.metrics.on_usage,
            on_poll=lambda provider, outcome: self.metrics.usage_polls.labels(
                provider, outcome).inc(),
            wake=self._request_tick)

    @property
    def policies(self) -> Policies:
        """The current policy generation's policies (a reload replaces them)."""
        return self.app.policies

    @property
    def runtime(self) -> Runtime:
        """The plugins of the current policy generation (a reload replaces them)."""
        return self.app.runtime

    @property
    def notifier(self) -> Notifier:
        return self.app.notifier

    # -- lifecycle -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.stop("SIGINT"))
        signal.signal(signal.SIGHUP, lambda *_: self._reload_requested.set())

    def run(self) -> None:
        """Block until ``stop``; then wait for the steps in flight and return."""
        settings = self.policies.settings
        if not self._while_store_away(self._start_up):
            self._shutdown()
            return
        try:
            bound = self.metrics.serve(settings.metrics_address)
        except OSError as exc:
            raise PermanentError(
                f"cannot serve /metrics on {settings.metrics_address}: {exc.strerror}; change "
                "metrics_address in [rotator] (port 0 picks a free one)") from exc
        self.metrics_url = f"http://{bound}/metrics"
        log.info("metrics on %s", self.metrics_url)
        self._start_proxy()
        log.info("rotator running: %d credential(s), state %s, up to %d at once",
                 len(self.policies.credentials), safe_url(settings.state_url),
                 settings.max_concurrent_rotations)
        if not self._while_store_away(self._resume_interrupted):
            self._shutdown()
            return
        self._scheduler.add_job(self._request_tick, "interval", id="tick",
                                seconds=settings.poll_interval.total_seconds(),
                                next_run_time=datetime.now(UTC), coalesce=True, max_instances=1)
        self._scheduler.add_job(self._check_reload, "interval", id="reload",
                                seconds=RELOAD_CHECK_SECONDS, coalesce=True, max_instances=1)
        usage_every = settings.usage_poll_interval.total_seconds()
        if usage_every > 0:
            self._scheduler.add_job(self._poll_usage, "interval", id="usage",
                                    seconds=max(1.0, min(usage_every, USAGE_CHECK_SECONDS)),
                                    next_run_time=datetime.now(UTC), coalesce=True,
                                    max_instances=1)
        if self.policies.proxy is not None and self.policies.proxy.agents:
            self._scheduler.add_job(self._renew_tokens, "interval", id="tokens",
                                    seconds=TOKEN_CHECK_SECONDS,
                                    next_run_time=datetime.now(UTC), coalesce=True,
                                    max_instances=1)
        watchdog_seconds = systemd.watchdog_interval()
        if watchdog_seconds is not None:
            self._scheduler.add_job(self.health.watchdog, "interval", id="watchdog",
                                    seconds=watchdog_seconds, next_run_time=datetime.now(UTC),
                                    coalesce=True, max_instances=1)
        self._scheduler.start()
        _freeze_heap()
        self._announce_ready()
        threading.Thread(target=self.check_credential_reads, name="preflight-reads",
                         daemon=True).start()
        try:
            # Ticks run here, one at a time, whoever asked for them (the periodic job, a
            # wake-up at a due time, a worker that just freed up).
            while not self.stopping.is_set():
                if self._tick_requested.wait(0.5):
                    # Workers finishing together ask together: one tick serves them all.
                    self.stopping.wait(TICK_COALESCE_SECONDS)
                    self._tick_requested.clear()
                    self.tick()
        finally:
            self._shutdown()

    def _start_up(self) -> None:
        self.health.check_clock(at_start=True)
        self.engine.sync_credentials()
        self.runtime.warm_up(self.policies.credentials)
        self.preflight()
        self._warn_orphans(force=True)
        self.metrics.prime(self.policies)

    def _while_store_away(self, step: Callable[[], None]) -> bool:
        """Run ``step`` (part of starting up), again while the state store is unreachable (a
        PostgreSQL restart right as this replica starts); any other error, or a store away
        longer than ``store_wait_at_start``, ends the daemon as before. False: a stop was
        asked while waiting."""
        def away(exc: Exception) -> str | None:
            if not self.store.is_unreachable(exc):
                return None
            return f"state store unreachable while starting ({self.store.describe_error(exc)})"

        def attempt() -> bool:
            step()
            return True

        return _retry_while_store_away(attempt, away, self.policies, self.stopping.wait) is True

    def stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping after the steps in flight", why)
            systemd.stopping(f"{why}: stopping after the steps in flight")
        self.engine.stop_event.set()
        self.stopping.set()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the rotations in flight (tests and the demo use it)."""
        with self._lock:
            futures = list(self._in_flight.values())
        concurrent.futures.wait(futures, timeout=timeout)

    def _start_proxy(self) -> None:
        """Serve the credential proxy too when ``[proxy]`` is configured (and not moved to
        its own ``rotator proxy`` processes with ``in_daemon = false``)."""
        proxy = self.policies.proxy
        if proxy is None or not proxy.in_daemon or not proxy.routes:
            return
        from rotator.proxy.runner import ProxyRunner

        self.proxy = ProxyRunner(self.policies, app=self.app, registry=self.metrics.registry)
        try:
            self.proxy.start()
        except PermanentError as exc:
            self.proxy = None
            raise PermanentError(f"{exc}; change listen in [proxy] (port 0 picks a free one), "
                                 "or set in_daemon = false there to run it as `rotator "
                                 "proxy`") from exc

    def _shutdown(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()  # drains the calls under way and writes their audit events
            self.proxy = None
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._workers.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        self.health.close()
        # Gives back leases of work claimed but never started, then closes the plugins.
        self.app.close(EXIT_WAIT_SECONDS)
        if self._daemon_lock is not None:
            self._daemon_lock.release()
        log.info("rotator stopped")

    # -- lifecycle hooks and probes ------------------------------------------------------------

    def _announce_ready(self) -> None:
        """The daemon serves: /metrics bound, interrupted work resumed, the scheduler running;
        systemd (``Type=notify``) hears READY=1 now."""
        log.info("rotator ready")
        systemd.ready(f"running: {len(self.policies.credentials)} credential(s)")

    # -- the work ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Resume stuck rotations, revoke old keys whose grace is over, start due rotations.

        Only hands work to the pool, so a slow provider never holds up the schedule; one tick
        at a time (the periodic job, the wake-up and a reload may fire together).
        """
        self._tick_wanted.set()
        while self._tick_wanted.is_set() and not self.stopping.is_set():
            if not self._tick_lock.acquire(blocking=False):
                return  # the tick running now sees the request when it finishes
            try:
                while self._tick_wanted.is_set() and not self.stopping.is_set():
                    self._tick_wanted.clear()
                    self._tick_once()
            finally:
                self._tick_lock.release()

    def _tick_once(self) -> None:
        try:
            self.health.heartbeat()
            if not self.health.schema_ok():
                return
            if len(self._busy()) >= self.policies.settings.max_concurrent_rotations:
                return  # nothing could start; the next worker to finish asks for a tick
            self._resume_interrupted()
            for name in self.engine.credentials_with_due_revocations():
                self._submit(name, lambda name=name: self.engine.revoke_due(name))
            self._start_due()
            self._schedule_wakeup()
            self._warn_orphans()
            if self._store_down_since is not None:
                log.warning("state store reachable again after %.0fs; carrying on",
                            time.monotonic() - self._store_down_since)
                self._store_down_since = None
        except Exception as exc:
            if not self.store.is_unreachable(exc):
                log.exception("scheduler tick failed; retrying at the next tick")
            elif self._store_down_since is None:  # once per outage, and no traceback
                self._store_down_since = time.monotonic()
                log.error("state store unavailable: %s; nothing starts until it is back "
                          "(rotations in flight stop at their next step and resume then)",
                          self.store.describe_error(exc))

    def _poll_usage(self) -> None:
        """Poll the providers whose usage poll is due (each under its lease: one replica)."""
        if self.stopping.is_set() or not self.health.schema_ok():
            return
        try:
            self.monitor.poll_due()
        except Exception as exc:
            if self.store.is_unreachable(exc):
                log.warning("usage poll skipped: state store unavailable (%s)",
                            self.store.describe_error(exc))
            else:
                log.exception("usage poll failed; trying again at the next one")

    def _renew_tokens(self) -> None:
        """Keep the ``[proxy.agents]`` tokens in their vault paths fresh."""
        if self.stopping.is_set():
            return
        from rotator.proxy.agent_tokens import TokenKeeper

        try:
            TokenKeeper(self.policies, self.runtime, self.store, self.audit,
                        self.engine.owner, self.clock).renew_due()
        except Exception:
            log.exception("renewing proxy tokens failed; trying again shortly")

    def _run_misuse_action(self, name: str, work: Callable[[], Any]) -> None:
        """A misuse rule's ``revoke`` on the worker pool. Not through ``_submit``: a rotation
        of the same credential in flight must not swallow it; it waits for the lease."""
        if not self.stopping.is_set():
            self._workers.submit(self._guard, name, work)

    def _request_tick(self) -> None:
        """Ask the daemon's loop for a tick (from APScheduler's jobs and finished workers)."""
        self._tick_requested.set()

    def _warn_orphans(self, force: bool = False) -> None:
        """Say, at start, on reload and hourly, what rotator can no longer finish itself."""
        now = time.monotonic()
        if not force and now - self._orphans_warned < ORPHAN_WARNING_SECONDS:
            return
        self._orphans_warned = now
        for line in self.engine.orphaned_work():
            log.error("%s, but the credential is no longer in %s: put its [[credentials]] "
                      "back so rotator can finish, or do it by hand", line, self.config_path)

    def preflight(self) -> None:
        """Log, loudly, every vault and provider the daemon cannot use right now. It keeps
        running (a vault may come up later) but an operator reading the log knows why.

        Only the calls that do not grow with the fleet happen here, before the daemon is
        ready; each credential's own read (one vault call each: 10,000 of them took ~9 s) is
        ``check_credential_reads``, run after ready."""
        from rotator.policy_lint import policy_warnings
        from rotator.service import notifier_check, plugin_check

        for warning in policy_warnings(self.policies):
            log.warning("questionable policy (rotator check --strict refuses it): %s", warning)
        self._bad_vaults = set()
        problems = plugin_check(self.policies, self.runtime, self._bad_vaults)
        for problem in problems + notifier_check(self.policies, self.runtime):
            self._log_unusable(problem)

    def check_credential_reads(self) -> None:
        """The rest of ``preflight``: read each credential's secret once and log those the
        daemon cannot read (vaults that failed ``preflight`` skipped); stops with the daemon."""
        from rotator.service import credential_read_check

        policies, runtime = self.policies, self.runtime
        try:
            for problem in credential_read_check(policies, runtime, self._bad_vaults,
                                                 self.stopping.is_set):
                self._log_unusable(problem)
        except Exception as exc:  # a check must never take the daemon down
            if not self.stopping.is_set():  # (a stop closes the plugins under it)
                log.warning("could not finish checking that each credential's secret can be "
                            "read (%s)", type(exc).__name__)

    @staticmethod
    def _log_unusable(problem: str) -> None:
        log.error("cannot work with %s; rotations needing it will fail until this is fixed",
                  problem)

    def _resume_interrupted(self) -> None:
        """Take over rotations no worker holds (this daemon's before a restart, or those of a
        replica that stopped or died); each resumes from its last recorded step."""
        for name in self.engine.resumable():
            self._submit(name, lambda name=name: self.engine.resume(name))

    def _start_due(self) -> None:
        """Claim as many due credentials as there are free workers, and start them."""
        names = [c.name for c in self.policies.credentials]
        busy = self._busy()
        free = self.policies.settings.max_concurrent_rotations - len(busy)
        if free <= 0:
            return
        for name in self.engine.claim_due(names, free, busy):
            # The store's due time picked it; the due gate decides (a window may be closed).
            decision = self.engine.due_decision(name)
            if not decision.due:
                try:
                    self.store.update_credential(name, next_due_at=decision.due_at,
                                                 due_reason=decision.reason)
                finally:
                    self.engine.release(name)
                continue
            if not self._submit(name, lambda name=name: self.engine.rotate(
                    RotationRequest(credential=name, trigger="schedule"), claimed=True)):
                self.engine.release(name)

    def _busy(self) -> set[str]:
        """Credentials with work in flight (running or queued) in this process."""
        with self._lock:
            return {n for n, f in self._in_flight.items() if not f.done()}

    def _submit(self, name: str, work: Callable[[], Any]) -> bool:
        """Hand ``work`` to the pool unless ``name`` is already in flight; True if handed."""
        with self._lock:
            running = self._in_flight.get(name)
            if running is not None and not running.done():
                return False
            if self.stopping.is_set():
                return False
            future = self._workers.submit(self._guard, name, work)
            self._in_flight[name] = future
        # Once the worker is free (the future done, so the tick counts its slot free), tick:
        # due work queued behind it need not wait for the next poll.
        future.add_done_callback(lambda _f: self._request_tick())
        return True

    def _guard(self, name: str, work: Callable[[], Any]) -> None:
        try:
            result = work()
            if isinstance(result, RotationResult) and not result.ok \
                    and result.outcome != "skipped":
                log.warning("%s: %s: %s", name, result.outcome, result.message)
        except Exception as exc:
            if self.store.is_unreachable(exc):
                log.error("%s: rotation stopped, the state store is unavailable (%s); it "
                          "resumes from its last step once the store is back", name,
                          self.store.describe_error(exc))
            else:
                log.exception("%s: rotation crashed; it resumes from its last step", name)

    def _schedule_wakeup(self) -> None:
        """A one-shot tick at the earliest due time no worker holds, if before the next
        periodic tick (and no sooner than ``MIN_WAKEUP_SECONDS`` from now)."""
        names = [c.name for c in self.policies.credentials]
        now = self.clock()
        earliest = self.store.earliest_due(names, unleased_at=now)
        poll = self.policies.settings.poll_interval
        if earliest is None or earliest > now + poll:
            return
        delay = max((earliest - now).total_seconds(), MIN_WAKEUP_SECONDS) + 0.05
        self._scheduler.add_job(self._request_tick, "date", id="wakeup", replace_existing=True,
                                run_date=datetime.now(UTC) + timedelta(seconds=delay))

    # -- reload --------------------------------------------------------------------------------

    def _file_mtime(self) -> tuple[int, int] | None:
        try:
            st = self.config_path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _check_reload(self) -> None:
        mtime = self._file_mtime()
        if self._reload_requested.is_set() or mtime != self._mtime:
            self._reload_requested.clear()
            self._mtime = mtime
            systemd.reloading()
            try:
                self.reload()
            finally:
                systemd.ready(f"running: {len(self.policies.credentials)} credential(s)")

    def reload(self) -> bool:
        """Load the policy file again; an invalid file keeps the running policies."""
        generation = self.app.reload_file(self.config_path)
        if generation is None:
            return False
        self.metrics.prime(generation.policies)
        if self.proxy is not None:
            self.proxy.swap(generation.policies)
        _freeze_heap()
        self._warn_orphans(force=True)
        self.tick()
        return True


def _freeze_heap() -> None:
    """Move what start-up (or a reload) built, policies and plugins, out of the cyclic
    garbage collector's view. They live as long as their generation, and at 10,000
    credentials the collector walking them again and again took half of the due gate's time
    on each scrape. Objects frozen are still freed by reference counting. The allocator is
    told to give large blocks back when freed (``rotator.memory``)."""
    gc.collect()
    gc.freeze()
    settle_allocator()
    release_freed_memory()


_AWAY = ("connection refused", "could not connect", "timeout expired", "timed out",
         "the database system is starting up", "the database system is shutting down",
         "the database system is in recovery mode", "server closed the connection",
         "no route to host", "network is unreachable", "temporary failure in name resolution")
"""How a database that is away (not wrong) answers a connection: only these are waited for;
a missing database, a refused password or a bad URL fail at once."""


def open_daemon(config_path: Path, policies: Policies, stop_asked: Callable[[], bool]
                ) -> Daemon | None:
    """A ``Daemon``, once its database state store answers: a replica started while
    PostgreSQL restarts waits for it instead of exiting into a restart loop. A store that is
    wrong rather than away (a bad URL, a refused password, a missing database, SQLite) fails
    at once. None if a stop was asked meanwhile."""
    from rotator.state.store import StateStore
    from rotator.state.urls import backend

    def away(exc: Exception) -> str | None:
        if (isinstance(exc, PermanentError) and backend(policies.settings.state_url) != "sqlite"
                and exc.__cause__ is not None and StateStore.is_unreachable(exc.__cause__)
                and any(m in str(exc).lower() for m in _AWAY)):
            return str(exc)
        return None

    def pause(seconds: float) -> bool:
        for _ in range(int(seconds * 10)):
            if stop_asked():
                return True
            time.sleep(0.1)
        return stop_asked()

    return _retry_while_store_away(lambda: Daemon(config_path, policies), away, policies, pause)


def _retry_while_store_away(attempt: Callable[[], T], away: Callable[[Exception], str | None],
                            policies: Policies, pause: Callable[[float], bool]) -> T | None:
    """``attempt()``, tried again while ``away`` says its error is the state store being
    unreachable (it returns what to log), backing off from 1 s to 10 s for up to
    ``store_wait_at_start``; any other error, or a longer absence, is raised. ``pause(s)``
    waits and says whether a stop was asked: then None."""
    deadline = time.monotonic() + policies.settings.store_wait_at_start.total_seconds()
    delay = 1.0
    while True:
        try:
            return attempt()
        except Exception as exc:
            why = away(exc)
            if why is None or time.monotonic() + delay > deadline:
                raise
            log.warning("%s; waiting for it (next try in %.0f s)", why, delay)
        if pause(delay):
            return None
        delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)
