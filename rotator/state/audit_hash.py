"""The audit trail's hash recipe, in one place: what ``rotator.audit`` computes and checks, and
what the state store has PostgreSQL compute in the statement that appends an event.

``hash = sha256(prev_hash + canonical JSON of the event's other fields)``, ``prev_hash`` being
the hash of the event before it (``""`` for the first).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

__all__ = ["canonical", "event_hash", "hash_parts", "iso_utc"]


def iso_utc(value: datetime | None) -> str | None:
    """A time as the chain hashes it: UTC, ISO 8601, ``Z``."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
"""One encoder for every event (``json.dumps`` with options builds one per call)."""


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: one text per value, on every replica."""
    return _CANONICAL.encode(value)


def _hashed_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "at": iso_utc(row["at"]),
        "kind": row["kind"],
        "credential": row["credential"],
        "rotation_id": row["rotation_id"],
        "actor": row["actor"],
        "reason": row["reason"],
        "detail": row["detail"],
    }


def event_hash(row: dict[str, Any]) -> str:
    """The hash an event row must carry, from its fields and its ``prev_hash``."""
    return hashlib.sha256((row["prev_hash"] + canonical(_hashed_fields(row))).encode()
                          ).hexdigest()


_ID_MARK = "\x00id\x00"


def hash_parts(row: dict[str, Any]) -> tuple[str, str]:
    """``event_hash`` split around the event id, for a store that numbers and chains events
    itself (PostgreSQL, in one statement): for any id,
    ``event_hash(row) == sha256(row["prev_hash"] + before + str(row["id"]) + after)``."""
    key = f'"id":{canonical(_ID_MARK)}'
    before, found, after = canonical({**_hashed_fields(row), "id": _ID_MARK}).partition(key)
    assert found, "the id must be a top-level key of the hashed fields"
    return before + '"id":', after
