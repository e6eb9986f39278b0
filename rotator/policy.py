"""When is a credential due? Windows, cron, jitter and the due-check chain.

Everything here is a pure function of its arguments: the caller passes ``now``, so the daemon,
``rotator plan`` and the tests all get the same answer for the same inputs, and nothing depends
on the wall clock or on which replica asks.

The due check follows cert-manager's policy chain: an ordered list of small checks, each either
passing or returning a :class:`Decision` with a stable reason code and a human message; the first
check that returns wins. The reason codes are part of the contract (they show in ``rotator
status``, ``rotator plan`` and metrics), so they are constants here and never reworded.

Naive datetimes (as SQLite hands them back) are taken to be UTC throughout.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property, lru_cache
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

from rotator.durations import format_duration

__all__ = [
    "INTERVAL_ELAPSED",
    "IN_GRACE",
    "MANUAL_ONLY",
    "NEVER_ROTATED",
    "NOT_DUE",
    "OUTSIDE_WINDOW",
    "REASONS",
    "RETRY_BACKOFF",
    "ROTATING",
    "SCHEDULE_REACHED",
    "Decision",
    "GraceWait",
    "ScheduleSpec",
    "Window",
    "compute_next_due",
    "decide",
    "jitter_offset",
    "next_cron",
    "validate_cron",
]

ROTATING = "rotating"
MANUAL_ONLY = "manual_only"
IN_GRACE = "in_grace"
NEVER_ROTATED = "never_rotated"
INTERVAL_ELAPSED = "interval_elapsed"
SCHEDULE_REACHED = "schedule_reached"
RETRY_BACKOFF = "retry_backoff"
OUTSIDE_WINDOW = "outside_window"
NOT_DUE = "not_due"
REASONS = (ROTATING, MANUAL_ONLY, IN_GRACE, RETRY_BACKOFF, NEVER_ROTATED, INTERVAL_ELAPSED,
           SCHEDULE_REACHED, OUTSIDE_WINDOW, NOT_DUE)
"""Every reason code :func:`decide` can return, in the order the chain checks them."""


def _utc(dt: datetime) -> datetime:
    """``dt`` as an aware UTC datetime; naive values are UTC by convention (SQLite drops tz)."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _show(dt: datetime) -> str:
    return _utc(dt).strftime("%Y-%m-%d %H:%M UTC")


# -- windows ---------------------------------------------------------------------------------

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY_LOOKUP = {name.lower(): i for i, name in enumerate(_DAY_NAMES)}
_DAY_LOOKUP.update({full: i for i, full in enumerate(
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))})
_EVERY_DAY = frozenset(range(7))
_TIMES = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
_WINDOW_EXAMPLES = '(examples: "Mon-Fri 09:00-17:00 UTC", "daily 22:00-02:00 Europe/Berlin")'
_MINUTES_PER_DAY = 24 * 60
_US_PER_MINUTE = 60_000_000
_US_PER_DAY = _MINUTES_PER_DAY * _US_PER_MINUTE


def _window_error(text: str, why: str) -> ValueError:
    return ValueError(f'"{text}" is not a window: {why} {_WINDOW_EXAMPLES}')


def _parse_days(text: str, spec: str) -> frozenset[int]:
    if spec.lower() in ("daily", "*"):
        return _EVERY_DAY
    days: set[int] = set()
    for item in spec.split(","):
        ends = item.split("-")
        if len(ends) > 2 or not all(ends):
            raise _window_error(text, f"{item!r} is not a day or a range of days like Mon-Fri")
        try:
            first, last = (_DAY_LOOKUP[e.lower()] for e in (ends[0], ends[-1]))
        except KeyError:
            raise _window_error(text, f"{item!r}: days are Mon, Tue, Wed, Thu, Fri, Sat, Sun"
                                ) from None
        # A range may wrap over the weekend: Fri-Mon is Fri, Sat, Sun, Mon.
        span = (last - first) % 7
        days.update((first + i) % 7 for i in range(span + 1))
    return frozenset(days)


def _format_days(days: frozenset[int]) -> str:
    if days == _EVERY_DAY:
        return "daily"
    parts: list[str] = []
    ordered = sorted(days)
    run = [ordered[0]]
    for day in ordered[1:]:
        if day == run[-1] + 1:
            run.append(day)
            continue
        parts.append(_format_run(run))
        run = [day]
    parts.append(_format_run(run))
    return ",".join(parts)


