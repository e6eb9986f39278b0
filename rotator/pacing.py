"""Pacing each provider's calls to the rate it allows, shared by every worker thread.

A fleet-wide emergency (`rotate-now --all --revoke-first`) runs many rotations at once against
one provider account, whose admin key has a request-rate limit. Without pacing, every worker
fires as fast as it can, most calls come back 429, and each worker backs off on its own: the
provider's rate is wasted in bursts and gaps. A :class:`Pacer` per provider does what
botocore's adaptive retry mode does for AWS, plus what a 429 asks of every caller:

- until the provider first throttles, calls are not paced at all;
- a throttle (429) makes the pacer send at most ``rate`` requests a second, from then on for
  every worker: the rate is set just under what the provider let through in the last
  ``window`` seconds (its limit, when we were over it), at most once per round of calls (a
  throttle of a call sent before the last decrease does not decrease again);
- successes let the rate climb back along a cubic curve (CUBIC, as TCP and botocore): fast
  back to the rate last throttled at, flat around it, then probing above, so a raised limit
  or another client going quiet is found;
- a ``Retry-After`` holds every worker of the provider until then, not only the one told.

Waiting is the caller's: :meth:`Pacer.acquire` sleeps with the ``pause`` it is given (the
engine's fenced, interruptible sleep), so a stopping daemon or a lost lease ends a wait at once.
Time is an injected monotonic ``clock``, so the behaviour is tested without sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Pacer", "Ticket"]

log = logging.getLogger(__name__)

MAX_HOLD = 60.0
"""A ``Retry-After`` longer than this (seconds) is held for this long only."""


@dataclass(frozen=True)
class Ticket:
    """A caller's permission to send: when it was sent (the pacer's clock) and how long the
    caller waited for it."""

    sent_at: float
    waited: float


class Pacer:
    """Paces one provider's calls (thread-safe); see the module docstring.

    ``min_rate`` (requests/s) is the floor the rate never drops under; ``window`` (s) is how
    far back the rate the provider let through is measured; ``beta`` the share of that rate
    paced at after a throttle; ``growth`` the cubic's constant (requests/s per s³); ``quiet``
    (s) without a throttle ends an episode (logged once at its start, once at its end).
    """

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic,
                 min_rate: float = 0.5, window: float = 1.0, beta: float = 0.9,
                 growth: float = 0.4, quiet: float = 30.0) -> None:
        self.name = name
        self.clock = clock
        self.min_rate = min_rate
        self.window = window
        self.beta = beta
        self.growth = growth
        self.quiet = quiet
        self._lock = threading.Lock()
        self._rate_at_decrease: float | None = None
        """The rate set by the last decrease; None: not pacing (never throttled)."""
        self._w_max = 0.0
        """The rate the provider let through when it last throttled: the cubic's plateau."""
        self._decreased_at = float("-inf")
        self._k = 0.0
        self._hold_until = float("-inf")
        self._next_slot = float("-inf")
        self._epoch = 0
        self._accepted: deque[float] = deque()
        self._episode_started: float | None = None
        self._episode_throttles = 0
        self._last_throttle = float("-inf")
        self.throttles = 0
        """Calls the provider refused for its rate limit, since this pacer was made."""

    # -- what callers do -------------------------------------------------------------------------

    def acquire(self, pause: Callable[[float], None]) -> Ticket:
        """Wait (with ``pause``, which may raise to end the wait) until a call may be sent:
        after any ``Retry-After`` hold and in its turn at the paced rate. A waiting caller
        whose turn was planned before a throttle changed the plan takes a new turn."""
        started = self.clock()
        while True:
            with self._lock:
                now = self.clock()
                slot = max(now, self._hold_until)
                rate = self._rate(now)
                if rate is not None:
                    slot = max(slot, self._next_slot)
                    self._next_slot = slot + 1.0 / rate
                epoch = self._epoch
            if slot <= now:
                return Ticket(now, now - started)
            pause(slot - now)  # trusted to have waited that long (it raises to stop)
            with self._lock:
                now = self.clock()
                if self._epoch == epoch:
                    return Ticket(now, now - started)

    def succeeded(self, ticket: Ticket) -> None:
        """The call sent with ``ticket`` got an answer that was not a throttle."""
        with self._lock:
            now = self.clock()
            self._accepted.append(now)
            self._forget(now)
            if self._episode_started is not None and now - self._last_throttle >= self.quiet:
                log.info("%s: no 429 for %.0f s; the rate-limit episode is over (%d calls "
                         "refused in %.0f s), calls now paced at up to %.1f/s", self.name,
                         self.quiet, self._episode_throttles,
                         self._last_throttle - self._episode_started, self._rate(now) or 0.0)
                self._episode_started = None

    def throttled(self, ticket: Ticket, retry_after: float | None) -> None:
        """The call sent with ``ticket`` was refused for the provider's rate limit;
        ``retry_after`` (seconds), if the provider said, holds every caller until then."""
        with self._lock:
            now = self.clock()
            self.throttles += 1
            self._episode_throttles += 1
            self._last_throttle = now
            if retry_after is not None and retry_after > 0:
                hold = now + min(retry_after, MAX_HOLD)
                if hold > self._hold_until:
                    self._hold_until = hold
                    self._replan(now)
            self._forget(now)
            let_through = len(self._accepted) / self.window
            if ticket.sent_at < self._decreased_at:
                # Sent before the last decrease: already answered for. Its round's successes
                # may have been counted late, though: the estimate of the limit only rises.
                if let_through > self._w_max:
                    self._decrease(let_through, self._decreased_at)
                return
            current = self._rate(now)
            self._decrease(let_through if current is None else min(let_through, current), now)
            self._replan(now)
            if self._episode_started is None:
                self._episode_started = now
                self._episode_throttles = 1
                log.warning("%s: the provider is rate limiting (429): pacing its calls at "
                            "%.1f/s for every worker%s", self.name, self._rate(now) or 0.0,
                            f", all holding {retry_after:g} s as it asked" if retry_after
                            else "")

    # -- what operators see ----------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Requests per second calls are paced at now; None while not paced (never throttled)."""
        with self._lock:
            return self._rate(self.clock())

    # -- internals (lock held) -------------------------------------------------------------------

    def _rate(self, now: float) -> float | None:
        if self._rate_at_decrease is None:
            return None
        t = now - self._decreased_at - self._k
        return max(self.min_rate, self._w_max + self.growth * t * t * t)

    def _decrease(self, let_through: float, at: float) -> None:
        """Pace at ``beta`` x ``let_through`` (what the provider let through, its limit as far
        as we can tell) from ``at``, climbing back from there along the cubic."""
        self._w_max = max(let_through, self.min_rate)
        new_rate = max(self.min_rate, self.beta * self._w_max)
        self._rate_at_decrease = new_rate
        self._k = ((self._w_max - new_rate) / self.growth) ** (1 / 3)
        self._decreased_at = at

    def _replan(self, now: float) -> None:
        """Turns planned so far are void: waiting callers take new ones."""
        self._epoch += 1
        self._next_slot = max(now, self._hold_until)

    def _forget(self, now: float) -> None:
        while self._accepted and self._accepted[0] <= now - self.window:
            self._accepted.popleft()
