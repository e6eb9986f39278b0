"""The per-provider pacer, on an injected clock: no test here sleeps."""

from __future__ import annotations

import itertools
import logging

import pytest

from rotator.pacing import Pacer, Ticket


class Clock:
    """A monotonic clock that only moves when told, and a ``pause`` that moves it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.paused: list[float] = []

    def __call__(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.paused.append(seconds)
        self.now += seconds


def _pacer(clock: Clock, **kwargs: float) -> Pacer:
    return Pacer("openai", clock=clock, **kwargs)


def _accept(pacer: Pacer, clock: Clock, n: int, over: float) -> None:
    """``n`` calls answered evenly over ``over`` seconds, none throttled."""
    for _ in range(n):
        pacer.succeeded(pacer.acquire(clock.pause))
        clock.now += over / n


def test_not_paced_until_throttled() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    for _ in range(100):
        ticket = pacer.acquire(clock.pause)
        assert ticket.waited == 0
        pacer.succeeded(ticket)
    assert clock.paused == [] and pacer.rate is None and pacer.throttles == 0


def test_a_throttle_paces_just_under_what_was_let_through() -> None:
    clock = Clock()
    pacer = _pacer(clock, beta=0.9)
    _accept(pacer, clock, 50, over=1.0)  # the provider let 50 through in the last second
    pacer.throttled(Ticket(clock.now, 0), None)
    assert pacer.rate == pytest.approx(45, rel=0.01)
    assert pacer.throttles == 1
    sent = [pacer.acquire(clock.pause).sent_at for _ in range(10)]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g == pytest.approx(1 / 45, rel=0.05) for g in gaps)  # climbing a little


def test_retry_after_holds_every_worker() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    _accept(pacer, clock, 10, over=1.0)
    throttled_at = clock.now
    pacer.throttled(Ticket(clock.now, 0), retry_after=2.0)
    other_worker = pacer.acquire(clock.pause)  # a worker that was not told anything
    assert other_worker.sent_at >= throttled_at + 2.0
    assert other_worker.waited == pytest.approx(2.0)


def test_retry_after_is_capped() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    pacer.throttled(Ticket(clock.now, 0), retry_after=3600)
    assert pacer.acquire(clock.pause).waited == pytest.approx(60)


def test_one_decrease_per_round_of_calls() -> None:
    """Calls already on the wire when the rate dropped come back 429 too: they do not drop
    it again (else a burst of 64 throttles would take it to the floor)."""
    clock = Clock()
    pacer = _pacer(clock, beta=0.9)
    _accept(pacer, clock, 40, over=1.0)
    in_flight = [Ticket(clock.now - 0.05, 0) for _ in range(30)]
    pacer.throttled(in_flight[0], None)
    rate = pacer.rate
    for ticket in in_flight[1:]:
        pacer.throttled(ticket, None)
    assert pacer.rate == pytest.approx(rate)
    assert pacer.throttles == 30
    # A call sent after the decrease that is throttled again does lower it.
    later = pacer.acquire(clock.pause)
    clock.now += 0.1
    pacer.throttled(later, None)
    assert pacer.rate is not None and rate is not None and pacer.rate < rate


def test_late_successes_of_the_same_round_raise_the_estimate() -> None:
    clock = Clock()
    pacer = _pacer(clock, beta=0.9)
    _accept(pacer, clock, 20, over=0.5)
    first = Ticket(clock.now - 0.1, 0)
    pacer.throttled(first, None)
    low = pacer.rate
    _accept(pacer, clock, 30, over=0.1)  # the rest of that round's successes come in
    pacer.throttled(Ticket(first.sent_at, 0), None)
    assert low is not None and pacer.rate is not None and pacer.rate > low


def test_rate_climbs_back_cubically_then_probes_above() -> None:
    clock = Clock()
    pacer = _pacer(clock, beta=0.9, growth=0.4)
    _accept(pacer, clock, 50, over=1.0)
    pacer.throttled(Ticket(clock.now, 0), None)
    start = clock.now
    assert pacer.rate == pytest.approx(45, rel=0.01)
    k = ((50 - 45) / 0.4) ** (1 / 3)
    clock.now = start + k / 2
    halfway = pacer.rate
    assert halfway is not None and 45 < halfway < 50
    clock.now = start + k
    assert pacer.rate == pytest.approx(50, rel=0.01)  # back at the limit last seen, flat
    clock.now = start + k + 5
    probing = pacer.rate
    assert probing is not None and probing > 90  # long quiet: probing well above


def test_rate_never_drops_under_the_floor() -> None:
    clock = Clock()
    pacer = _pacer(clock, min_rate=0.5)
    for _ in range(5):
        ticket = pacer.acquire(clock.pause)
        clock.now += 1
        pacer.throttled(ticket, None)
    assert pacer.rate == pytest.approx(0.5)


def test_a_waiting_caller_takes_a_new_turn_when_a_throttle_changes_the_plan() -> None:
    clock = Clock()
    pacer = _pacer(clock, beta=0.9)
    _accept(pacer, clock, 10, over=1.0)
    pacer.throttled(Ticket(clock.now, 0), None)  # paced at 9/s
    pacer.acquire(clock.pause)
    waits: list[float] = []

    def pause_and_throttle(seconds: float) -> None:
        waits.append(seconds)
        clock.now += seconds
        if len(waits) == 1:  # meanwhile, another worker's call is refused, Retry-After 1 s
            pacer.throttled(Ticket(clock.now - 0.01, 0), retry_after=1.0)

    throttled_at = clock.now + 1 / 9
    ticket = pacer.acquire(pause_and_throttle)
    assert len(waits) == 2, "it waited for its turn, then again for the new plan"
    assert ticket.sent_at >= throttled_at + 1.0


def test_a_pause_that_raises_ends_the_wait() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    pacer.throttled(Ticket(clock.now, 0), retry_after=5)

    def stopping(seconds: float) -> None:
        raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        pacer.acquire(stopping)


def test_one_log_line_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    pacer = _pacer(clock, quiet=30)
    caplog.set_level(logging.INFO, "rotator.pacing")
    for _ in range(3):
        for _ in range(20):
            ticket = pacer.acquire(clock.pause)
            clock.now += 0.05
            pacer.throttled(ticket, 0.1)
            pacer.succeeded(pacer.acquire(clock.pause))
        clock.now += 5  # still inside the episode
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rate limiting (429)" in warnings[0].getMessage()
    clock.now += 31
    pacer.succeeded(pacer.acquire(clock.pause))
    [ended] = [r for r in caplog.records if r.levelno == logging.INFO]
    assert "episode is over (60 calls refused" in ended.getMessage()
    pacer.throttled(pacer.acquire(clock.pause), None)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_aws_throttles_are_rate_limits_and_other_failures_are_not():
    """AWS says "too fast" with codes, not always a 429: those pace the provider too."""
    from botocore.exceptions import ClientError

    from rotator.aws import transient
    from rotator.errors import RateLimited, TransientError

    def answer(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "CreateAccessKey")

    assert isinstance(transient(answer("Throttling", 400), "x"), RateLimited)
    assert isinstance(transient(answer("TooManyRequestsException", 429), "x"), RateLimited)
    unavailable = transient(answer("ServiceUnavailable", 503), "x")
    assert isinstance(unavailable, TransientError) and not isinstance(unavailable, RateLimited)