def _format_run(run: list[int]) -> str:
    if len(run) >= 3:
        return f"{_DAY_NAMES[run[0]]}-{_DAY_NAMES[run[-1]]}"
    return ",".join(_DAY_NAMES[d] for d in run)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class Window:
    """When scheduled rotations may *start*: some days of the week, a time span, a time zone.

    A rotation already running is never interrupted by the window closing. ``end`` before
    ``start`` means the window crosses midnight (``22:00-02:00`` opens on each listed day at
    22:00 and closes the next morning). ``24:00`` may be used as an end for "until midnight".
    Times are wall-clock times in ``tz``, so a window follows daylight saving time.
    """

    days: frozenset[int]
    """Weekdays on which the window *opens*, 0 = Monday (as :meth:`datetime.weekday`)."""
    start_minute: int
    """Minutes after local midnight the window opens, 0..1439."""
    end_minute: int
    """Minutes after local midnight the window closes, 0..1440; before start = next day."""
    tz: str
    """``UTC`` or an IANA time zone name."""

    @classmethod
    def parse(cls, text: str) -> Window:
        """Read ``[DAYS] HH:MM-HH:MM TZ``; ``ValueError`` says what is wrong and shows examples.

        DAYS is ``daily`` (the default when omitted) or a comma list of days and ranges
        (``Mon-Fri``, ``Sat,Sun``, ``Mon,Wed-Fri``). The time zone is required: a window
        without one would silently mean different hours on different hosts.
        """
        if not isinstance(text, str):
            raise ValueError(f"a window must be a string {_WINDOW_EXAMPLES}")
        tokens = text.split()
        if not tokens:
            raise _window_error(text, "it is empty")
        times_at = next((i for i, tok in enumerate(tokens) if ":" in tok and "-" in tok), None)
        if times_at is None:
            raise _window_error(text, "it needs a time span HH:MM-HH:MM")
        if times_at > 1:
            raise _window_error(text, "write the days without spaces, like Mon,Wed-Fri")
        days = _parse_days(text, tokens[0]) if times_at == 1 else _EVERY_DAY
        match = _TIMES.fullmatch(tokens[times_at])
        if match is None:
            raise _window_error(text, f"{tokens[times_at]!r} is not a time span HH:MM-HH:MM")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
            raise _window_error(text, f"{tokens[times_at]!r} has an impossible time")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise _window_error(text, "it opens and closes at the same time (for whole days "
                                      "use 00:00-24:00)")
        rest = tokens[times_at + 1:]
        if not rest:
            raise _window_error(text, "add a time zone (UTC or a name like Europe/Berlin)")
        if len(rest) > 1:
            raise _window_error(text, f"unexpected {' '.join(rest[1:])!r} after the time zone")
        tz = rest[0]
        if tz.upper() in ("UTC", "Z", "GMT"):
            tz = "UTC"
        try:
            ZoneInfo(tz)
        except Exception:  # ZoneInfoNotFoundError, or ValueError for malformed keys
            raise _window_error(text, f"{tz!r} is not a known time zone (use UTC or an IANA "
                                      "name like Europe/Berlin)") from None
        return cls(days=days, start_minute=start, end_minute=end, tz=tz)

    def __str__(self) -> str:
        return (f"{_format_days(self.days)} {_hhmm(self.start_minute)}-"
                f"{_hhmm(self.end_minute)} {self.tz}")

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    @property
    def length(self) -> timedelta:
        """How long the window stays open once it opens."""
        minutes = (self.end_minute - self.start_minute) % _MINUTES_PER_DAY or _MINUTES_PER_DAY
        return timedelta(minutes=minutes)

    @cached_property
    def _span_us(self) -> tuple[int, int]:
        """(opening, length) in microseconds of local wall-clock time (``contains``)."""
        return self.start_minute * _US_PER_MINUTE, self.length // timedelta(microseconds=1)

    def _opening(self, day: date) -> datetime:
        """The naive local wall-clock time the window opens on ``day``."""
        return datetime.combine(day, time(self.start_minute // 60, self.start_minute % 60))

    def contains(self, dt: datetime) -> bool:
        """True if a rotation may start at ``dt``.

        In wall-clock microseconds since local midnight rather than datetimes: the due gate
        asks this for every credential on every ``/metrics`` scrape."""
        local = _utc(dt).astimezone(self.zone)
        into_day = (((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000
                    + local.microsecond)
        start, length = self._span_us
        weekday = local.weekday()
        if weekday in self.days and start <= into_day < start + length:
            return True  # opened today
        # Opened yesterday (overnight and whole-day windows): opening <= now always holds.
        return (weekday - 1) % 7 in self.days and into_day + _US_PER_DAY - start < length

    def unchanged_until(self, now: datetime) -> datetime:
        """The first moment after ``now`` (aware UTC) at which :meth:`contains` may answer
        differently: the window's next opening while closed, its closing while open.

        Found in the zone's wall-clock time, which moves with UTC while the zone's offset
        stays the same; when the offset differs at that edge (daylight saving time in
        between), the next whole UTC minute instead (the window's edges are whole local
        minutes), or ``now`` itself (nothing known) for a zone whose offset is not whole
        minutes. ``next_open`` is no guide here: after clocks go back, a window can open a
        second time the same night."""
        local = now.astimezone(self.zone)
        wall = local.replace(tzinfo=None)
        start, length = self._span_us
        into_day = (((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000
                    + local.microsecond)
        day, weekday = local.date(), local.weekday()
        if self.contains(now):
            if not (weekday in self.days and start <= into_day < start + length):
                day -= timedelta(days=1)  # it opened yesterday
            edge_wall = self._opening(day) + self.length
        else:
            edge_wall = next(opening for opening in (
                self._opening(day + timedelta(days=ahead)) for ahead in range(8)
                if (weekday + ahead) % 7 in self.days) if opening > wall)
        edge = now + (edge_wall - wall)
        offset = local.utcoffset()
        is_open = self.contains(now)
        if (edge.astimezone(self.zone).utcoffset() == offset
                and self.contains(edge) is not is_open
                and self.contains(edge - timedelta(microseconds=1)) is is_open):
            return edge
        if offset is not None and not offset % timedelta(minutes=1):
            return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        return now

    def next_open(self, dt: datetime) -> datetime:
        """``dt`` if the window is open then, else the next time it opens (aware, UTC)."""
        if self.contains(dt):
            return _utc(dt) if dt.tzinfo is None else dt
        zone = self.zone
        utc = _utc(dt)
        local_day = utc.astimezone(zone).date()
        for ahead in range(9):
            day = local_day + timedelta(days=ahead)
            if day.weekday() not in self.days:
                continue
            # Wall-clock time in the zone; a time skipped by DST resolves like ``fold=0`` does.
            opening = self._opening(day).replace(tzinfo=zone).astimezone(UTC)
            if opening > utc:
                return opening
        raise AssertionError("unreachable: a window opens at least once a week")


# -- cron ------------------------------------------------------------------------------------

_CRON_HELP = ('5 fields, minute hour day-of-month month day-of-week, in UTC; '
              'e.g. "0 3 * * MON" or "30 2 1 * *"')
# A fixed reference so validation does not depend on the wall clock.
_CRON_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)


def _trigger(expr: str) -> CronTrigger:
    if not isinstance(expr, str):
        raise ValueError(f"a cron schedule must be a string ({_CRON_HELP})")
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f'"{expr}" is not a cron schedule: it has {len(fields)} field(s), '
                         f'cron needs {_CRON_HELP}')
    if any(ch.isdigit() for ch in fields[4]):
        # APScheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0: a number
        # would silently shift the schedule by a day, so only names are accepted.
        raise ValueError(f'"{expr}" is not a cron schedule: write the day-of-week field with '
                         'names (MON, TUE, ..., SUN, e.g. MON-FRI), not numbers, which mean '
                         'different days in different cron dialects')
    try:
        return CronTrigger.from_crontab(expr, timezone=UTC)
    except Exception as exc:  # APScheduler raises ValueError, and worse on odd input
        raise ValueError(f'"{expr}" is not a cron schedule ({exc}); cron needs {_CRON_HELP}'
                         ) from None


def validate_cron(expr: str) -> None:
    """Raise ``ValueError`` (saying why, with an example) unless ``expr`` is a usable schedule.

    Usable means five fields APScheduler accepts, weekday names rather than numbers, and at
    least one fire time (``0 0 31 2 *`` never fires).
    """
    trigger = _trigger(expr)
    if trigger.get_next_fire_time(None, _CRON_REFERENCE) is None:
        raise ValueError(f'"{expr}" never fires (no date matches it)')


@lru_cache(maxsize=1024)
def _known_trigger(expr: str) -> CronTrigger:
    """``_trigger``, built once per expression: the due gate asks for every credential."""
    return _trigger(expr)


def next_cron(expr: str, after: datetime) -> datetime:
    """The first fire time of ``expr`` strictly after ``after``, in UTC.

    Strictly: a rotation that finished exactly at a fire time must not be due again at once.
    """
    start = _utc(after) + timedelta(microseconds=1)
    trigger = _known_trigger(expr) if isinstance(expr, str) else _trigger(expr)
    fire = trigger.get_next_fire_time(None, start)
    if fire is None:
        raise ValueError(f'"{expr}" never fires after {_show(after)}')
    return _utc(fire)


def longest_gap(expr: str, fires: int = 400) -> timedelta:
    """The longest time between two fires of ``expr`` over its next ``fires`` fires from a
    fixed reference (a year of daily fires): what a key must outlive under that schedule."""
    at = next_cron(expr, _CRON_REFERENCE)
    longest = timedelta(0)
    for _ in range(fires):
        nxt = next_cron(expr, at)
        longest = max(longest, nxt - at)
        at = nxt
    return longest


# -- jitter ----------------------------------------------------------------------------------


def jitter_offset(credential: str, due: datetime, jitter: timedelta) -> timedelta:
    """A delay in ``[0, jitter)`` that depends only on ``credential`` and ``due``.

    Hashing instead of drawing at random keeps the offset stable across restarts and replicas
    (a restart must not move a due time), while credentials due at the same instant, and the
    same credential on successive due times, land at different offsets.
    """
    if jitter <= timedelta(0):
        return timedelta(0)
    return _jitter_offset(credential, _utc(due), jitter)


@lru_cache(maxsize=32768)
def _jitter_offset(credential: str, due: datetime, jitter: timedelta) -> timedelta:
    """``jitter_offset``, remembered: a credential's due time changes once per rotation, and
    the due gate asks for every credential on every scrape (a SHA-256 each)."""
    total = jitter // timedelta(microseconds=1)
    digest = hashlib.sha256(f"{credential}\0{_utc(due).isoformat()}".encode()).digest()
    value = int.from_bytes(digest[:8], "big")
    if total >= 2_000_000:  # whole seconds keep due times readable
        return timedelta(seconds=value % (total // 1_000_000))
    return timedelta(microseconds=value % total)


# -- the due-check chain ---------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    """What the due check needs to know about one credential, and nothing else."""

    credential: str
    interval: timedelta | None
    cron: str | None
    window: Window | None
    jitter: timedelta
    manual_only: bool = False

    def describe(self) -> str:
        """``interval 30d`` / ``schedule "0 3 * * MON"``, plus the window, for messages."""
        if self.manual_only:
            what = "manual only"
        elif self.cron is not None:
            what = f'schedule "{self.cron}"'
        elif self.interval is not None:
            what = f"interval {format_duration(self.interval)}"
        else:
            what = "no schedule"
        if self.window is not None:
            what += f", window {self.window}"
        return what


@dataclass(frozen=True)
class Decision:
    """The outcome of the due check: whether to rotate now, a stable reason code, and why."""

    due: bool
    reason: str
    """One of :data:`REASONS`."""
    _message: str | Callable[[], str] = field(repr=False, compare=False)
    due_at: datetime | None

    @property
    def message(self) -> str:
        """Why, for people. Written only when asked: ``/metrics`` decides for every credential
        on every scrape and needs only the reason code."""
        return self._message() if callable(self._message) else self._message


def _base_due(schedule: ScheduleSpec, last_rotated_at: datetime | None,
              first_seen_at: datetime) -> datetime:
    """The due time before jitter and window: last rotation + interval, or next cron fire."""
    if last_rotated_at is None:
        return _utc(first_seen_at)
    if schedule.cron is not None:
        return next_cron(schedule.cron, last_rotated_at)
    if schedule.interval is not None:
        return _utc(last_rotated_at) + schedule.interval
    raise ValueError(f"{schedule.credential}: neither interval nor schedule is set")


def _jittered_due(schedule: ScheduleSpec, last_rotated_at: datetime | None,
                  first_seen_at: datetime) -> datetime:
    base = _base_due(schedule, last_rotated_at, first_seen_at)
    return base + jitter_offset(schedule.credential, base, schedule.jitter)


def compute_next_due(schedule: ScheduleSpec, last_rotated_at: datetime | None,
                     first_seen_at: datetime, now: datetime) -> datetime:
    """When the daemon will next start a scheduled rotation of this credential (UTC).

    Base due time (last rotation + interval, the next cron fire after it, or ``first_seen_at``
    for a credential never rotated: those are the keys most in need of it), plus the
    credential's jitter, pushed to the next opening of the window. A due time already passed
    stays in the past (the credential is overdue) unless the window is closed ``now``, in
    which case it becomes the window's next opening: the earliest moment it can really start.

    Raises ``ValueError`` for a ``manual_only`` credential, which is never due by schedule.
    """
    if schedule.manual_only:
        raise ValueError(f"{schedule.credential}: manual-only credentials are never due")
    return _windowed(schedule, _jittered_due(schedule, last_rotated_at, first_seen_at), now)


def _windowed(schedule: ScheduleSpec, due: datetime, now: datetime) -> datetime:
    """``due`` pushed to the window's next opening (see ``compute_next_due``)."""
    if schedule.window is not None:
        due = schedule.window.next_open(due)
        if due <= _utc(now) and not schedule.window.contains(now):
            due = schedule.window.next_open(now)
    return _utc(due)


@dataclass(frozen=True)
class _Facts:
    schedule: ScheduleSpec
    last_rotated_at: datetime | None
    first_seen_at: datetime
    now: datetime
    rotating: bool
    retry_at: datetime | None
    grace: GraceWait | None
    due: datetime
    """The due time before the window (unused, and the earliest time, for manual-only)."""


def _check_rotating(f: _Facts) -> Decision | None:
    if f.rotating:
        return Decision(False, ROTATING, "a rotation is in progress", None)
    return None


def _check_manual_only(f: _Facts) -> Decision | None:
    if f.schedule.manual_only:
        return Decision(False, MANUAL_ONLY, "never rotated by schedule: the provider cannot "
                        "create keys; use rotator rotate-now --revoke-first", None)
    return None


def _check_in_grace(f: _Facts) -> Decision | None:
    if f.grace is None:
        return None
    g = f.grace

    def why() -> str:
        if g.failed_attempts:
            what = (f"revoking old key {g.key_id} (rotation {g.rotation_id}) failed "
                    f"{g.failed_attempts} time(s), next try {_show(g.until)}")
        elif g.quiet_for is not None:
            what = (f"old key {g.key_id} (rotation {g.rotation_id}) is revoked once the "
                    f"provider's usage shows it unused for {format_duration(g.quiet_for)}, at "
                    f"the latest at {_show(g.until)}")
        else:
            what = (f"old key {g.key_id} (rotation {g.rotation_id}) is in its grace until "
                    f"{_show(g.until)}")
        return f"{what}; the next rotation waits for its revocation"

    return Decision(False, IN_GRACE, why, _utc(g.until))


def _check_retry_backoff(f: _Facts) -> Decision | None:
    if f.retry_at is None or _utc(f.retry_at) <= f.now:
        return None
    retry_at = _utc(f.retry_at)
    return Decision(False, RETRY_BACKOFF, lambda: "the last scheduled attempt failed: retrying "
                    f"{_show(retry_at)}", retry_at)


def _check_never_rotated(f: _Facts) -> Decision | None:
    if f.last_rotated_at is not None:
        return None
    due = f.due
    if due > f.now:
        return None
    return Decision(True, NEVER_ROTATED, lambda: f"never rotated by rotator (known since "
                    f"{_show(f.first_seen_at)}): due since {_show(due)}", due)


def _check_interval_elapsed(f: _Facts) -> Decision | None:
    if f.last_rotated_at is None or f.schedule.cron is not None:
        return None
    due, last = f.due, f.last_rotated_at
    if due > f.now:
        return None
    return Decision(True, INTERVAL_ELAPSED, lambda: f"{f.schedule.describe()} elapsed since the "
                    f"last rotation at {_show(last)}: due since {_show(due)}", due)


def _check_schedule_reached(f: _Facts) -> Decision | None:
    if f.last_rotated_at is None or f.schedule.cron is None:
        return None
    due = f.due
    if due > f.now:
        return None
    return Decision(True, SCHEDULE_REACHED, lambda: f"{f.schedule.describe()} reached: due "
                    f"since {_show(due)}", due)


_CHAIN: tuple[Callable[[_Facts], Decision | None], ...] = (
    _check_rotating, _check_manual_only, _check_in_grace, _check_retry_backoff,
    _check_never_rotated, _check_interval_elapsed, _check_schedule_reached,
)


@dataclass(frozen=True)
class GraceWait:
    """The earliest old key of a credential still waiting for its revocation."""

    until: datetime
    """When its grace ends (or its failed revocation is next retried)."""
    key_id: str
    rotation_id: str
    failed_attempts: int = 0
    quiet_for: timedelta | None = None
    """Set for ``revoke_when = "quiet"``: revoked sooner, once unused this long."""


def _outside_window(decision: Decision, window: Window, now: datetime) -> Decision:
    """A due credential whose window is closed: due when it next opens."""
    opens = window.next_open(now)
    return Decision(False, OUTSIDE_WINDOW, lambda: f"{decision.message}; waiting for the "
                    f"window {window}, which opens {_show(opens)}", opens)


def decide(schedule: ScheduleSpec, last_rotated_at: datetime | None, first_seen_at: datetime,
           now: datetime, rotating: bool, retry_at: datetime | None = None,
           grace: GraceWait | None = None) -> Decision:
    """Should a scheduled rotation of this credential start at ``now``? First check wins.

    The one place that decides: the scheduler, the engine, ``status``, ``plan`` and the metrics
    all ask it. The chain: ``rotating`` (one at a time), ``manual_only`` (never by schedule),
    ``in_grace`` (an old key still awaits its revocation: a next key now would make three live
    keys, more than some services allow), ``retry_backoff`` (a failed scheduled attempt waits
    until ``retry_at``), then the three ways time can be up (``never_rotated``,
    ``interval_elapsed``, ``schedule_reached``); a credential whose time is up but whose window
    is closed gets ``outside_window`` with the next opening as ``due_at``; otherwise
    ``not_due`` with the next due time.

    The answer is remembered per credential until the first moment it can change (its due
    time, retry time, or its window opening or closing) or any argument but ``now`` changes:
    ``/metrics`` asks for every credential on every scrape, and almost every answer is the
    same as the last one.
    """
    now = _utc(now)
    key = (schedule, last_rotated_at, first_seen_at, rotating, retry_at, grace)
    hit = _memo.get(schedule.credential)
    if hit is not None and hit[2] <= now and (hit[3] is None or now < hit[3]) \
            and hit[0] == key:
        return hit[1]
    decision, until = _decide(schedule, last_rotated_at, first_seen_at, now, rotating,
                              retry_at, grace)
    if len(_memo) >= _MEMO_MAX:
        _memo.clear()  # only names of long-gone policies could fill it
    _memo[schedule.credential] = (key, decision, now, until)
    return decision


_MEMO_MAX = 200_000
_memo: dict[str, tuple[tuple[object, ...], Decision, datetime, datetime | None]] = {}
"""credential -> (every argument but ``now``, the decision, valid from, valid until (None:
for ever)). Entries are replaced whole, so threads need no lock."""


def _decide(schedule: ScheduleSpec, last_rotated_at: datetime | None, first_seen_at: datetime,
            now: datetime, rotating: bool, retry_at: datetime | None,
            grace: GraceWait | None) -> tuple[Decision, datetime | None]:
    """:func:`decide` (``now`` aware UTC), and the first moment after ``now`` at which its
    answer may differ (None: not before an argument changes). Between ``now`` and then no
    check of the chain changes its mind: ``due <= now`` and ``retry_at <= now`` stay true once
    true, the other way round stay false until that time, and the window's state is the
    same until its next edge."""
    due = (datetime.min.replace(tzinfo=UTC) if schedule.manual_only
           else _jittered_due(schedule, last_rotated_at, first_seen_at))
    facts = _Facts(schedule, last_rotated_at, first_seen_at, now, rotating, retry_at, grace, due)
    for check in _CHAIN:
        decision = check(facts)
        if decision is None:
            continue
        if decision.reason == RETRY_BACKOFF:
            return decision, decision.due_at
        if not decision.due:
            return decision, None  # rotating, manual_only, in_grace: not a matter of time
        window = schedule.window
        if window is None:
            return decision, None
        if not window.contains(now):
            return _outside_window(decision, window, now), window.unchanged_until(now)
        return decision, window.unchanged_until(now)
    windowed = _windowed(schedule, due, now)
    what = "first rotation" if last_rotated_at is None else "next rotation"
    return Decision(False, NOT_DUE, lambda: f"{what} {_show(windowed)} ({schedule.describe()})",
                    windowed), due
