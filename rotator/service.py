"""What the commands do, without rendering: the CLI parses, calls these, and prints.

Every function returns plain dicts whose keys are the documented ``--json`` schema, so the
human tables and the JSON output cannot drift apart.
"""

from __future__ import annotations

import getpass
import logging
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rotator.app import App
from rotator.audit import AuditLog
from rotator.config import CredentialConfig, Policies
from rotator.engine import Engine, RotationRequest, RotationResult, utcnow
from rotator.errors import NotFound, RotatorError
from rotator.interfaces import StagingInventory
from rotator.notify import EXIT_WAIT_SECONDS, Notifier
from rotator.runtime import Runtime
from rotator.state.store import COMMAND_TAG, StateStore, describe_owner, lock_owner_id

__all__ = [
    "Context",
    "history_rows",
    "online_check",
    "open_context",
    "plan_rows",
    "rotate_now",
    "select_credentials",
    "staged_leftovers",
    "status_rows",
]

log = logging.getLogger("rotator.service")


@dataclass
class Context:
    policies: Policies
    store: StateStore
    runtime: Runtime
    engine: Engine
    audit: AuditLog


@contextmanager
def open_context(policies: Policies, *, clock: Callable[[], datetime] = utcnow,
                 create: bool = True) -> Iterator[Context]:
    """The App for one command; ``create=False`` for commands that only read, so a mistyped
    ``state_url`` is an error rather than a new empty store."""
    # A command's leases say so, for `rotator status` on the replicas' side.
    app = App(policies, actor=_os_user(), clock=clock, create=create,
              owner=lock_owner_id(f"{COMMAND_TAG}{secrets.token_hex(4)}"))
    try:
        app.engine.sync_credentials()
        yield Context(policies, app.store, app.runtime, app.engine, app.audit)
    finally:
        # A one-shot command exits hard right after this: give queued notifications (an
        # emergency rotate-now's, above all) a short, bounded chance to go out first.
        app.close(EXIT_WAIT_SECONDS)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def status_rows(ctx: Context, now: datetime) -> list[dict[str, Any]]:
    """One row per credential of the policy file (SPEC: ``rotator status``)."""
    states = {s.name: s for s in ctx.store.credentials()}
    active = ctx.store.active_rotation_steps()
    holders = ctx.store.lease_holders(now)
    rows = []
    for cred in ctx.policies.credentials:
        state = states.get(cred.name)
        last = state.last_rotated_at if state else None
        age_from = last or (state.first_seen_at if state else None)
        rows.append({
            "credential": cred.name,
            "agent": cred.agent,
            "provider": cred.provider,
            "vault": cred.vault,
            "path": cred.path,
            "field": cred.field,
            "key_id": state.current_key_id if state else None,
            "key_age_seconds": int((now - last).total_seconds()) if last else None,
            "known_since": _iso(age_from),
            "last_rotated_at": _iso(last),
            "last_rotation_id": state.last_rotation_id if state else None,
            "last_outcome": state.last_outcome if state else None,
            "last_error": state.last_error if state else None,
            "next_due_at": _iso(state.next_due_at) if state else None,
            "due_reason": state.due_reason if state else None,
            "rotating_step": active.get(cred.name),
            "rotating_on": describe_owner(holders[cred.name]) if cred.name in holders else None,
        })
    return rows


def plan_rows(ctx: Context, now: datetime, within: timedelta) -> list[dict[str, Any]]:
    """Credentials that will rotate before ``now + within``, earliest first."""
    states = {s.name: s for s in ctx.store.credentials()}
    horizon = now + within
    rows = []
    for cred in ctx.policies.credentials:
        state = states.get(cred.name)
        due = state.next_due_at if state else None
        if due is None or due > horizon:
            continue
        decision = ctx.engine.due_decision(cred.name)
        rows.append({
            "credential": cred.name,
            "agent": cred.agent,
            "provider": cred.provider,
            "due_at": _iso(due),
            "overdue": due <= now,
            "reason": (state.due_reason if state and state.due_reason else decision.reason),
            "message": decision.message,
            "grace_seconds": int(cred.grace.total_seconds()),
        })
    rows.sort(key=lambda r: r["due_at"])
    return rows


def history_rows(ctx: Context, credential: str | None, limit: int = 50
                 ) -> list[dict[str, Any]]:
    rows = []
    for rot in ctx.store.rotations(credential, limit=limit):
        steps = [{
            "step": s.step, "status": s.status, "started_at": _iso(s.started_at),
            "finished_at": _iso(s.finished_at),
            "duration_seconds": round((s.finished_at - s.started_at).total_seconds(), 3)
            if s.finished_at else None,
            "message": s.message,
        } for s in ctx.store.steps(rot.id)]
        rows.append({
            "rotation_id": rot.id, "credential": rot.credential, "agent": rot.agent,
            "provider": rot.provider, "trigger": rot.trigger, "revoke_mode": rot.revoke_mode,
            "reason": rot.reason, "requested_by": rot.requested_by, "status": rot.status,
            "outcome": rot.outcome, "step": rot.step, "error": rot.error,
            "old_key_id": rot.old_key_id, "new_key_id": rot.new_key_id,
            "manual_revoke": rot.manual_revoke,
            "started_at": _iso(rot.started_at), "finished_at": _iso(rot.finished_at),
            "duration_seconds": round((rot.finished_at - rot.started_at).total_seconds(), 3)
            if rot.finished_at else None,
            "steps": steps,
        })
    return rows


