"""The audit trail: append-only, hash-chained events in the state store.

Each event's ``hash`` is ``sha256(prev_hash + canonical JSON of its other fields)`` with
``prev_hash`` the hash of the event before it (``""`` for the first). Ids are consecutive, so
``verify`` finds where a row was edited (its hash no longer matches), deleted (a gap in ids, or
the next event's ``prev_hash`` pointing at nothing) or moved (``prev_hash`` not the hash of the
event before it). Events carry key ids and rotation ids only, never a secret value.

A chain without a key protects against edits by anyone who does not also recompute every later
hash; anchor it outside the database (ship the export to a SIEM) for more.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rotator.events import RotationFinished, StepFinished, TransactionalListener
from rotator.state.audit_hash import canonical, event_hash, iso_utc
from rotator.state.store import StateStore, append_audit_in

__all__ = ["KINDS", "AuditLog", "VerifyResult", "event_hash"]

log = logging.getLogger("rotator.audit")

KINDS = frozenset({"step", "rotation", "manual", "reload", "failure", "misuse", "proxy",
                   "token"})
_BATCH = 1000
_KEY_STEPS = frozenset({"create", "revoke", "revoke_first", "store", "rollback"})
"""Steps whose audit event names the key ids involved."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    """Events checked (all of them when ``ok``; up to and including the first bad one if not)."""
    first_bad_id: int | None
    problem: str | None


class _AuditListener(TransactionalListener):
    """Records engine events. ``in_tx`` records a step inside the engine's own step
    transaction, so the event and the state change commit together (and a rotation costs
    one write transaction per step, not two)."""

    def __init__(self, audit: AuditLog, actor: str) -> None:
        self.audit = audit
        self.actor = actor

    def __call__(self, event: StepFinished | RotationFinished) -> None:
        if isinstance(event, StepFinished):
            self.audit.record("step", **self.audit._step_fields(event, self.actor))
        else:
            self.audit._on_rotation(event, self.actor)

    def in_tx(self, conn: Any, event: StepFinished) -> None:
        self.audit.record_in(conn, "step", **self.audit._step_fields(event, self.actor))


class AuditLog:
    """Writes, verifies and exports the audit trail of one state store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def record(self, kind: str, *, credential: str | None = None,
               rotation_id: str | None = None, actor: str, reason: str | None = None,
               detail: dict[str, Any], at: datetime | None = None) -> int:
        """Append one event and return its id. ``detail`` must be JSON-able and hold no secret.

        Reading the latest hash and inserting happen in one write transaction, so concurrent
        writers (threads, rotate-now next to a daemon) always form a single chain.
        """
        return self.store.append_audit(self._builder(kind, credential=credential,
                                                     rotation_id=rotation_id, actor=actor,
                                                     reason=reason, detail=detail, at=at))

    def record_many(self, events: list[dict[str, Any]]) -> None:
        """Append several events (each ``record``'s keyword arguments, ``kind`` included) in
        one write transaction: the proxy writes one event per call, in batches."""
        if not events:
            return
        self.store.append_audit_many([self._builder(**fields) for fields in events])

    def record_in(self, conn: Any, kind: str, **fields: Any) -> int:
        """``record`` inside the caller's write transaction ``conn``."""
        return append_audit_in(conn, self._builder(kind, **fields))

    @staticmethod
    def _builder(kind: str, *, credential: str | None = None, rotation_id: str | None = None,
                 actor: str, reason: str | None = None, detail: dict[str, Any],
                 at: datetime | None = None) -> Callable[[int, str], dict[str, Any]]:
        if kind not in KINDS:
            raise ValueError(f"unknown audit event kind {kind!r}")
        when = (at or datetime.now(UTC)).astimezone(UTC)
        detail_text = canonical(detail)

        def build(event_id: int, prev_hash: str) -> dict[str, Any]:
            row = {"id": event_id, "at": when, "kind": kind, "credential": credential,
                   "rotation_id": rotation_id, "actor": actor, "reason": reason,
                   "detail": detail_text, "prev_hash": prev_hash}
            row["hash"] = event_hash(row)
            return row

        return build

    def _rows(self, since: datetime | None = None,
              credential: str | None = None) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            batch = self.store.audit_events(after_id=after, since=since, credential=credential,
                                            limit=_BATCH)
            yield from batch
            if len(batch) < _BATCH:
                return
            after = batch[-1]["id"]

    def verify(self) -> VerifyResult:
        """Recompute the chain in id order; report the first event that breaks it."""
        checked = 0
        last_id = 0
        last_hash = ""
        for row in self._rows():
            checked += 1
            event_id = row["id"]
            problem = None
            if event_id != last_id + 1:
                missing = (f"event {last_id + 1}" if event_id == last_id + 2
                           else f"events {last_id + 1} to {event_id - 1}")
                problem = f"{missing} missing before it (deleted)"
            elif row["prev_hash"] != last_hash:
                problem = (f"its prev_hash is not the hash of event {last_id}" if last_id else
                           "it is the first event but its prev_hash is not empty") + \
                    " (events reordered, or one before it removed or rewritten)"
            elif event_hash(row) != row["hash"]:
                problem = "its contents do not match its hash (edited)"
            if problem is not None:
                return VerifyResult(False, checked, event_id, problem)
            last_id, last_hash = event_id, row["hash"]
        return VerifyResult(True, checked, None, None)

    def export(self, since: datetime | None = None,
               credential: str | None = None) -> Iterator[dict[str, Any]]:
        """Events in id order as JSON-able dicts (ISO times with ``Z``; ``detail`` decoded)."""
        for row in self._rows(since, credential):
            try:
                detail: Any = json.loads(row["detail"])
            except ValueError:
                detail = row["detail"]
            yield {"id": row["id"], "at": iso_utc(row["at"]), "kind": row["kind"],
                   "credential": row["credential"], "rotation_id": row["rotation_id"],
                   "actor": row["actor"], "reason": row["reason"], "detail": detail,
                   "prev_hash": row["prev_hash"], "hash": row["hash"]}

    def listener(self, actor: str) -> _AuditListener:
        """An engine listener recording steps and rotations with ``actor`` as the actor."""
        return _AuditListener(self, actor)

    def _step_fields(self, event: StepFinished, actor: str) -> dict[str, Any]:
        detail: dict[str, Any] = {"step": event.step, "status": event.status,
                                  "agent": event.agent, "provider": event.provider,
                                  "duration_seconds": round(event.duration, 3)}
        if event.message:
            detail["message"] = event.message
        if event.step in _KEY_STEPS:
            detail.update(old_key_id=event.old_key_id, new_key_id=event.new_key_id)
        return {"credential": event.credential, "rotation_id": event.rotation_id,
                "actor": actor, "detail": detail, "at": event.at}

    def _on_rotation(self, event: RotationFinished, actor: str) -> None:
        detail: dict[str, Any] = {"outcome": event.outcome, "trigger": event.trigger,
                                  "agent": event.agent, "provider": event.provider,
                                  "duration_seconds": round(event.duration, 3)}
        if event.message:
            detail["message"] = event.message
        detail.update(old_key_id=event.old_key_id, new_key_id=event.new_key_id,
                      revoke_mode=event.revoke_mode)
        if event.requested_by:
            detail["requested_by"] = event.requested_by
        if event.manual_revoke:
            detail["manual_revoke"] = event.manual_revoke
        reason = event.reason
        self.record("rotation", credential=event.credential, rotation_id=event.rotation_id,
                    actor=actor, reason=reason, detail=detail, at=event.at)
        if event.outcome != "success":
            self.record("failure", credential=event.credential, rotation_id=event.rotation_id,
                        actor=actor, reason=reason, at=event.at,
                        detail={"outcome": event.outcome, "trigger": event.trigger,
                                "message": event.message})
