"""The credential leases one process holds, kept alive by a heartbeat thread, and the fence
every plugin call of a rotation passes.

A lease row in the store names one owner per process; threads of the process are kept apart
here. Each acquisition gets an *epoch* from the store that only grows, so the owner of a later
acquisition can always be told from an earlier one.

A worker asks ``usable`` before each step, and ``check`` (through a :class:`Fence`) right before
every provider or vault call: a lease whose renewals have been failing, or whose process was
paused past its expiry, may already belong to another replica, so the worker stops instead of
acting on a credential it no longer owns. The local check counts the lease's life from before
its last renewal reached the store, on both the monotonic clock (a pause, a wall-clock jump) and
the engine's clock (the one the store's expiry is written in); ``confirm`` also asks the store,
which catches a replica whose clock runs ahead of this one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from rotator import redaction
from rotator.errors import Interrupted
from rotator.state.store import StateStore

__all__ = ["Fence", "LeaseLost", "Leases"]

log = logging.getLogger("rotator.leases")

FENCE_MARGIN = 0.05
"""Share of ``lock_ttl`` a plugin call needs left on the lease to be sent (skew allowance)."""


class LeaseLost(Interrupted):
    """This process no longer holds the credential's lease (or cannot tell that it does): the
    rotation must stop where it is; its new owner, or a later run, resumes it."""


@dataclass
class _Held:
    epoch: int
    valid_until: float
    """Monotonic time the lease runs out, counted from before its last write."""
    expires_at: datetime
    """The same, on the engine's clock (what the store holds, give or take the write)."""


