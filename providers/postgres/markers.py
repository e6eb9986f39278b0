"""The rotator line in a PostgreSQL role's comment: which rotation's password the role holds.

The postgres provider writes the line in the same transaction as the password, so it tells a
role's current password from an older one without ever reading a password. Its forms:

- ``rotator:<rotation id> seq=<n>``: the role holds that rotation's password (``seq``, one more
  than the highest of the credential's roles, orders rotations without trusting clocks; a
  ``single`` credential's marker has none);
- ``rotator:adopted seq=<n>``: the role holds a password rotator found in use;
- ``rotator-revoked:<rotation id>``: ``revoke`` scrambled that rotation's password.

Any other text in the comment is the operator's and is kept. Key ids are ``<role>@<rotation id>``
(``<role>@adopted`` for a password rotator did not set).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ADOPTED",
    "Marker",
    "RoleState",
    "live_marker",
    "next_seq",
    "revoked_marker",
    "split_key_id",
    "with_marker",
]

ADOPTED = "adopted"
"""The rotation part of the key id of a password rotator did not set."""
_MARKER = re.compile(r"^rotator:(?P<rid>\S+?)(?: seq=(?P<seq>\d+))?$")
_ANY_MARKER = re.compile(r"^rotator(?:-revoked)?:\S+")


@dataclass(frozen=True)
class Marker:
    """What a role's comment says about its password."""

    rid: str
    """The rotation whose password the role holds (``adopted`` for one rotator found there)."""
    seq: int


@dataclass(frozen=True)
class RoleState:
    """A role as read from ``pg_roles``: its name and comment."""

    name: str
    comment: str | None

    @property
    def marker(self) -> Marker | None:
        """The role's live ``rotator:`` marker; None if it has none (or was revoked)."""
        for line in reversed((self.comment or "").splitlines()):
            if _ANY_MARKER.match(line):
                found = _MARKER.match(line)
                if found is None:
                    return None  # the last rotator line says revoked
                return Marker(found["rid"], int(found["seq"] or 0))
        return None

    @property
    def revoked(self) -> bool:
        return self.marker is None and any(
            line.startswith("rotator-revoked:") for line in (self.comment or "").splitlines())


def live_marker(rid: str, seq: int | None = None) -> str:
    """The line saying a role holds rotation ``rid``'s password (``seq`` for ``alternating``)."""
    return f"rotator:{rid}" + (f" seq={seq}" if seq is not None else "")


def revoked_marker(rid: str) -> str:
    """The line saying ``revoke`` scrambled rotation ``rid``'s password."""
    return f"rotator-revoked:{rid}"


def next_seq(states: Iterable[RoleState]) -> int:
    """One more than the highest ``seq`` among the credential's roles (1 if none has one)."""
    return 1 + max((s.marker.seq for s in states if s.marker), default=0)


def with_marker(comment: str | None, marker: str) -> str:
    """``comment`` with its rotator line replaced by ``marker``; other text is kept."""
    kept = [line for line in (comment or "").splitlines() if not _ANY_MARKER.match(line)]
    return "\n".join([*kept, marker])


def split_key_id(key_id: str) -> tuple[str | None, str]:
    """``(role, rotation id)`` of ``<role>@<rotation id>``; ``(None, key_id)`` without ``@``."""
    role, sep, rid = key_id.rpartition("@")
    return (role, rid) if sep and role else (None, key_id)
