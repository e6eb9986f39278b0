"""The credential leases one process holds, kept alive by a heartbeat thread.

A lease row in the store names one owner per process; threads of the process are kept apart
here. A worker asks ``usable`` before each step: a lease whose renewals have been failing may
already have expired in the store and been taken by another replica, so the worker stops at the
step boundary instead of acting on a credential it may no longer own (the store's conditional
step transitions are the backstop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from rotator import redaction
from rotator.state.store import StateStore

__all__ = ["Leases"]

log = logging.getLogger("rotator.leases")


class Leases:
    """Acquire, claim, renew and release the leases of one owner id."""

    def __init__(self, store: StateStore, owner: str, ttl: timedelta,
                 clock: Callable[[], datetime]) -> None:
        self.store, self.owner, self.ttl, self.clock = store, owner, ttl, clock
        self._held: set[str] = set()
        self._releasing: set[str] = set()
        """Given back to this process's bookkeeping, not yet to the store."""
        self._valid_until: dict[str, float] = {}
        """Monotonic time each held lease runs out, counted from before its last write."""
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def acquire(self, name: str) -> str | None:
        """Take the lease ``name``; None on success, else who holds it.

        A second thread asking for a lease this process holds is told it is taken, exactly
        like another process would be.
        """
        with self._lock:
            if name in self._held or name in self._releasing:
                return f"{self.owner} (another thread of this process)"
            self._held.add(name)
        started = time.monotonic()
        try:
            holder = self.store.try_lock(name, self.owner, self.ttl, self.clock())
        except BaseException:
            with self._lock:
                self._held.discard(name)
            raise
        with self._lock:
            if holder is not None:
                self._held.discard(name)
                return holder
            self._took([name], started)
        return None

    def claim_due(self, names: Sequence[str], limit: int,
                  exclude: Iterable[str] = ()) -> list[str]:
        """Claim up to ``limit`` due credentials no one holds (see ``StateStore.claim_due``).

        Holds the in-process lock across the store call, so no thread of this process can
        acquire a name while it is being claimed.
        """
        with self._lock:
            skip = self._held | self._releasing | set(exclude)
            candidates = [n for n in names if n not in skip]
            started = time.monotonic()
            claimed = self.store.claim_due(self.clock(), candidates, limit, self.owner,
                                           self.ttl)
            self._held.update(claimed)
            self._took(claimed, started)
        return claimed

    def _took(self, names: Iterable[str], started: float) -> None:
        """Record fresh leases (``_lock`` held) and make sure the heartbeat runs."""
        for name in names:
            self.lost.discard(name)
            self._valid_until[name] = started + self.ttl.total_seconds()
        if self._thread is None and self._held:
            self._thread = threading.Thread(target=self._beat, name="rotator-leases",
                                            daemon=True)
            self._thread.start()

    def usable(self, name: str) -> bool:
        """Whether a step may start under the lease: held, not lost, and at least a quarter
        of its time-to-live left since the last renewal that reached the store."""
        margin = self.ttl.total_seconds() / 4
        with self._lock:
            return (name in self._held and name not in self.lost
                    and time.monotonic() + margin < self._valid_until.get(name, 0.0))

    def release(self, name: str) -> None:
        """Give the lease back; a no-op when this process does not hold it."""
        with self._lock:
            if name not in self._held:
                return
            self._held.discard(name)
            self._valid_until.pop(name, None)
            self._releasing.add(name)  # the heartbeat neither renews it nor calls it lost
        try:
            self.store.unlock(name, self.owner)
        finally:
            with self._lock:
                self._releasing.discard(name)

    def _beat(self) -> None:
        interval = max(self.ttl.total_seconds() / 3, 0.2)
        while not self._stop.wait(interval):
            with self._lock:
                names = list(self._held)
            if not names:
                continue
            started = time.monotonic()
            try:
                lost = self.store.renew_locks(names, self.owner, self.ttl, self.clock())
            except Exception as exc:  # a store hiccup must not kill the heartbeat
                log.warning("could not renew leases: %s",
                            redaction.scrub(self.store.describe_error(exc)))
                continue
            with self._lock:
                for name in set(names) - lost:
                    if name in self._held:
                        self._valid_until[name] = started + self.ttl.total_seconds()
                # A lease given back while this renewal ran was released, not lost.
                lost &= self._held
                self.lost |= lost
            if lost:
                log.error("lost the lease on %s: another worker took over",
                          ", ".join(sorted(lost)))

    def close(self) -> None:
        """Stop the heartbeat and give back every lease still held (work that was claimed but
        never started, when the daemon stops), so other replicas need not wait them out."""
        self._stop.set()
        for name in sorted(self.held):
            try:
                self.release(name)
            except Exception as exc:  # the store may be gone: the leases then expire
                log.warning("could not release the lease on %s: %s", name,
                            redaction.scrub(self.store.describe_error(exc)))
