"""``rotator usage``: what each key of a credential did over a period, from the provider's own
usage records: step 3 of the leak runbook ("what did the leaked key do, and is it still used?").

Every key rotator knows of a credential is asked about: the current one, the old ones in their
grace period, and those it has revoked (from the rotation history), each with its role and
when it changed, so a leaked key's use is seen across its rotation: calls before the switch are
the agent's, calls after it are someone else's. Asked live (through the provider's optional
:class:`~rotator.interfaces.UsageReport`), so it works without a daemon and beyond what the
daemon keeps. Never a value: key ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rotator.config import CredentialConfig, usage_provider_types
from rotator.errors import PermanentError
from rotator.interfaces import UsageBucket, UsageReport
from rotator.runtime import Runtime
from rotator.state.store import StateStore

__all__ = ["KeyHistory", "key_histories", "usage_of"]

WIDTHS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}


@dataclass
class KeyHistory:
    """One key of one credential: when it became current, was replaced, was revoked."""

    credential: str
    agent: str
    provider: str
    key_id: str
    created_at: datetime | None = None
    """When a rotation made it the agent's key (None: adopted, rotator did not create it)."""
    replaced_at: datetime | None = None
    """When a rotation replaced it: any use after this is not the agent's."""
    revoked_at: datetime | None = None
    replaced_by: str | None = None
    """The key that replaced it."""
    proven_at: datetime | None = None
    """When the health check proved the agent had loaded the replacement (an http check
    expecting ``{key_id}``): from then on, this key's use is not the agent's."""
    buckets: list[UsageBucket] = field(default_factory=list)

    @property
    def role(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "old" if self.replaced_at is not None else "current"

    def used_after_replacement(self) -> int:
        """Requests (tokens, where only those are counted) in buckets that begin after the
        key was replaced."""
        if self.replaced_at is None:
            return 0
        after = [b for b in self.buckets if b.start >= self.replaced_at]
        if any(b.requests is not None for b in after):
            return sum(b.requests or 0 for b in after)
        return sum(b.tokens or 0 for b in after)  # a service that counts only tokens

    def as_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat().replace("+00:00", "Z") if value else None

        return {"credential": self.credential, "agent": self.agent, "provider": self.provider,
                "key_id": self.key_id, "role": self.role, "created_at": iso(self.created_at),
                "replaced_at": iso(self.replaced_at), "revoked_at": iso(self.revoked_at),
                "requests": sum(b.requests or 0 for b in self.buckets),
                "tokens": sum(b.tokens or 0 for b in self.buckets),
                "requests_after_replacement": self.used_after_replacement(),
                "buckets": [{"start": iso(b.start), "seconds": int(b.width.total_seconds()),
                             "requests": b.requests, "tokens": b.tokens, "cost": b.cost}
                            for b in self.buckets]}


def key_histories(store: StateStore, cred: CredentialConfig) -> dict[str, KeyHistory]:
    """key id -> its history, from the credential's rotations (oldest first) and state."""
    keys: dict[str, KeyHistory] = {}
    check = cred.health_check
    proves_key = check.type == "http" and any(
        "{key_id}" in v for v in (check.expect_json or {}).values())

    def key(key_id: str) -> KeyHistory:
        return keys.setdefault(key_id, KeyHistory(cred.name, cred.agent, cred.provider, key_id))

    for rot in reversed(store.rotations(cred.name, limit=10_000)):
        # A rotation switched keys once its store step succeeded (it may be in its grace
        # period still); one rolled back put the old key back.
        steps = store.steps(rot.id)
        switched = next((s.finished_at for s in steps
                         if s.step == "store" and s.status == "succeeded"), None)
        if switched is None or rot.outcome == "rolled_back":
            continue
        if rot.old_key_id:
            key(rot.old_key_id).replaced_at = switched
            key(rot.old_key_id).replaced_by = rot.new_key_id
            if proves_key:
                key(rot.old_key_id).proven_at = next(
                    (s.finished_at for s in steps
                     if s.step == "health" and s.status == "succeeded"), None)
            for rev in store.revocations(rot.id):
                if rev.key_id == rot.old_key_id and rev.status == "done":
                    key(rot.old_key_id).revoked_at = rev.done_at
        if rot.new_key_id:
            key(rot.new_key_id).created_at = switched
    state = store.credential(cred.name)
    if state is not None and state.current_key_id:
        key(state.current_key_id)
    return keys


def usage_of(runtime: Runtime, store: StateStore, creds: list[CredentialConfig],
             since: datetime, until: datetime, width: timedelta,
             key_id: str | None = None) -> list[KeyHistory]:
    """Each known key of ``creds`` (or only ``key_id``) with its buckets in [since, until),
    asked of each provider once for all its keys."""
    by_provider: dict[str, list[KeyHistory]] = {}
    for cred in creds:
        provider = runtime.provider(cred.provider)
        if not isinstance(provider, UsageReport) or not provider.usage_widths:
            raise PermanentError(
                f"provider {cred.provider!r} ({type(provider).type_name}) of {cred.name} cannot "
                "report usage per key; `rotator usage` works for providers that can ("
                + ", ".join(usage_provider_types()) + ")")
        for history in key_histories(store, cred).values():
            if key_id is None or history.key_id == key_id:
                by_provider.setdefault(cred.provider, []).append(history)
    out: list[KeyHistory] = []
    for name, histories in by_provider.items():
        report = runtime.provider(name)
        assert isinstance(report, UsageReport)
        if width not in report.usage_widths:
            raise PermanentError(f"provider {name!r} reports usage in buckets of "
                                 + ", ".join(str(w) for w in report.usage_widths))
        buckets = report.usage(sorted({h.key_id for h in histories}), since, until, width)
        for history in histories:
            history.buckets = sorted((b for b in buckets if b.key_id == history.key_id),
                                     key=lambda b: b.start)
        out.extend(histories)
    return sorted(out, key=lambda h: (h.credential, h.created_at or datetime.min.replace(
        tzinfo=since.tzinfo), h.key_id))
