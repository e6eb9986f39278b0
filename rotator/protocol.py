"""The rotation protocol's state machine, in one table: where each step leads.

The engine walks this table and nowhere else decides the order of steps. A step runs, then
either produces its result (the engine records it and moves to ``on_success``, or to a named
``branches`` entry the step chose) or fails (the engine records the failure and moves to
``on_failure``; ``None`` means the step stays where it is and is retried later: a clean-up
that could not finish). Two phases follow the steps: ``revoke`` (old keys are revoked as their
grace periods end, then the rotation is done) and ``done``.

    prepare --> create --> verify --> store --> health --> grace --> revoke --> done
       \\--(revoke_first)--> revoke_first --^         any failure --> rollback --> done
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

__all__ = ["PHASES", "PROTOCOL", "STEPS", "OldKeyRevocation", "Produced", "Transition"]


@dataclass(frozen=True)
class Transition:
    on_success: str
    on_failure: str | None
    failure_outcome: str = "failed"
    """The rotation's outcome when this step fails (a failed health check rolls back)."""
    branches: Mapping[str, str] = field(default_factory=dict)
    """Other successors the step may choose by name."""

    def next(self, branch: str | None) -> str:
        if branch is None:
            return self.on_success
        try:
            return self.branches[branch]
        except KeyError:
            raise ValueError(f"no branch {branch!r} here: {sorted(self.branches)}") from None


PROTOCOL: Mapping[str, Transition] = MappingProxyType({
    "prepare": Transition("create", "rollback", branches={"revoke_first": "revoke_first"}),
    "revoke_first": Transition("create", "rollback", branches={"nothing_to_create": "revoke"}),
    "create": Transition("verify", "rollback"),
    "verify": Transition("store", "rollback"),
    "store": Transition("health", "rollback"),
    "health": Transition("grace", "rollback", failure_outcome="rolled_back"),
    "grace": Transition("revoke", "rollback"),
    "rollback": Transition("done", None),
})
"""Every step the engine runs, and where it leads."""

STEPS = tuple(PROTOCOL)
PHASES = ("revoke", "done")
"""States after the steps: not run by the step loop (revocations record their own rows)."""


@dataclass(frozen=True)
class OldKeyRevocation:
    """An old key to revoke once its grace period ends (the grace step schedules it)."""

    key_id: str
    vault_version: str | None
    not_before: datetime


@dataclass(frozen=True)
class Produced:
    """What a step produced. The engine records all of it in the step's transition (one
    transaction): the rotation's fields, the credential's, an old key's revocation to
    schedule; and moves to the branch the step chose, if any. Steps never write the store."""

    fields: dict[str, Any] = field(default_factory=dict)
    branch: str | None = None
    credential: dict[str, Any] = field(default_factory=dict)
    """Fields of the credential's row (its current key, last outcome, next due time)."""
    revocation: OldKeyRevocation | None = None
