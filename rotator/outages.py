"""One log line when a vault or provider stops serving, and one when it serves again.

Rotations retry transient errors (a sealed or restarting vault, a 503, a 429) until their
deadline; logging every attempt of every rotation in flight buries the one fact an operator
needs: which dependency is down, since when, and that it came back. The state store's outages
are reported the same way by the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from rotator import redaction

__all__ = ["OutageLog"]

log = logging.getLogger("rotator.outages")


class OutageLog:
    """Tracks which dependencies (``kind`` and ``name``: ``vault 'bao'``) are failing."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._since: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._monotonic = monotonic

    def failed(self, kind: str, name: str, message: str) -> None:
        """A call to the dependency failed transiently: log it if this starts an outage."""
        with self._lock:
            if (kind, name) in self._since:
                return
            self._since[kind, name] = self._monotonic()
        log.error("%s %r is not serving: %s; rotations wait and retry", kind, name,
                  redaction.scrub(message))

    def succeeded(self, kind: str, name: str, started: float | None = None) -> None:
        """A call to the dependency succeeded: log the recovery if it was out. A call that
        ``started`` (monotonic) before the outage began says nothing about its end."""
        with self._lock:
            since = self._since.get((kind, name))
            if since is None or (started is not None and started < since):
                return
            del self._since[kind, name]
        if since is not None:
            log.warning("%s %r is serving again after %.0fs", kind, name,
                        self._monotonic() - since)

    def is_out(self, kind: str, name: str) -> bool:
        with self._lock:
            return (kind, name) in self._since
