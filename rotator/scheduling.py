"""The daemon loop: the only module that runs APScheduler.

APScheduler wakes the daemon (a periodic tick, plus a one-shot wake-up at the earliest due time);
the state store decides what is due, so a restart or a second process sees the same schedule.
Rotations run on a bounded worker pool of ``max_concurrent_rotations`` threads.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from rotator.audit import AuditLog
from rotator.config import Policies, load_policies
from rotator.engine import Engine, RotationRequest, RotationResult, utcnow
from rotator.errors import ConfigError, PermanentError
from rotator.log import log_event
from rotator.metrics import Metrics
from rotator.notify import EXIT_WAIT_SECONDS, Notifier
from rotator.runtime import Runtime
from rotator.state.store import StateStore

__all__ = ["Daemon"]

log = logging.getLogger("rotator.daemon")
RELOAD_CHECK_SECONDS = 2.0
ORPHAN_WARNING_SECONDS = 3600.0


class Daemon:
    """``rotator run``: schedules due rotations, resumes interrupted ones, reloads policies."""

    def __init__(self, config_path: Path, policies: Policies, *,
                 clock: Callable[[], datetime] = utcnow,
                 on_engine: Callable[[Engine], None] | None = None) -> None:
        self.config_path = config_path
        self.policies = policies
        self.clock = clock
        self.store = StateStore(policies.settings.state_url)
        self.runtime = Runtime(policies)
        self.engine = Engine(policies, self.runtime, self.store, clock=clock)
        self.metrics = Metrics(self.store, lambda: self.policies)
        self.metrics_url: str | None = None
        self.engine.listeners.append(self.metrics.on_event)
        self.engine.call_observers.append(self.metrics.on_call)
        self.engine.listeners.append(log_event)
        self.audit = AuditLog(self.store)
        self.engine.listeners.append(self.audit.listener("daemon"))
        self.notifier = self._notifier(policies)
        self.engine.listeners.append(lambda event: self.notifier(event))
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
        self._orphans_warned = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.stop("SIGINT"))
        signal.signal(signal.SIGHUP, lambda *_: self._reload_requested.set())

    def run(self) -> None:
        """Block until ``stop``; then wait for the steps in flight and return."""
        self.engine.sync_credentials()
        self.runtime.warm_up(self.policies.credentials)
        self.preflight()
        self._warn_orphans(force=True)
        settings = self.policies.settings
        self.metrics.prime(self.policies)
        try:
            bound = self.metrics.serve(settings.metrics_address)
        except OSError as exc:
            raise PermanentError(
                f"cannot serve /metrics on {settings.metrics_address}: {exc.strerror}; change "
                "metrics_address in [rotator] (port 0 picks a free one)") from exc
        self.metrics_url = f"http://{bound}/metrics"
        log.info("metrics on %s", self.metrics_url)
        log.info("rotator running: %d credential(s), state %s, up to %d at once",
                 len(self.policies.credentials), _safe_url(settings.state_url),
                 settings.max_concurrent_rotations)
        self._resume_interrupted()
        self._scheduler.add_job(self.tick, "interval", id="tick",
                                seconds=settings.poll_interval.total_seconds(),
                                next_run_time=datetime.now(UTC), coalesce=True, max_instances=1)
        self._scheduler.add_job(self._check_reload, "interval", id="reload",
                                seconds=RELOAD_CHECK_SECONDS, coalesce=True, max_instances=1)
        self._scheduler.start()
        try:
            while not self.stopping.wait(0.5):
                pass
        finally:
            self._shutdown()

    def stop(self, why: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping after the steps in flight", why)
        self.engine.stop_event.set()
        self.stopping.set()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for the rotations in flight (tests and the demo use it)."""
        with self._lock:
            futures = list(self._in_flight.values())
        concurrent.futures.wait(futures, timeout=timeout)

    def _shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._workers.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        self.engine.close()
        self.notifier.close(EXIT_WAIT_SECONDS)
        self.runtime.close()
        self.store.close()
        log.info("rotator stopped")

    # -- the work ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Resume stuck rotations, revoke old keys whose grace is over, start due rotations.

        Only hands work to the pool, so a slow provider never holds up the schedule; one tick
        at a time (the periodic job, the wake-up and a reload may fire together).
        """
        if self.stopping.is_set() or not self._tick_lock.acquire(blocking=False):
            return
        try:
            self._resume_interrupted()
            for name in self.engine.credentials_with_due_revocations():
                self._submit(name, lambda name=name: self.engine.revoke_due(name))
            self._start_due()
            self._schedule_wakeup()
            self._warn_orphans()
        except Exception:
            log.exception("scheduler tick failed; retrying at the next tick")
        finally:
            self._tick_lock.release()

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
        running (a vault may come up later) but an operator reading the log knows why."""
        from rotator.service import online_check

        for problem in online_check(self.policies, self.runtime):
            log.error("cannot work with %s; rotations needing it will fail until this is "
                      "fixed", problem)

    def _resume_interrupted(self) -> None:
        for rotation in self.store.unfinished_rotations():
            self._submit(rotation.credential, lambda name=rotation.credential:
                         self.engine.resume(name))

    def _start_due(self) -> None:
        now = self.clock()
        names = [c.name for c in self.policies.credentials]
        with self._lock:
            busy = {n for n, f in self._in_flight.items() if not f.done()}
        free = self.policies.settings.max_concurrent_rotations - len(busy)
        for name in self.store.due_credentials(now, names, free + len(busy)):
            if name in busy or free <= 0:
                continue
            cred = self.policies.credential(name)
            if cred.window is not None and not cred.window.contains(now):
                self.store.update_credential(name, next_due_at=cred.window.next_open(now),
                                             due_reason="outside_window")
                continue
            self._submit(name, lambda name=name: self.engine.rotate(
                RotationRequest(credential=name, trigger="schedule")))
            free -= 1

    def _submit(self, name: str, work: Callable[[], Any]) -> None:
        with self._lock:
            running = self._in_flight.get(name)
            if running is not None and not running.done():
                return
            if self.stopping.is_set():
                return
            self._in_flight[name] = self._workers.submit(self._guard, name, work)

    def _guard(self, name: str, work: Callable[[], Any]) -> None:
        try:
            result = work()
            if isinstance(result, RotationResult) and not result.ok \
                    and result.outcome != "skipped":
                log.warning("%s: %s: %s", name, result.outcome, result.message)
        except Exception:
            log.exception("%s: rotation crashed; it resumes from its last step", name)

    def _schedule_wakeup(self) -> None:
        names = [c.name for c in self.policies.credentials]
        earliest = self.store.earliest_due(names)
        poll = self.policies.settings.poll_interval
        if earliest is None or earliest > self.clock() + poll:
            return
        when = max(earliest, self.clock()) + timedelta(milliseconds=50)
        self._scheduler.add_job(self.tick, "date", id="wakeup", run_date=when,
                                replace_existing=True)

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
            self.reload()

    def reload(self) -> bool:
        """Load the policy file again; an invalid file keeps the running policies."""
        try:
            policies = load_policies(self.config_path)
        except ConfigError as exc:
            log.error("policy reload rejected, keeping the running policies: %d problem(s)",
                      len(exc.problems))
            for problem in exc.problems:
                log.error("  %s", problem)
            self._audit_reload({"outcome": "rejected", "problems": len(exc.problems)})
            return False
        if policies.settings.state_url != self.policies.settings.state_url:
            log.warning("state_url changed in the policy file: restart rotator to use it")
        if policies.notify != self.policies.notify:
            old, self.notifier = self.notifier, self._notifier(policies)
            old.shutdown(EXIT_WAIT_SECONDS)  # delivers what it holds, in the background
        self.policies = policies
        self.runtime = Runtime(policies)
        self.engine.policies = policies
        self.runtime.warm_up(policies.credentials)
        self.engine.runtime = self.runtime
        self.engine.sync_credentials()
        self.metrics.prime(policies)
        log.info("policies reloaded: %d credential(s)", len(policies.credentials))
        self._audit_reload({"outcome": "applied", "credentials": len(policies.credentials)})
        self._warn_orphans(force=True)
        self.tick()
        return True

    def _notifier(self, policies: Policies) -> Notifier:
        # Secret references are read through the current runtime, which a reload replaces.
        return Notifier(policies.notify, lambda ref: self.runtime.resolve_secret(ref),
                        on_delivery=self.metrics.on_notification)

    def _audit_reload(self, detail: dict[str, Any]) -> None:
        # Problem texts stay in the log: they quote the policy file, which may hold anything.
        try:
            self.audit.record("reload", actor="daemon",
                              detail={"config": str(self.config_path), **detail})
        except Exception:
            log.exception("could not write the policy reload to the audit trail")


def _safe_url(url: str) -> str:
    """The state URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
