"""The misuse rules, as pure functions of one credential's stored usage: what fired and why.

Nothing here calls a provider or writes anything; :mod:`rotator.monitor.poller` feeds it the
buckets it stored and acts on what it returns. Each :class:`Finding` carries a *subject* that
says what it fired on (a key, a day), so the same anomaly is recorded and acted on once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rotator.config import CredentialConfig, DailyCapRule, OutsideRule, SpikeRule
from rotator.key_usage import KeyHistory
from rotator.state.models import KeyUsage

__all__ = ["Finding", "evaluate", "switched_at", "used"]

DAY = timedelta(days=1)


@dataclass(frozen=True)
class Finding:
    rule: str
    subject: str
    key_id: str | None
    action: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="minutes").replace("+00:00", "Z")


def used(row: KeyUsage) -> bool:
    """Whether the bucket shows any use (requests, or tokens where no requests are counted)."""
    return (row.requests or 0) > 0 or (row.tokens or 0) > 0


def _use(row: KeyUsage) -> str:
    return (f"{row.requests} request(s)" if row.requests is not None
            else f"{row.tokens or 0} token(s)")


def _ends(row: KeyUsage) -> datetime:
    return row.start + timedelta(seconds=row.width)


def switched_at(history: KeyHistory, rows: Iterable[KeyUsage]) -> datetime | None:
    """When the agent was known to be on the key that replaced ``history``'s: the health check
    proved it, the replacement's first use was over, or the key was revoked, whichever came
    first. None while nothing shows it (an agent slow to reload is not misuse)."""
    times = [t for t in (history.proven_at, history.revoked_at) if t is not None]
    if history.replaced_by is not None and history.replaced_at is not None:
        # The bucket of the first use may begin before the switch (the agent's last calls on
        # the old key and first on the new share it): count from its end.
        first = min((_ends(r) for r in rows if r.key_id == history.replaced_by
                     and used(r) and _ends(r) > history.replaced_at), default=None)
        if first is not None:
            times.append(first)
    return min(times, default=None)


def evaluate(cred: CredentialConfig, keys: Mapping[str, KeyHistory],
             hourly: list[KeyUsage], minute: list[KeyUsage], now: datetime,
             fired_recently: set[str]) -> list[Finding]:
    """Every rule of ``cred`` that fires on its keys' buckets (``hourly`` for a day's figures,
    ``minute`` where polled finer, for keys just replaced). ``fired_recently``: rules that fired
    on this credential within the last day (a spike is one incident, not one a poll)."""
    assert cred.misuse is not None
    rules = cred.misuse.active()
    found: list[Finding] = []
    spike = rules.get("spike")
    if isinstance(spike, SpikeRule) and "spike" not in fired_recently:
        found.extend(_spike(cred, spike, hourly, now))
    outside = rules.get("outside")
    if isinstance(outside, OutsideRule):
        found.extend(_outside(cred, outside, hourly, now))
    old_key = rules.get("old_key")
    if old_key is not None:
        found.extend(_old_key(cred, old_key.action, keys, hourly, minute))
    cap = rules.get("daily_cap")
    if isinstance(cap, DailyCapRule):
        found.extend(_daily_cap(cred, cap, hourly, now))
    return found


def _spike(cred: CredentialConfig, rule: SpikeRule, hourly: list[KeyUsage],
           now: datetime) -> list[Finding]:
    """The last 24 hours against the mean day before them (over the days with records, at
    most ``baseline_days``), for the credential's keys together."""
    recent_from, base_from = now - DAY, now - DAY - rule.baseline_days * DAY
    recent = [r for r in hourly if r.start >= recent_from]
    base = [r for r in hourly if base_from <= r.start < recent_from and used(r)]
    if not base:
        return []  # no habit known yet: only a cap can judge a new agent
    first = min(r.start for r in base)
    days = min(rule.baseline_days, max(1, math.ceil((recent_from - first) / DAY)))
    figures: dict[str, Any] = {"baseline_days": days, "factor": rule.factor}
    for what in ("requests", "tokens"):
        now_total = sum(getattr(r, what) or 0 for r in recent)
        per_day = sum(getattr(r, what) or 0 for r in base) / days
        figures[f"{what}_last_24h"] = now_total
        figures[f"{what}_daily_average"] = round(per_day, 1)
    counts_requests = any(r.requests is not None for r in recent + base)
    if counts_requests and figures["requests_last_24h"] < rule.min_requests:
        return []
    if not counts_requests and figures["tokens_last_24h"] < rule.min_tokens:
        return []
    for what in ("requests", "tokens"):
        average = figures[f"{what}_daily_average"]
        total = figures[f"{what}_last_24h"]
        if average > 0 and total > rule.factor * average:
            busiest = max(recent, key=lambda r: (r.requests or 0, r.tokens or 0)).key_id \
                if recent else None
            message = (f"{total} {what} in the last 24h, {total / average:.1f}x the daily "
                       f"average of {average:g} over {days} day(s) (limit {rule.factor:g}x)")
            return [Finding("spike", f"spike:{_iso(now)}", busiest, rule.action, message,
                            figures)]
    return []