class Leases:
    """Acquire, claim, renew, release and fence the leases of one owner id."""

    def __init__(self, store: StateStore, owner: str, ttl: timedelta,
                 clock: Callable[[], datetime]) -> None:
        self.store, self.owner, self.ttl, self.clock = store, owner, ttl, clock
        self._held: dict[str, _Held] = {}
        """Leases the store has granted this process (and the heartbeat renews)."""
        self._busy: set[str] = set()
        """Names being acquired or given back by a thread of this process right now."""
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> set[str]:
        with self._lock:
            return set(self._held)

    def epoch(self, name: str) -> int | None:
        """The epoch of this process's lease on ``name``, or None if it holds none."""
        with self._lock:
            held = self._held.get(name)
            return held.epoch if held else None

    def acquire(self, name: str) -> str | None:
        """Take the lease ``name``; None on success, else who holds it.

        A second thread asking for a lease this process holds is told it is taken, exactly
        like another process would be. The lease counts as held (and is renewed) only once the
        store has granted it, so the heartbeat never mistakes one being taken for one lost.
        """
        with self._lock:
            if name in self._held or name in self._busy:
                return f"{self.owner} (another thread of this process)"
            self._busy.add(name)
        try:
            started, now = time.monotonic(), self.clock()
            taken = self.store.take_lock(name, self.owner, self.ttl, now)
            if taken.epoch is None:
                return taken.holder
            with self._lock:
                self._took({name: taken.epoch}, started, now)
            return None
        finally:
            with self._lock:
                self._busy.discard(name)

    def claim_due(self, names: Sequence[str], limit: int,
                  exclude: Iterable[str] = ()) -> list[str]:
        """Claim up to ``limit`` due credentials no one holds (see ``StateStore.claim_due``).

        Holds the in-process lock across the store call, so no thread of this process can
        acquire a name while it is being claimed.
        """
        with self._lock:
            skip = set(self._held) | self._busy | set(exclude)
            candidates = [n for n in names if n not in skip]
            started, now = time.monotonic(), self.clock()
            claimed = self.store.claim_due(now, candidates, limit, self.owner, self.ttl)
            self._took(claimed, started, now)
        return list(claimed)

    def _took(self, epochs: dict[str, int], started: float, now: datetime) -> None:
        """Record fresh leases (``_lock`` held) and make sure the heartbeat runs."""
        for name, epoch in epochs.items():
            self.lost.discard(name)
            self._held[name] = _Held(epoch, started + self.ttl.total_seconds(), now + self.ttl)
        if self._thread is None and self._held:
            self._thread = threading.Thread(target=self._beat, name="rotator-leases",
                                            daemon=True)
            self._thread.start()

    def _left(self, name: str, epoch: int | None) -> float:
        """Seconds left on this process's lease ``name`` (of ``epoch``, if given) by the more
        pessimistic of the two clocks; 0 when it is not held or was lost. ``_lock`` held."""
        held = self._held.get(name)
        if held is None or name in self.lost or (epoch is not None and held.epoch != epoch):
            return 0.0
        return max(0.0, min(held.valid_until - time.monotonic(),
                            (held.expires_at - self.clock()).total_seconds()))

    def usable(self, name: str) -> bool:
        """Whether a step may start under the lease: held, not lost, and at least a quarter
        of its time-to-live left since the last renewal that reached the store."""
        with self._lock:
            return self._left(name, None) > self.ttl.total_seconds() / 4

    def check(self, name: str, epoch: int) -> None:
        """Raise ``LeaseLost`` unless this process holds lease ``name`` as ``epoch`` with a
        little time left: the check right before a plugin call is sent."""
        with self._lock:
            left = self._left(name, epoch)
            lost = name in self.lost
        if left <= self.ttl.total_seconds() * FENCE_MARGIN:
            why = ("another worker took it over" if lost else
                   "it ran out before it could be renewed (was this process paused, or the "
                   "state store unreachable?)")
            raise LeaseLost(f"lost the lease on {name} (epoch {epoch}): {why}")

    def confirm(self, name: str, epoch: int) -> None:
        """``check``, then ask the store too (another replica's clock may run ahead of ours):
        the fence before a call that changes something at a provider or in a vault."""
        self.check(name, epoch)
        try:
            held = self.store.holds_lock(name, self.owner, epoch, self.clock())
        except Exception as exc:
            if not self.store.is_unreachable(exc):
                raise
            raise LeaseLost(f"cannot confirm the lease on {name}: the state store is "
                            f"unavailable ({self.store.describe_error(exc)})") from exc
        if not held:
            with self._lock:
                if name in self._held:
                    self.lost.add(name)
            raise LeaseLost(f"lost the lease on {name} (epoch {epoch}): the store no longer "
                            "shows it held by this process")

    def release(self, name: str) -> None:
        """Give the lease back; a no-op when this process does not hold it."""
        with self._lock:
            if name not in self._held:
                return
            del self._held[name]
            self._busy.add(name)  # the heartbeat neither renews it nor calls it lost
        try:
            self.store.unlock(name, self.owner)
        finally:
            with self._lock:
                self._busy.discard(name)

    def _beat(self) -> None:
        interval = max(self.ttl.total_seconds() / 3, 0.2)
        while not self._stop.wait(interval):
            with self._lock:
                names = list(self._held)
            if not names:
                continue
            started, now = time.monotonic(), self.clock()
            try:
                lost = self.store.renew_locks(names, self.owner, self.ttl, now)
            except Exception as exc:  # a store hiccup must not kill the heartbeat
                log.warning("could not renew leases: %s",
                            redaction.scrub(self.store.describe_error(exc)))
                continue
            with self._lock:
                for name in set(names) - lost:
                    if name in self._held:
                        self._held[name].valid_until = started + self.ttl.total_seconds()
                        self._held[name].expires_at = now + self.ttl
                # A lease given back while this renewal ran was released, not lost.
                lost &= set(self._held)
                self.lost |= lost
            if lost:
                log.error("lost the lease on %s: it expired before it was renewed, and "
                          "another worker may take over", ", ".join(sorted(lost)))

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


@dataclass(frozen=True)
class Fence:
    """The lease a rotation runs under: checked before every plugin call it makes, and the
    epoch its keys are named with."""

    leases: Leases
    name: str
    epoch: int

    def check(self) -> None:
        self.leases.check(self.name, self.epoch)

    def confirm(self) -> None:
        self.leases.confirm(self.name, self.epoch)

