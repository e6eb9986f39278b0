"""The App: what the daemon and every one-shot command build, once, the same way.

It owns the state store, the engine (and through it the current policy *generation*: the
policies and the plugins built from them), the audit trail and the notifier. The daemon adds
its metrics, probes and scheduler around one App; ``rotate-now``, ``status`` and the other
commands use one App for the length of the command. A reload is ``App.reload``: a new
generation for new work, the old one closed once the rotations using it end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rotator.audit import AuditLog
from rotator.config import Policies, load_policies
from rotator.engine import Engine, utcnow
from rotator.errors import ConfigError
from rotator.generation import Generation
from rotator.notify import EXIT_WAIT_SECONDS, Notifier
from rotator.runtime import Runtime
from rotator.state.store import StateStore

__all__ = ["App"]

log = logging.getLogger("rotator.app")


class App:
    """The store, engine, audit trail and notifier for one set of policies.

    ``actor`` names who acts in the audit trail (``daemon`` or the user running a command);
    ``owner`` is the lease owner id (a command's says so); ``create=False`` refuses to create a
    missing store (read-only commands); ``pool_size`` sizes a PostgreSQL pool for that many
    workers. Close it with ``close``.
    """

    def __init__(self, policies: Policies, *, actor: str, clock: Callable[[], datetime] = utcnow,
                 owner: str | None = None, create: bool = True,
                 pool_size: int | None = None) -> None:
        self.store = StateStore(policies.settings.state_url, create=create, pool_size=pool_size)
        try:
            self.engine = Engine(policies, Runtime(policies), self.store, clock=clock,
                                 owner=owner)
            self.audit = AuditLog(self.store)
            self.engine.listeners.append(self.audit.listener(actor))
            self.notifier = self._notifier(policies)
            # Through the attribute: a reload may replace the notifier.
            self.engine.listeners.append(lambda event: self.notifier(event))
        except BaseException:
            self.store.close()
            raise

    @property
    def policies(self) -> Policies:
        """The current generation's policies (what new work starts with)."""
        return self.engine.policies

    @property
    def runtime(self) -> Runtime:
        """The current generation's plugins."""
        return self.engine.runtime

    def reload(self, policies: Policies) -> Generation:
        """Make ``policies`` the new generation: plugins built and warmed up first, the
        notifier replaced if its targets changed (the old one delivers what it holds), the old
        generation closed once the rotations using it end."""
        runtime = Runtime(policies)
        runtime.warm_up(policies.credentials)
        if policies.notify != self.policies.notify:
            old, self.notifier = self.notifier, self._notifier(policies, self.notifier)
            old.shutdown(EXIT_WAIT_SECONDS)  # delivers what it holds, in the background
        return self.engine.use(policies, runtime)

    def reload_file(self, path: Path) -> Generation | None:
        """Load the policy file at ``path`` again and make it the new generation, with the
        store told of new credentials and due times; an invalid file keeps the running
        policies (None). Either way the audit trail records the reload and the log says why."""
        try:
            policies = load_policies(path)
        except ConfigError as exc:
            log.error("policy reload rejected, keeping the running policies: %d problem(s)",
                      len(exc.problems))
            for problem in exc.problems:
                log.error("  %s", problem)
            self._audit_reload(path, {"outcome": "rejected", "problems": len(exc.problems)})
            return None
        if policies.settings.state_url != self.policies.settings.state_url:
            log.warning("state_url changed in the policy file: restart rotator to use it")
        generation = self.reload(policies)
        log.debug("policy generation %d in use", generation.number)
        self.engine.sync_credentials()
        log.info("policies reloaded: %d credential(s)", len(policies.credentials))
        self._audit_reload(path, {"outcome": "applied", "credentials": len(policies.credentials)})
        return generation

    def _audit_reload(self, path: Path, detail: dict[str, Any]) -> None:
        # Problem texts stay in the log: they quote the policy file, which may hold anything.
        try:
            self.audit.record("reload", actor="daemon", detail={"config": str(path), **detail})
        except Exception:
            log.exception("could not write the policy reload to the audit trail")

    def close(self, notify_wait: float) -> None:
        """Give back leases, let queued notifications go out for up to ``notify_wait``
        seconds, close the plugins and the store."""
        self.engine.close()
        self.notifier.close(notify_wait)
        self.runtime.close()
        self.store.close()

    def _notifier(self, policies: Policies, previous: Notifier | None = None) -> Notifier:
        # Secret references are read through the current generation's plugins.
        return Notifier(policies.notify, lambda ref: self.runtime.resolve_secret(ref),
                        on_delivery=previous.on_delivery if previous else None)

