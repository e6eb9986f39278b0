"""Scheduling math: windows, cron, jitter and the due-check chain, all with an injected now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st

from rotator import policy
from rotator.policy import (
    Decision,
    ScheduleSpec,
    Window,
    compute_next_due,
    decide,
    jitter_offset,
    next_cron,
    validate_cron,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# 2026-01-05 is a Monday.
MON = utc(2026, 1, 5, 12)
SAT = utc(2026, 1, 10, 12)


def spec(interval: timedelta | None = timedelta(days=30), cron: str | None = None,
         window: str | None = None, jitter: timedelta = timedelta(0),
         manual_only: bool = False, name: str = "agent/openai") -> ScheduleSpec:
    return ScheduleSpec(credential=name, interval=interval, cron=cron,
                        window=Window.parse(window) if window else None, jitter=jitter,
                        manual_only=manual_only)


# -- windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical"), [
    ("Mon-Fri 09:00-17:00 UTC", "Mon-Fri 09:00-17:00 UTC"),
    ("mon-fri 9:00-17:00 utc", "Mon-Fri 09:00-17:00 UTC"),
    ("Sat,Sun 00:00-24:00 UTC", "Sat,Sun 00:00-24:00 UTC"),
    ("Mon,Wed-Fri 22:00-02:00 Europe/Berlin", "Mon,Wed-Fri 22:00-02:00 Europe/Berlin"),
    ("daily 01:00-05:00 UTC", "daily 01:00-05:00 UTC"),
    ("01:00-05:00 UTC", "daily 01:00-05:00 UTC"),
    ("Monday,Tuesday 01:00-05:00 UTC", "Mon,Tue 01:00-05:00 UTC"),
    ("Fri-Mon 01:00-05:00 UTC", "Mon,Fri-Sun 01:00-05:00 UTC"),
    ("Mon-Sun 01:00-05:00 UTC", "daily 01:00-05:00 UTC"),
])
def test_window_canonical_text(text: str, canonical: str) -> None:
    window = Window.parse(text)
    assert str(window) == canonical
    assert Window.parse(str(window)) == window


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty"),
    ("Mon-Fri 09:00-17:00", "time zone"),
    ("Mon-Fri 9-17 UTC", "HH:MM-HH:MM"),
    ("Mon-Fry 09:00-17:00 UTC", "days are Mon"),
    ("Mon-Fri 09:00-09:00 UTC", "same time"),
    ("Mon-Fri 24:30-25:00 UTC", "impossible time"),
    ("Mon-Fri 09:00-17:00 Mars/Olympus", "not a known time zone"),
    ("Mon-Fri 09:00-17:00 UTC please", "unexpected"),
    ("Mon - Fri 09:00-17:00 UTC", "without spaces"),
])
def test_window_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        Window.parse(text)
    assert "examples" in str(info.value)


def test_window_office_hours() -> None:
    w = Window.parse("Mon-Fri 09:00-17:00 UTC")
    assert w.contains(utc(2026, 1, 5, 9, 0))
    assert w.contains(utc(2026, 1, 9, 16, 59))
    assert not w.contains(utc(2026, 1, 5, 17, 0))  # end is exclusive
    assert not w.contains(utc(2026, 1, 5, 8, 59))
    assert not w.contains(SAT)
    # Inside: next_open is dt itself. Saturday: Monday morning.
    assert w.next_open(MON) == MON
    assert w.next_open(SAT) == utc(2026, 1, 12, 9, 0)
    # Friday evening: next Monday.
    assert w.next_open(utc(2026, 1, 9, 17, 0)) == utc(2026, 1, 12, 9, 0)
    # Before opening on a weekday: the same day.
    assert w.next_open(utc(2026, 1, 6, 3, 0)) == utc(2026, 1, 6, 9, 0)


def test_window_overnight_crosses_midnight() -> None:
    w = Window.parse("Fri 22:00-02:00 UTC")  # opens Friday night, closes Saturday 02:00
    assert w.contains(utc(2026, 1, 9, 23, 0))
    assert w.contains(utc(2026, 1, 10, 1, 59))  # Saturday early morning still belongs to Friday
    assert not w.contains(utc(2026, 1, 10, 2, 0))
    assert not w.contains(utc(2026, 1, 9, 1, 0))  # Friday early morning belongs to Thursday
    assert not w.contains(utc(2026, 1, 10, 23, 0))  # Saturday night: not listed
    assert w.next_open(utc(2026, 1, 10, 3, 0)) == utc(2026, 1, 16, 22, 0)


def test_window_weekends_whole_days() -> None:
    w = Window.parse("Sat,Sun 00:00-24:00 UTC")
    assert w.contains(SAT)
    assert w.contains(utc(2026, 1, 11, 23, 59))
    assert not w.contains(utc(2026, 1, 12, 0, 0))
    assert w.next_open(MON) == utc(2026, 1, 10, 0, 0)


def test_window_time_zone_and_dst() -> None:
    w = Window.parse("daily 09:00-10:00 Europe/Berlin")
    # Winter: UTC+1; summer: UTC+2. The window follows the wall clock.
    assert w.contains(utc(2026, 1, 5, 8, 30))
    assert not w.contains(utc(2026, 1, 5, 9, 30))
    assert w.contains(utc(2026, 7, 6, 7, 30))
    assert w.next_open(utc(2026, 7, 6, 12, 0)) == utc(2026, 7, 7, 7, 0)
    berlin = datetime(2026, 1, 5, 9, 15, tzinfo=ZoneInfo("Europe/Berlin"))
    assert w.contains(berlin)
    assert w.next_open(berlin) == berlin


def test_window_naive_datetimes_are_utc() -> None:
    w = Window.parse("Mon-Fri 09:00-17:00 UTC")
    assert w.contains(datetime(2026, 1, 5, 12))
    assert w.next_open(datetime(2026, 1, 10, 12)) == utc(2026, 1, 12, 9)


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
       st.sampled_from(["Mon-Fri 09:00-17:00 UTC", "Fri 22:00-02:00 America/New_York",
                        "Sat,Sun 00:00-24:00 Europe/Berlin", "daily 02:30-03:30 Europe/Berlin"]))
def test_window_next_open_is_open_and_not_earlier(naive: datetime, text: str) -> None:
    w = Window.parse(text)
    dt = naive.replace(tzinfo=UTC)
    opened = w.next_open(dt)
    assert opened >= dt
    assert opened - dt <= timedelta(days=8)
    # A DST gap can swallow an opening instant; otherwise the result is inside the window.
    assert w.contains(opened) or text.endswith("03:30 Europe/Berlin")


# -- cron ------------------------------------------------------------------------------------


def test_cron_next_fire_is_utc_and_strictly_after() -> None:
    assert next_cron("0 3 * * MON", utc(2026, 1, 1)) == utc(2026, 1, 5, 3)
    # Exactly on a fire time: the next one, not the same instant.
    assert next_cron("0 3 * * MON", utc(2026, 1, 5, 3)) == utc(2026, 1, 12, 3)
    assert next_cron("30 2 1 * *", utc(2026, 1, 5)) == utc(2026, 2, 1, 2, 30)
    assert next_cron("0 3 * * MON", datetime(2026, 1, 1)).tzinfo is not None


@pytest.mark.parametrize(("expr", "fragment"), [
    ("", "field"),
    ("0 3 * *", "field"),
    ("0 3 * * * *", "field"),
    ("61 * * * *", "not a cron schedule"),
    ("*/0 * * * *", "not a cron schedule"),
    ("0 3 * * 1", "names"),
    ("0 0 31 2 *", "never fires"),
])
def test_cron_rejects(expr: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        validate_cron(expr)


def test_cron_accepts() -> None:
    for expr in ("0 3 * * MON", "*/15 * * * *", "0 0 1 * *", "0 4 * * mon-fri", "0 0 29 2 *"):
        validate_cron(expr)


# -- jitter ----------------------------------------------------------------------------------


def test_jitter_is_deterministic_bounded_and_spread() -> None:
    jitter = timedelta(minutes=10)
    offsets = {jitter_offset(f"agent-{i}/openai", MON, jitter) for i in range(200)}
    assert all(timedelta(0) <= o < jitter for o in offsets)
    assert len(offsets) > 150  # credentials due at the same time spread out
    again = jitter_offset("agent-1/openai", MON, jitter)
    assert again == jitter_offset("agent-1/openai", MON, jitter)  # a restart does not move it
    assert again == jitter_offset("agent-1/openai", MON.astimezone(ZoneInfo("Asia/Tokyo")),
                                  jitter)
    # Successive due times of one credential get different offsets.
    successive = {jitter_offset("a", MON + timedelta(days=30 * k), jitter) for k in range(20)}
    assert len(successive) > 10


def test_jitter_zero_and_tiny() -> None:
    assert jitter_offset("a", MON, timedelta(0)) == timedelta(0)
    tiny = jitter_offset("a", MON, timedelta(milliseconds=5))
    assert timedelta(0) <= tiny < timedelta(milliseconds=5)


@given(st.text(max_size=30), st.integers(min_value=1, max_value=10**12))
def test_jitter_bounds_property(name: str, micros: int) -> None:
    jitter = timedelta(microseconds=micros)
    assert timedelta(0) <= jitter_offset(name, MON, jitter) < jitter


# -- next due --------------------------------------------------------------------------------


def test_interval_due() -> None:
    s = spec(interval=timedelta(days=30))
    assert compute_next_due(s, MON, MON - timedelta(days=100), MON) == MON + timedelta(days=30)


def test_never_rotated_is_due_at_first_seen_plus_jitter() -> None:
    s = spec(jitter=timedelta(minutes=10))
    due = compute_next_due(s, None, MON, MON)
    assert MON <= due < MON + timedelta(minutes=10)
    assert due == MON + jitter_offset(s.credential, MON, s.jitter)


def test_cron_due_after_last_rotation() -> None:
    s = spec(interval=None, cron="0 3 * * MON")
    assert compute_next_due(s, utc(2026, 1, 5, 3, 2), utc(2025, 1, 1), MON) == utc(2026, 1, 12, 3)


def test_window_pushes_due_time() -> None:
    s = spec(interval=timedelta(days=5), window="Mon-Fri 09:00-17:00 UTC")
    # Last rotated Monday noon: + 5 days = Saturday noon -> pushed to Monday 09:00.
    assert compute_next_due(s, MON, MON, MON) == utc(2026, 1, 12, 9)


def test_overdue_inside_window_stays_in_the_past() -> None:
    s = spec(window="Mon-Fri 09:00-17:00 UTC")
    last = MON - timedelta(days=60)
    due = compute_next_due(s, last, last, MON)
    assert due < MON  # overdue, and the window is open now: due stays visible as overdue


def test_overdue_outside_window_moves_to_next_opening() -> None:
    s = spec(window="Mon-Fri 09:00-17:00 UTC")
    last = SAT - timedelta(days=60)
    assert compute_next_due(s, last, last, SAT) == utc(2026, 1, 12, 9)


def test_manual_only_has_no_due_time() -> None:
    with pytest.raises(ValueError):
        compute_next_due(spec(interval=None, manual_only=True), None, MON, MON)


# -- the chain -------------------------------------------------------------------------------


def reason(d: Decision) -> str:
    assert d.reason in policy.REASONS
    return d.reason


def test_reason_rotating_wins() -> None:
    d = decide(spec(), None, MON - timedelta(days=1), MON, rotating=True)
    assert (d.due, reason(d)) == (False, "rotating")


def test_reason_manual_only() -> None:
    d = decide(spec(interval=None, manual_only=True), None, MON, MON, rotating=False)
    assert (d.due, reason(d), d.due_at) == (False, "manual_only", None)
    assert "--revoke-first" in d.message


def test_reason_retry_backoff_holds_a_failed_credential_until_its_retry() -> None:
    last = MON - timedelta(days=31)  # its interval is up...
    retry = MON + timedelta(minutes=4)  # ...but the last attempt failed a minute ago
    d = decide(spec(), last, last, MON, rotating=False, retry_at=retry)
    assert (d.due, reason(d), d.due_at) == (False, "retry_backoff", retry)
    d = decide(spec(), last, last, retry, rotating=False, retry_at=retry)
    assert (d.due, reason(d)) == (True, "interval_elapsed"), "due again once the backoff ends"


def test_reason_in_grace_holds_the_next_rotation_until_the_old_key_is_revoked() -> None:
    last = MON - timedelta(days=31)  # its interval is up...
    until = MON + timedelta(hours=1)  # ...but the last rotation's old key is still live
    grace = policy.GraceWait(until, "key_old", "r1")
    d = decide(spec(), last, last, MON, rotating=False, grace=grace)
    assert (d.due, reason(d), d.due_at) == (False, "in_grace", until)
    assert "key_old" in d.message and "r1" in d.message and "grace" in d.message
    failing = policy.GraceWait(until, "key_old", "r1", failed_attempts=3)
    d = decide(spec(), last, last, MON, rotating=False, grace=failing)
    assert "failed 3 time(s)" in d.message
    # It outranks a retry backoff, and the rotation in progress outranks it.
    d = decide(spec(), last, last, MON, rotating=False, grace=grace,
               retry_at=MON + timedelta(minutes=5))
    assert reason(d) == "in_grace"
    assert reason(decide(spec(), last, last, MON, rotating=True, grace=grace)) == "rotating"
    assert reason(decide(spec(), last, last, MON, rotating=False)) == "interval_elapsed"


def test_every_reason_code_has_a_test() -> None:
    tested = {"rotating", "manual_only", "in_grace", "retry_backoff", "never_rotated",
              "interval_elapsed", "schedule_reached", "outside_window", "not_due"}
    assert set(policy.REASONS) == tested


def test_reason_never_rotated() -> None:
    d = decide(spec(), None, MON - timedelta(hours=1), MON, rotating=False)
    assert (d.due, reason(d)) == (True, "never_rotated")
    assert d.due_at == MON - timedelta(hours=1)


def test_reason_never_rotated_waits_for_its_jitter() -> None:
    s = spec(jitter=timedelta(hours=1), name="x")
    offset = jitter_offset("x", MON, s.jitter)
    assert offset > timedelta(0)
    d = decide(s, None, MON, MON, rotating=False)
    assert (d.due, reason(d), d.due_at) == (False, "not_due", MON + offset)
    assert "first rotation" in d.message
    d = decide(s, None, MON, MON + offset, rotating=False)
    assert (d.due, reason(d)) == (True, "never_rotated")


def test_reason_interval_elapsed() -> None:
    last = MON - timedelta(days=31)
    d = decide(spec(), last, last, MON, rotating=False)
    assert (d.due, reason(d)) == (True, "interval_elapsed")
    assert d.due_at == last + timedelta(days=30)
    assert "interval 30d" in d.message


def test_reason_schedule_reached() -> None:
    s = spec(interval=None, cron="0 3 * * MON")
    d = decide(s, utc(2026, 1, 1), utc(2025, 1, 1), MON, rotating=False)
    assert (d.due, reason(d), d.due_at) == (True, "schedule_reached", utc(2026, 1, 5, 3))
    assert '"0 3 * * MON"' in d.message


def test_reason_outside_window() -> None:
    s = spec(window="Mon-Fri 09:00-17:00 UTC")
    last = SAT - timedelta(days=31)
    d = decide(s, last, last, SAT, rotating=False)
    assert (d.due, reason(d), d.due_at) == (False, "outside_window", utc(2026, 1, 12, 9))
    assert "Mon-Fri 09:00-17:00 UTC" in d.message
    # The same credential on Monday morning is due.
    assert decide(s, last, last, utc(2026, 1, 12, 9), rotating=False).due


def test_reason_not_due_message() -> None:
    last = utc(2026, 11, 1, 3)
    d = decide(spec(), last, last, utc(2026, 11, 2), rotating=False)
    assert (d.due, reason(d), d.due_at) == (False, "not_due", utc(2026, 12, 1, 3))
    assert d.message == "next rotation 2026-12-01 03:00 UTC (interval 30d)"


def test_decide_does_not_read_the_wall_clock() -> None:
    last = utc(2026, 11, 1, 3)
    expected = decide(spec(), last, last, utc(2026, 11, 2), rotating=False)
    with freeze_time("2030-01-01"):
        assert decide(spec(), last, last, utc(2026, 11, 2), rotating=False) == expected


def test_decide_accepts_naive_datetimes_as_utc() -> None:
    last = datetime(2026, 11, 1, 3)
    d = decide(spec(), last, last, datetime(2026, 11, 2), rotating=False)
    assert d.due_at == utc(2026, 12, 1, 3)
