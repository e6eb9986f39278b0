"""Remembers every secret value the process has handled, so logs can scrub them.

This is the second line of defence: the first is that secrets travel as ``Secret`` objects
whose ``repr`` shows nothing. A value is remembered when it is wrapped.

A daemon watching 10,000 credentials remembers 10,000 values or more, and every log line is
scrubbed: looking for each value in turn (after sorting them) cost milliseconds per line.
With many values the text is scanned once instead, looking each position's first eight
characters up in an index of the values.
"""

from __future__ import annotations

import threading

__all__ = ["remember", "scrub"]

_lock = threading.Lock()
_values: set[str] = set()
_MIN_LENGTH = 8
_longest_first: tuple[str, ...] = ()
_index: dict[str, tuple[str, ...]] = {}
"""First ``_MIN_LENGTH`` characters -> the values starting so, longest first."""
_SCAN_FROM = 64
"""With this many values or more, scan the text instead of searching for each value."""
_MASK = "[REDACTED]"


def remember(value: str) -> None:
    """Add ``value`` to the set scrubbed from log output (short values are too ambiguous)."""
    global _longest_first
    if len(value) < _MIN_LENGTH or value in _values:
        return
    with _lock:
        if value in _values:
            return
        _values.add(value)
        _longest_first = tuple(sorted(_values, key=len, reverse=True)) \
            if len(_values) < _SCAN_FROM else ()
        head = value[:_MIN_LENGTH]
        _index[head] = tuple(sorted((*_index.get(head, ()), value), key=len, reverse=True))


def scrub(text: str) -> str:
    """``text`` with every remembered secret replaced by ``[REDACTED]``."""
    if len(text) < _MIN_LENGTH:
        return text
    few = _longest_first
    if few or not _index:
        for value in few:
            if value in text:
                text = text.replace(value, _MASK)
        return text
    return _scan(text, _index)


def _scan(text: str, index: dict[str, tuple[str, ...]]) -> str:
    pieces: list[str] = []
    start = i = 0
    last = len(text) - _MIN_LENGTH
    while i <= last:
        found = index.get(text[i:i + _MIN_LENGTH])
        if found:
            for value in found:
                if text.startswith(value, i):
                    pieces += (text[start:i], _MASK)
                    i = start = i + len(value)
                    break
            else:
                i += 1
        else:
            i += 1
    if not pieces:
        return text
    pieces.append(text[start:])
    return "".join(pieces)
