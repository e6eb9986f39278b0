"""Human durations (``90d``, ``12h``, ``1h30m``) for the policy file and the command line.

One grammar everywhere, so what ``rotator plan --within 30d`` accepts is what ``interval = "30d"``
accepts, and what ``rotator status`` prints (``format_duration``) can be pasted back in.
"""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_duration", "parse_duration"]

_UNITS: dict[str, int] = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([wdhms])")
_WHOLE = re.compile(r"(?:\d+[wdhms])+")
# Large enough for any sane interval, small enough that timedelta never overflows.
_MAX_SECONDS = 100 * 365 * 86400


def _not_a_duration(text: str, why: str = "") -> ValueError:
    shown = text if len(text) <= 40 else text[:37] + "..."
    extra = f"; {why}" if why else ""
    return ValueError(f'"{shown}" is not a duration (examples: 30d, 12h, 1h30m){extra}')


def parse_duration(text: str) -> timedelta:
    """Parse ``90d``, ``12h``, ``15m``, ``30s``, ``2w`` or combinations such as ``1h30m``.

    ``0`` and ``0s`` mean zero (a grace period may be zero). Units must be in decreasing order
    and appear at most once, so ``30m1h`` (almost certainly a typo) is rejected rather than
    guessed at. Negative, empty, fractional or unit-less values raise ``ValueError`` whose
    message quotes the input and shows examples.
    """
    if not isinstance(text, str):
        raise ValueError(f"a duration must be a string such as \"30d\", not {type(text).__name__}")
    raw = text.strip().lower()
    if raw == "0":
        return timedelta(0)
    if not raw:
        raise _not_a_duration(text, "it is empty")
    if raw.startswith("-"):
        raise _not_a_duration(text, "durations cannot be negative")
    if not _WHOLE.fullmatch(raw):
        raise _not_a_duration(text)
    order = list(_UNITS)
    seconds = 0
    last_rank = -1
    for number, unit in _PART.findall(raw):
        rank = order.index(unit)
        if rank <= last_rank:
            raise _not_a_duration(text, "give each unit once, largest first (like 1h30m)")
        last_rank = rank
        seconds += int(number) * _UNITS[unit]
        if seconds > _MAX_SECONDS:
            raise _not_a_duration(text, "it is longer than 100 years")
    return timedelta(seconds=seconds)


def format_duration(td: timedelta) -> str:
    """The compact form of ``td`` (``1d2h``, ``30m``, ``0s``) that ``parse_duration`` reads back.

    Sub-second parts are dropped (rotation schedules are not that precise). Weeks are not used
    on output so that ``90d`` prints as ``90d``, the way operators write it. A negative
    duration (an overdue credential's "time left") is printed with a leading ``-``.
    """
    total = int(td.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    if total == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)
