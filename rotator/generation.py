"""A generation: one version of the policies and the plugins (``Runtime``) built from them.

A reload makes a new generation; it does not change the one rotations are running with. Each
rotation takes the current generation when it starts and keeps it to its end, so a reload never
swaps a vault client or a provider under a step in flight, and the old generation's plugins
(token-renewal timers, connection pools, HTTP clients) are closed as soon as its last rotation
ends, not leaked.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rotator.config import Policies
    from rotator.runtime import Runtime

__all__ = ["Generation"]

log = logging.getLogger("rotator.generation")


class Generation:
    """Policies and their runtime, with a count of the rotations using them."""

    def __init__(self, policies: Policies, runtime: Runtime, number: int = 1) -> None:
        self.policies = policies
        self.runtime = runtime
        self.number = number
        self._users = 0
        self._retired = False
        self._closed = False
        self._lock = threading.Lock()

    def enter(self) -> None:
        """A rotation starts using this generation (it may be retired already: the rotation
        then holds it open until it ends)."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"generation {self.number} is closed")
            self._users += 1

    def leave(self) -> None:
        """A rotation is done with this generation; the last one out of a retired generation
        closes its plugins."""
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self._close()

    def retire(self) -> None:
        """A newer generation replaced this one: close it now if nothing uses it, else when
        the last rotation using it ends."""
        with self._lock:
            self._retired = True
            close = self._users == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self._close()

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def _close(self) -> None:
        try:
            self.runtime.close()
        except Exception:  # one plugin failing to close must not break the daemon
            log.exception("closing the plugins of policy generation %d failed", self.number)
        log.debug("policy generation %d closed", self.number)