def select_credentials(policies: Policies, names: tuple[str, ...], agent: str | None,
                       provider: str | None, all_: bool) -> list[CredentialConfig]:
    """Resolve rotate-now's selection; unknown names raise ``KeyError`` naming them."""
    chosen: list[CredentialConfig] = []
    unknown = [n for n in names if n not in {c.name for c in policies.credentials}]
    if unknown:
        raise KeyError(", ".join(unknown))
    for cred in policies.credentials:
        if (all_ or cred.name in names or (agent is not None and cred.agent == agent)
                or (provider is not None and cred.provider == provider)):
            chosen.append(cred)
    return chosen


def rotate_now(ctx: Context, credentials: list[CredentialConfig], *, revoke_mode: str,
               reason: str | None, on_result: Callable[[RotationResult], None] | None = None,
               ) -> list[RotationResult]:
    """Rotate each credential, ``max_concurrent_rotations`` at a time; never stops the batch
    for one failure. Waits for a rotation already running elsewhere to finish first."""
    trigger = "manual" if revoke_mode == "grace" else "emergency"
    user = _os_user()
    wait = ctx.policies.settings.lock_ttl.total_seconds() + 60
    results: list[RotationResult] = []
    for cred in credentials:  # who asked and why, before anything changes
        ctx.audit.record("manual", credential=cred.name, actor=user, reason=reason,
                         detail={"command": "rotate-now", "trigger": trigger,
                                 "revoke_mode": revoke_mode, "agent": cred.agent,
                                 "provider": cred.provider})
    ctx.runtime.warm_up(credentials)
    workers = min(ctx.policies.settings.max_concurrent_rotations, max(len(credentials), 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="rotate-now") as pool:
        futures = {
            pool.submit(ctx.engine.rotate, RotationRequest(
                credential=c.name, trigger=trigger, revoke_mode=revoke_mode, reason=reason,
                requested_by=user), wait=wait): c for c in credentials
        }
        pending = set(futures)
        while pending:
            try:
                for future in as_completed(pending):
                    pending.discard(future)
                    result = _outcome(future, futures[future])
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
            except KeyboardInterrupt:
                # Ctrl-C: let every rotation finish the step it is in, then stop; each one
                # resumes from there on the next rotate-now or in the daemon.
                log.warning("interrupted: pausing the rotations after their current step")
                ctx.engine.stop_event.set()
    order = {c.name: i for i, c in enumerate(credentials)}
    results.sort(key=lambda r: order.get(r.credential, 0))
    return results


def _outcome(future: Any, cred: CredentialConfig) -> RotationResult:
    try:
        return future.result()
    except Exception as exc:  # one failure never aborts the batch
        log.exception("%s: rotation crashed", cred.name)
        return RotationResult(cred.name, None, "failed", f"internal error {type(exc).__name__}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def staged_leftovers(policies: Policies, runtime: Runtime) -> list[str]:
    """One line per key staged in a vault for a rotation that is not running: no rotation will
    promote or remove it (a worker lost its lease mid-step, or a clean-up could not reach the
    vault). Harmless, since rotator revokes the keys of rotations that did not finish, but
    worth deleting. Vaults that cannot list what is staged, or cannot be reached, are skipped
    (the problems above say why)."""
    running = _running_rotations(policies)
    lines: list[str] = []
    for cred in policies.credentials:
        vault = runtime.vault(cred.vault)
        if not isinstance(vault, StagingInventory):
            continue
        try:
            staged = vault.staged_rotations(cred.path)
        except RotatorError:
            continue
        for rotation_id in staged:
            if running is not None and rotation_id in running:
                continue
            why = ("is not running" if running is not None else
                   "may not be running (the state store could not be read)")
            lines.append(f"credentials {cred.name!r}: vault {cred.vault!r} still holds a key "
                         f"staged for {cred.path} by rotation {rotation_id}, which {why}; it "
                         "was never made current: delete it (see `rotator history "
                         f"{cred.name}`)")
    return lines


def _running_rotations(policies: Policies) -> set[str] | None:
    """Ids of the rotations not finished yet, or None if the state store cannot be read."""
    try:
        store = StateStore(policies.settings.state_url, create=False)
    except RotatorError:
        return None
    try:
        return {r.id for r in store.unfinished_rotations()}
    except Exception as exc:
        if not store.is_unreachable(exc):
            raise
        return None
    finally:
        store.close()


def online_check(policies: Policies, runtime: Runtime) -> list[str]:
    """Reach every vault and provider the file names; return one problem line per failure."""
    problems: list[str] = []
    bad_vaults: set[str] = set()
    for name in policies.vaults:
        try:
            runtime.vault(name).health()
        except RotatorError as exc:
            bad_vaults.add(name)
            problems.append(f"vaults.{name}: {exc}")
    for name in policies.providers:
        try:
            runtime.provider(name).check_access()
        except RotatorError as exc:
            problems.append(f"providers.{name}: {exc}")
    for cred in policies.credentials:
        if cred.vault in bad_vaults:
            continue
        try:
            runtime.vault(cred.vault).read(cred.path, cred.field)
        except NotFound:
            pass  # first rotation provisions it
        except RotatorError as exc:
            problems.append(f"credentials {cred.name!r}: {exc}")
    problems += Notifier(policies.notify, runtime.resolve_secret).check()
    return problems
