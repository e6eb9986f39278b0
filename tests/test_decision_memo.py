"""The due gate remembers each credential's answer until it can change (issue 16): the
remembered answer is always the one a fresh decision gives, as time passes a due time, a retry
time or a window's edge (across daylight saving time too), and as a rotation, a failure, a
grace or a reload changes the arguments."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from rotator import policy
from rotator.policy import GraceWait, ScheduleSpec, Window, decide

WINDOWS = (None, "Mon-Fri 09:00-17:00 UTC", "daily 22:00-02:00 Europe/Berlin",
           "Sat,Sun 00:00-24:00 America/New_York", "Fri-Mon 01:30-03:15 Australia/Lord_Howe",
           "Sun 02:30-03:30 Europe/Berlin", "Sun 01:00-02:30 America/New_York",
           "daily 00:00-24:00 Asia/Kolkata")


def _fresh(spec: ScheduleSpec, *args: object, **kwargs: object) -> tuple[object, ...]:
    decision, _until = policy._decide(spec, *args, **kwargs)  # type: ignore[arg-type]
    return decision.due, decision.reason, decision.due_at, decision.message


def _same(spec: ScheduleSpec, last: datetime | None, first: datetime, now: datetime,
          rotating: bool = False, retry_at: datetime | None = None,
          grace: GraceWait | None = None) -> None:
    got = decide(spec, last, first, now, rotating, retry_at, grace)
    want = _fresh(spec, last, first, now, rotating, retry_at, grace)
    assert (got.due, got.reason, got.due_at, got.message) == want, (spec, last, now)


@pytest.mark.parametrize("window", WINDOWS)
def test_remembered_answer_matches_a_fresh_one_as_time_passes(window: str | None) -> None:
    rng = random.Random(str(window))
    specs = [ScheduleSpec(f"{kind}/{window}", timedelta(days=1), None,
                          Window.parse(window) if window else None, timedelta(minutes=10))
             for kind in ("new", "old", "failed")]  # one memory each
    hits = 0
    # Around the 2026 DST changes (Europe, US, Lord Howe) and a plain week, minute by minute
    # with odd seconds, so every window edge and due time is crossed.
    for start in (datetime(2026, 3, 28, 20, tzinfo=UTC), datetime(2026, 10, 24, 20, tzinfo=UTC),
                  datetime(2026, 3, 7, 20, tzinfo=UTC), datetime(2026, 10, 31, 20, tzinfo=UTC),
                  datetime(2026, 4, 4, 10, tzinfo=UTC), datetime(2026, 5, 11, 8, tzinfo=UTC)):
        first = start - timedelta(hours=3)
        last = start - timedelta(hours=20)
        retry_at = start + timedelta(hours=5, seconds=17)
        now = start
        while now < start + timedelta(hours=36):
            hits += sum(spec.credential in policy._memo
                        and policy._memo[spec.credential][2] != now for spec in specs)
            _same(specs[0], None, first, now)
            _same(specs[1], last, first, now)
            _same(specs[2], last, first, now, retry_at=retry_at)
            now += timedelta(seconds=rng.choice((1, 29, 60, 61, 300, 599)))
    assert hits > 1000  # answered from memory, mostly


def test_window_edges_exactly() -> None:
    window = Window.parse("Mon-Fri 09:00-17:00 UTC")
    spec = ScheduleSpec("edge/openai", timedelta(days=30), None, window, timedelta(0))
    first = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)  # a Monday
    for now in (datetime(2026, 5, 4, 8, 59, 59, 999999, tzinfo=UTC),
                datetime(2026, 5, 4, 9, 0, tzinfo=UTC),
                datetime(2026, 5, 4, 16, 59, 59, 999999, tzinfo=UTC),
                datetime(2026, 5, 4, 17, 0, tzinfo=UTC)):
        _same(spec, None, first, now)
    assert decide(spec, None, first, datetime(2026, 5, 4, 8, 59, tzinfo=UTC),
                  False).reason == policy.OUTSIDE_WINDOW
    assert decide(spec, None, first, datetime(2026, 5, 4, 9, 0, tzinfo=UTC),
                  False).reason == policy.NEVER_ROTATED
    assert decide(spec, None, first, datetime(2026, 5, 4, 17, 0, tzinfo=UTC),
                  False).reason == policy.OUTSIDE_WINDOW


def test_a_changed_argument_is_never_answered_from_memory() -> None:
    spec = ScheduleSpec("args/openai", timedelta(days=30), None, None, timedelta(0))
    now = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    first = now - timedelta(days=1)
    assert decide(spec, None, first, now, False).reason == policy.NEVER_ROTATED
    assert decide(spec, None, first, now, True).reason == policy.ROTATING  # a rotation starts
    assert decide(spec, now, first, now, False).reason == policy.NOT_DUE  # ... and finishes
    grace = GraceWait(now + timedelta(hours=1), "key-1", "rot-1")
    assert decide(spec, now, first, now, False, grace=grace).reason == policy.IN_GRACE
    assert decide(spec, now, first, now, False).reason == policy.NOT_DUE  # revoked
    failed = now + timedelta(minutes=5)
    assert decide(spec, None, first, now, False, retry_at=failed).reason == \
        policy.RETRY_BACKOFF
    assert decide(spec, None, first, failed, False, retry_at=failed).reason == \
        policy.NEVER_ROTATED
    # A reload: the same credential, now with a window closed at ``now`` and a longer interval.
    reloaded = ScheduleSpec("args/openai", timedelta(days=60), None,
                            Window.parse("daily 00:00-01:00 UTC"), timedelta(0))
    assert decide(reloaded, None, first, now, False).reason == policy.OUTSIDE_WINDOW
    assert decide(reloaded, now - timedelta(days=45), first, now, False).reason == \
        policy.NOT_DUE
    assert decide(spec, now - timedelta(days=45), first, now, False).reason == \
        policy.INTERVAL_ELAPSED


def test_time_passing_the_due_time_changes_the_answer() -> None:
    spec = ScheduleSpec("time/openai", timedelta(hours=1), None, None, timedelta(minutes=10))
    last = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    first = last - timedelta(days=1)
    before = decide(spec, last, first, last + timedelta(minutes=1), False)
    assert before.reason == policy.NOT_DUE and before.due_at is not None
    assert decide(spec, last, first, before.due_at - timedelta(microseconds=1),
                  False).reason == policy.NOT_DUE
    assert decide(spec, last, first, before.due_at, False).reason == policy.INTERVAL_ELAPSED
    # Time running backwards (a test clock) is answered afresh too.
    assert decide(spec, last, first, last, False).reason == policy.NOT_DUE