def _outside(cred: CredentialConfig, rule: OutsideRule, hourly: list[KeyUsage],
             now: datetime) -> list[Finding]:
    """Use in an hour that starts outside the window: once per key and day (a service that
    reports whole days cannot tell, and ``rotator check`` says so)."""
    found: dict[str, Finding] = {}
    for row in hourly:
        if (row.width > 3600 or row.start < now - DAY or not used(row)
                or rule.window.contains(row.start)):
            continue
        subject = f"{row.key_id}:{row.start.date().isoformat()}"
        if subject not in found:
            message = (f"{_use(row)} in the hour from {_iso(row.start)}, outside "
                       f"{cred.agent}'s window {rule.window}")
            found[subject] = Finding("outside", subject, row.key_id, rule.action, message,
                                     {"requests": row.requests, "tokens": row.tokens,
                                      "bucket": _iso(row.start),
                                      "window": str(rule.window)})
    return list(found.values())


def _old_key(cred: CredentialConfig, action: str, keys: Mapping[str, KeyHistory],
             hourly: list[KeyUsage], minute: list[KeyUsage]) -> list[Finding]:
    """Use of a replaced key in buckets that begin after the agent was seen on its successor:
    someone else holds the old key. Minute buckets where the key was polled that finely."""
    found = []
    for history in keys.values():
        if history.replaced_at is None:
            continue
        def finest(key_id: str | None) -> list[KeyUsage]:
            fine = [r for r in minute if r.key_id == key_id]
            return fine or [r for r in hourly if r.key_id == key_id]

        since = switched_at(history, finest(history.replaced_by))
        if since is None:
            continue
        after = [r for r in finest(history.key_id) if r.start >= since and used(r)]
        if not after:
            continue
        requests = sum(r.requests or 0 for r in after)
        tokens = sum(r.tokens or 0 for r in after)
        last = max(_ends(r) for r in after)
        what = (f"{requests} request(s)" if any(r.requests is not None for r in after)
                else f"{tokens} token(s)")
        message = (f"old key {history.key_id} made {what} after {cred.agent} "
                   f"switched to key {history.replaced_by or '?'} at {_iso(since)} (last use "
                   f"before {_iso(last)}): someone other than {cred.agent} holds it")
        found.append(Finding("old_key", history.key_id, history.key_id, action, message,
                             {"requests": requests, "tokens": tokens,
                              "switched_at": _iso(since),
                              "last_use_before": _iso(last)}))
    return found


def _daily_cap(cred: CredentialConfig, rule: DailyCapRule, hourly: list[KeyUsage],
               now: datetime) -> list[Finding]:
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = [r for r in hourly if r.start >= midnight]
    totals = {"requests": sum(r.requests or 0 for r in today),
              "tokens": sum(r.tokens or 0 for r in today),
              "cost": round(sum(r.cost or 0.0 for r in today), 4)}
    for what in ("requests", "tokens", "cost"):
        cap = getattr(rule, what)
        if cap is not None and totals[what] > cap:
            message = (f"{totals[what]:g} {what} today (UTC), over the daily cap of {cap:g}")
            return [Finding("daily_cap", f"daily_cap:{midnight.date().isoformat()}", None,
                            rule.action, message, {**totals, "cap": cap, "over": what})]
    return []
