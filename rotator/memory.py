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
import logging

__all__ = ["release_freed_memory", "settle_allocator"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 256 * 1024
_UNKNOWN = object()
_libc: object = _UNKNOWN


def _glibc() -> ctypes.CDLL | None:
    """The C library already loaded into this process, if it is glibc (looked up once)."""
    global _libc
    if _libc is _UNKNOWN:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            libc = None
        _libc = libc if libc is not None and hasattr(libc, "mallopt") \
            and hasattr(libc, "malloc_trim") else None  # musl or macOS: nothing to tune
    return _libc  # type: ignore[return-value]


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
