"""A small thread-safe memory of what a vault plugin just read or wrote.

A rotation reads the same things more than once: the version it will replace (prepare), again
as the base of the check-and-set write (promote); the key it staged (stage, verify, promote).
Remembering them for a few minutes saves those round trips. Only answers that cannot go stale
are served from here (a staged copy this process wrote and has not discarded), or ones whose
staleness a check-and-set write detects and corrects (the latest version as the base of a
write). A numbered version is not: it can be deleted or destroyed, and a reader must see that.
Entries live in memory only, for ``ttl`` seconds, at most ``size`` of them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["RecentCache"]

V = TypeVar("V")


class RecentCache(Generic[V]):
    """Least recently used entries beyond ``size`` and entries older than ``ttl`` are gone."""

    def __init__(self, size: int = 4096, ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._size, self._ttl, self._clock = size, ttl, clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            if self._clock() - found[0] > self._ttl:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return found[1]

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
