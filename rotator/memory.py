"""Keep the daemon's resident memory to what it uses, not to its biggest moment.

At 10,000 credentials a ``/metrics`` page is about 18 MB and the first usage poll handles
thousands of answers. glibc's malloc raises its mmap threshold each time such a large block
is freed, so the next ones come from the heap instead, where freed memory is rarely given
back: the daemon's RSS climbed by over 100 MB after a few scrapes and stayed there. Fixing the
threshold keeps large blocks in their own mappings, returned to the system when freed, and a
trim after a large piece of work gives back the heap's free top.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["release_freed_memory", "settle_allocator"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 256 * 1024
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
            return None  # not glibc (musl, macOS): nothing to tune
        _libc = libc
    return _libc


def settle_allocator() -> None:
    """Blocks of 256 KiB and more get their own mapping, given back when freed (glibc only;
    elsewhere nothing happens)."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; RSS may stay at its peak")


def release_freed_memory() -> None:
    """Give the heap's free memory back to the system (glibc's ``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
