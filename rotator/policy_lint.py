"""Questionable but valid policies: warnings ``rotator check`` prints (``--strict`` makes them
errors) and the daemon logs at start.

A policy file that loads is one rotator can run; these are the settings an operator most likely
did not mean: an interval short enough to be a test value left in, a grace period that outlasts
the interval (the next rotation then waits for it, so keys live longer than the policy says).
"""

from __future__ import annotations

from datetime import timedelta

from rotator.config import Policies, Problem, format_key
from rotator.durations import format_duration

__all__ = ["MIN_INTERVAL", "policy_warnings"]

MIN_INTERVAL = timedelta(hours=1)
"""Shorter intervals are test settings: providers rate-limit key creation, and every agent
reloads its key that often."""


def policy_warnings(policies: Policies) -> list[Problem]:
    """Each questionable setting, as a problem at the credential's entry."""
    out: list[Problem] = []
    file = str(policies.source)
    for i, cred in enumerate(policies.credentials):
        def warn(key: str, message: str, i: int = i, line: int = cred.line) -> None:
            out.append(Problem(file, line or None, format_key(("credentials", i, key)),
                               message))

        interval = cred.interval
        if interval is None:
            continue
        if interval < MIN_INTERVAL:
            warn("interval", f"interval {format_duration(interval)} is under "
                             f"{format_duration(MIN_INTERVAL)}: a test setting left in? "
                             "Providers rate-limit key creation, and the agent reloads its key "
                             "that often")
        if cred.grace >= interval:
            warn("grace", f"grace {format_duration(cred.grace)} is not shorter than interval "
                          f"{format_duration(interval)}: each rotation waits for the last old "
                          "key's revocation (reason in_grace), so keys live longer than the "
                          "interval; make grace shorter")
    return out
