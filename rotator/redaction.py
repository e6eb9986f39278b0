"""Remembers every secret value the process has handled, so logs can scrub them.

This is the second line of defence: the first is that secrets travel as ``Secret`` objects
whose ``repr`` shows nothing. A value is remembered when it is wrapped.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_values: set[str] = set()
_MIN_LENGTH = 8


def remember(value: str) -> None:
    """Add ``value`` to the set scrubbed from log output (short values are too ambiguous)."""
    if len(value) >= _MIN_LENGTH:
        with _lock:
            _values.add(value)


def scrub(text: str) -> str:
    """``text`` with every remembered secret replaced by ``[REDACTED]``."""
    with _lock:
        values = sorted(_values, key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, "[REDACTED]")
    return text
