"""The due gate's fast paths (issue 16) answer exactly as the plain versions they replaced:
``Window.contains`` in wall-clock microseconds, ``jitter_offset`` remembered."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from rotator.policy import Window, jitter_offset

WINDOWS = ("Mon-Fri 09:00-17:00 UTC", "daily 22:00-02:00 Europe/Berlin",
           "Sat,Sun 00:00-24:00 America/New_York", "Fri-Mon 01:30-03:15 Australia/Lord_Howe",
           "Wed 02:00-02:30 Europe/Berlin", "daily 00:00-24:00 Asia/Kolkata")


def _contains_by_datetimes(window: Window, dt: datetime) -> bool:
    """The implementation before the fast path: naive local datetimes."""
    local = dt.astimezone(ZoneInfo(window.tz)).replace(tzinfo=None)
    for back in (0, 1):
        day = local.date() - timedelta(days=back)
        if day.weekday() in window.days:
            opening = datetime.combine(day, time(window.start_minute // 60,
                                                 window.start_minute % 60))
            if opening <= local < opening + window.length:
                return True
    return False


@pytest.mark.parametrize("text", WINDOWS)
def test_window_contains_matches_the_datetime_version_across_the_year(text: str) -> None:
    window = Window.parse(text)
    rng = random.Random(text)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    instants = [start + timedelta(seconds=rng.randrange(366 * 86400),
                                  microseconds=rng.randrange(1_000_000)) for _ in range(5000)]
    # Every minute around the DST changes of 2026 in Europe and the US, and edges exactly.
    for change in (datetime(2026, 3, 29, 0, 30, tzinfo=UTC), datetime(2026, 10, 25, 0, 30,
                                                                      tzinfo=UTC),
                   datetime(2026, 3, 8, 6, 0, tzinfo=UTC), datetime(2026, 11, 1, 5, 0,
                                                                    tzinfo=UTC)):
        instants += [change + timedelta(minutes=m) for m in range(240)]
    for dt in instants:
        assert window.contains(dt) == _contains_by_datetimes(window, dt), (text, dt)
        assert window.contains(dt.replace(tzinfo=None) if dt.tzinfo is UTC else dt) == \
            _contains_by_datetimes(window, dt)


def test_jitter_offset_remembered_is_the_hash_of_credential_and_due_time() -> None:
    due = datetime(2026, 5, 1, 3, 0, tzinfo=UTC)
    for jitter in (timedelta(minutes=10), timedelta(seconds=1), timedelta(microseconds=7)):
        for name in ("a/openai", "b/openai"):
            digest = hashlib.sha256(f"{name}\0{due.isoformat()}".encode()).digest()
            value, total = int.from_bytes(digest[:8], "big"), jitter // timedelta(microseconds=1)
            want = (timedelta(seconds=value % (total // 1_000_000)) if total >= 2_000_000
                    else timedelta(microseconds=value % total))
            assert jitter_offset(name, due, jitter) == want
            assert jitter_offset(name, due.replace(tzinfo=None), jitter) == want
            assert jitter_offset(name, due.astimezone(ZoneInfo("Asia/Tokyo")), jitter) == want
    assert jitter_offset("a/openai", due, timedelta(0)) == timedelta(0)
