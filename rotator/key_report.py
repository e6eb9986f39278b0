"""What a rotation did to each key, for the operator who ran it (``rotate-now``, ``status``).

On the night a key leaks the question is "is the leaked key dead?": this reads the state store
for the rotation's old key and says its fate (revoked when, checked dead or not; in grace until
when; failing to revoke and why; to be revoked by hand; still the agent's key after a failure),
the new key, and for a failure the step that failed and its root cause, once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rotator.config import CredentialConfig
from rotator.engine import RotationResult
from rotator.runtime import Runtime
from rotator.state.models import Revocation
from rotator.state.store import StateStore

__all__ = ["key_report", "old_keys_live"]

FATES = ("revoked", "handed_over", "in_grace", "revoke_failing", "manual", "current", "none")
"""``old_key.fate``: revoked; handed over (a key several credentials shared: the revocation of
the last one still using it kills it); still valid until its grace ends; its revocation keeps
failing; to be revoked by hand (rotator could not identify it); still the agent's key (the
rotation failed before replacing it); there was no key before."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _revocation_fate(rev: Revocation, verifies: bool) -> dict[str, Any]:
    if rev.status == "handed_over":  # a shared key: the last credential to move revokes it
        return {"fate": "handed_over", "handed_over_at": _iso(rev.done_at)}
    if rev.status == "done":
        return {"fate": "revoked", "revoked_at": _iso(rev.done_at),
                "verified_dead": verifies and rev.vault_version is not None}
    if rev.last_error:
        return {"fate": "revoke_failing", "retry_at": _iso(rev.not_before),
                "attempts": rev.attempts, "error": rev.last_error}
    return {"fate": "in_grace", "revoke_after": _iso(rev.not_before)}


def key_report(store: StateStore, runtime: Runtime, cred: CredentialConfig,
               result: RotationResult) -> dict[str, Any]:
    """``result`` with the keys' fates: ``new_key_id``, ``old_key`` ({key_id, fate, ...}),
    and for a failure ``failed_step`` and ``cause`` (the root cause, not the clean-up's)."""
    report: dict[str, Any] = {
        "credential": cred.name, "agent": cred.agent, "provider": cred.provider,
        "rotation_id": result.rotation_id, "outcome": result.outcome,
        "message": result.message, "revoke_at": _iso(result.revoke_at),
        "manual_revoke": result.manual_revoke, "new_key_id": None, "old_key": None,
        "failed_step": None, "cause": None,
    }
    rot = store.rotation(result.rotation_id) if result.rotation_id else None
    if rot is None:
        return report
    steps = store.steps(rot.id)
    if result.ok:
        report["new_key_id"] = rot.new_key_id
    else:
        failed = [s for s in steps if s.status == "failed" and s.step not in ("rollback",
                                                                               "revoke")]
        report["failed_step"] = failed[0].step if failed else rot.step
        report["cause"] = rot.error or result.message
    old: dict[str, Any] = {"key_id": rot.old_key_id}
    revs = [r for r in store.revocations(rot.id) if r.key_id == rot.old_key_id]
    first = any(s.step == "revoke_first" and s.status == "succeeded" for s in steps)
    if rot.manual_revoke:
        old.update(fate="manual", action=rot.manual_revoke)
    elif revs:
        verifies = runtime.provider(cred.provider).capabilities.verify_revoked
        old.update(_revocation_fate(revs[-1], verifies))
    elif first:
        done = next(s.finished_at for s in steps
                    if s.step == "revoke_first" and s.status == "succeeded")
        old.update(fate="revoked", revoked_at=_iso(done), verified_dead=False)
    elif rot.old_key_id is None:
        old.update(fate="none")
    else:
        old.update(fate="current")
    report["old_key"] = old
    return report


def old_keys_live(store: StateStore) -> dict[str, list[dict[str, Any]]]:
    """Per credential, the old keys still valid after their rotation: in grace, or failing to
    revoke (``status`` shows them, so which keys are live is never a guess)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rev in store.pending_revocations():
        entry: dict[str, Any] = {"key_id": rev.key_id, "rotation_id": rev.rotation_id,
                                 **_revocation_fate(rev, False)}
        out.setdefault(rev.credential, []).append(entry)
    return out
