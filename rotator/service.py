"""What the commands do, without rendering: the CLI parses, calls these, and prints.

Every function returns plain dicts whose keys are the documented ``--json`` schema, so the
human tables and the JSON output cannot drift apart.
"""

from __future__ import annotations

import getpass
import logging
import secrets
import tempfile
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rotator.app import App
from rotator.audit import AuditLog
from rotator.config import CredentialConfig, Policies
from rotator.engine import Engine, RotationRequest, RotationResult, utcnow
from rotator.errors import NotFound, RotatorError
from rotator.interfaces import StagedCopy, StagingInventory, WriteAccessCheck
from rotator.key_report import old_keys_live
from rotator.notify import EXIT_WAIT_SECONDS, Notifier
from rotator.policy import MANUAL_ONLY, Decision
from rotator.runtime import Runtime
from rotator.state.models import CredentialState, Rotation
from rotator.state.schema import NoStateStore
from rotator.state.store import COMMAND_TAG, StateStore, describe_owner, lock_owner_id

__all__ = [
    "Context",
    "Leftover",
    "LeftoverReport",
    "credential_read_check",
    "find_leftovers",
    "history_rows",
    "leftovers_by_row",
    "notifier_check",
    "online_check",
    "open_context",
    "plan_rows",
    "plugin_check",
    "preflight",
    "reading_context",
    "reading_store",
    "rotate_now",
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


@contextmanager
def reading_context(policies: Policies, on_preview: Callable[[str], None] | None = None
                    ) -> Iterator[Context]:
    """``open_context`` for ``status`` and ``plan``: before anything has run (no SQLite store
    yet) they answer from the policy file alone, over a throw-away store, and ``on_preview``
    hears why, rather than refusing: "what will happen when" is the first question."""
    try:
        with open_context(policies, create=False) as ctx:
            yield ctx
            return
    except NoStateStore as exc:
        why = str(exc).split(":")[0]
    if on_preview is not None:
        on_preview(f"{why} yet: nothing has run, so this is what the policy file alone says "
                   "(`rotator run` or `rotator rotate-now` creates it)")
    with tempfile.TemporaryDirectory(prefix="rotator-preview-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'preview.db'}"
        preview = policies.model_copy(update={
            "settings": policies.settings.model_copy(update={"state_url": url})})
        with open_context(preview) as ctx:
            yield ctx


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def status_rows(ctx: Context, now: datetime) -> list[dict[str, Any]]:
    """One row per credential of the policy file (SPEC: ``rotator status``). The due time and
    reason are the due gate's answer now (what the scheduler would decide)."""
    states = {s.name: s for s in ctx.store.credentials()}
    decisions = ctx.engine.due_decisions()
    active = ctx.store.active_rotation_steps()
    holders = ctx.store.lease_holders(now)
    old_keys = old_keys_live(ctx.store)
    rows = []
    for cred in ctx.policies.credentials:
        state = states.get(cred.name)
        decision = decisions[cred.name]
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
            "next_due_at": _iso(_due_at(decision, state)),
            "due_reason": decision.reason,
            "due_message": decision.message,
            "rotating_step": active.get(cred.name),
            "rotating_on": describe_owner(holders[cred.name]) if cred.name in holders else None,
            "old_keys": old_keys.get(cred.name, []),
        })
    return rows


def _due_at(decision: Decision, state: CredentialState | None) -> datetime | None:
    """When the credential next rotates by schedule: the gate's time, or (while it rotates)
    the stored one; None for a credential never rotated by schedule."""
    if decision.due_at is not None or decision.reason == MANUAL_ONLY:
        return decision.due_at
    return state.next_due_at if state else None


def plan_rows(ctx: Context, now: datetime, within: timedelta,
              everything: bool = False) -> list[dict[str, Any]]:
    """Credentials that will rotate by schedule before ``now + within``, earliest first (with
    ``everything``, every credential, those never due last), each with the due gate's reason."""
    states = {s.name: s for s in ctx.store.credentials()}
    decisions = ctx.engine.due_decisions()
    horizon = now + within
    rows = []
    for cred in ctx.policies.credentials:
        decision = decisions[cred.name]
        due = _due_at(decision, states.get(cred.name))
        if not everything and (due is None or due > horizon):
            continue
        rows.append({
            "credential": cred.name,
            "agent": cred.agent,
            "provider": cred.provider,
            "due_at": _iso(due),
            "overdue": due is not None and due <= now,
            "due_now": decision.due,
            "reason": decision.reason,
            "message": decision.message,
            "grace_seconds": int(cred.grace.total_seconds()),
        })
    rows.sort(key=lambda r: (r["due_at"] is None, r["due_at"] or "", r["credential"]))
    return rows


def history_rows(ctx: Context, credentials: Collection[str] | None, limit: int = 50
                 ) -> list[dict[str, Any]]:
    """The last ``limit`` rotations, newest first: of every credential (None) or of these."""
    if credentials is None:
        rotations = ctx.store.rotations(None, limit=limit)
    else:
        rotations = sorted((r for name in credentials
                            for r in ctx.store.rotations(name, limit=limit)),
                           key=lambda r: r.started_at, reverse=True)[:limit]
    rows = []
    for rot in rotations:
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


def rotate_now(ctx: Context, credentials: list[CredentialConfig], *, revoke_mode: str,
               reason: str | None, on_result: Callable[[RotationResult], None] | None = None,
               ) -> list[RotationResult]:
    """Rotate each credential, ``max_concurrent_rotations`` at a time; never stops the batch
    for one failure. Waits for a rotation already running elsewhere to finish first."""
    trigger = "manual" if revoke_mode == "grace" else "emergency"
    user = _os_user()
    wait = ctx.policies.settings.lock_ttl.total_seconds() + 60
    results: list[RotationResult] = []
    # Who asked and why, before anything changes: one transaction for the whole batch (one
    # per credential took seconds before a 10,000-credential emergency began).
    ctx.audit.record_many([
        {"kind": "manual", "credential": cred.name, "actor": user, "reason": reason,
         "detail": {"command": "rotate-now", "trigger": trigger, "revoke_mode": revoke_mode,
                    "agent": cred.agent, "provider": cred.provider}}
        for cred in credentials])
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


IN_PROGRESS = ("running", "grace")
"""Statuses of a rotation that has not ended: its staged copy is still its own to handle."""


@dataclass(frozen=True)
class Leftover:
    """A key staged in a vault that no rotation will promote or remove: its rotation ended, or
    the state store has no record of it (see :func:`find_leftovers`)."""

    vault: str
    copy: StagedCopy
    rotation_status: str | None
    """How its rotation ended (``succeeded``, ``failed``, ``rolled_back``); None if unknown."""
    store_read: bool
    """False when the state store could not be read: the rotation may still be running."""
    credential: str | None
    """The credential its rotation rotated, per the state store (None if unknown)."""

    def describe(self) -> str:
        """One line naming the vault, path and rotation, and what to do; never a value."""
        if not self.store_read:
            why = ("which may still be running (the state store could not be read): check "
                   "`rotator history` first; if it ended,")
        elif self.rotation_status is None:
            why = "which the state store has no record of: nothing will promote or remove it, so"
        else:
            why = (f"which ended {self.rotation_status}: nothing will promote or remove it, "
                   "so")
        whose = f" (credentials {self.credential!r})" if self.credential else ""
        return (f"vault {self.vault!r}: a key is still staged for {self.copy.path}{whose} by "
                f"rotation {self.copy.rotation_id}, {why} it can be deleted: "
                f"{self.copy.location or 'see the vault plugin'}")

    def as_json(self) -> dict[str, Any]:
        """The ``staged_leftovers`` entry of ``status --json``."""
        return {"vault": self.vault, "path": self.copy.path,
                "rotation_id": self.copy.rotation_id, "rotation_status": self.rotation_status,
                "location": self.copy.location}


@dataclass(frozen=True)
class LeftoverReport:
    """What :func:`find_leftovers` found, and the vaults it could not ask."""

    leftovers: list[Leftover]
    unlisted: dict[str, str]
    """Vault name -> why its staged copies could not be listed (unreachable, sealed,
    denied)."""
    unsupported: frozenset[str] = frozenset()
    """Vaults whose plugin is no ``StagingInventory``: nothing to say about them."""

    def unchecked(self, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """One line per vault that could not be listed (but those in ``skip``)."""
        return [f"vault {name!r}: staged copies not checked: {why}"
                for name, why in sorted(self.unlisted.items()) if name not in skip]

    def warnings(self) -> list[str]:
        """One line per leftover and per vault that could not be listed."""
        return [leftover.describe() for leftover in self.leftovers] + self.unchecked()


def find_leftovers(policies: Policies, runtime: Runtime, store: StateStore | None,
                   skip: Collection[str] = ()) -> LeftoverReport:
    """Staged copies, in the vaults the credentials use, whose rotation is not in progress.

    A staged copy is its rotation's until that rotation ends (``IN_PROGRESS``): the rotation
    promotes it or removes it. Once the rotation ended, or when the state store has no record
    of it, nothing will, so it is a leftover (left by a worker that lost its lease mid-step, or
    a clean-up that could not reach the vault). Harmless, since a rotation that did not finish
    has its keys revoked, but worth deleting. ``store`` None (or unreadable) reports every
    staged copy, saying its rotation may still be running. Vaults in ``skip`` (those that
    already failed a check) are not asked again.

    A staged copy whose rotation the state store does not know counts only at a path one of
    this policy file's credentials uses: anywhere else it may belong to another deployment
    sharing the vault (another state store), whose rotation may be running right now.
    """
    ours = {(cred.vault, cred.path) for cred in policies.credentials}
    leftovers: list[Leftover] = []
    unlisted: dict[str, str] = {}
    unsupported: set[str] = set()
    for name in sorted({cred.vault for cred in policies.credentials}):
        if name in skip:
            unlisted[name] = "its check failed"
            continue
        vault = runtime.vault(name)
        if not isinstance(vault, StagingInventory):
            unsupported.add(name)
            continue
        try:
            copies = vault.staged_copies()
        except RotatorError as exc:
            unlisted[name] = str(exc)
            continue
        for copy in copies:
            read, rotation = _stored_rotation(store, copy.rotation_id)
            if rotation is not None and rotation.status in IN_PROGRESS:
                continue  # its own rotation will promote or remove it
            if rotation is None and (name, copy.path) not in ours:
                continue  # not this deployment's to judge
            leftovers.append(Leftover(
                vault=name, copy=copy, store_read=read,
                rotation_status=rotation.status if rotation is not None else None,
                credential=rotation.credential if rotation is not None else None))
    return LeftoverReport(leftovers, unlisted, frozenset(unsupported))


def _stored_rotation(store: StateStore | None, rotation_id: str) -> tuple[bool, Rotation | None]:
    """``(whether the store could be read, the rotation or None)``."""
    if store is None:
        return False, None
    try:
        return True, store.rotation(rotation_id)
    except Exception as exc:
        if not store.is_unreachable(exc):
            raise
        return False, None


@contextmanager
def reading_store(policies: Policies) -> Iterator[StateStore | None]:
    """The state store for reading, or None if it cannot be opened (``check --online`` runs
    where the store may not be reachable, and must still report the vaults)."""
    try:
        store = StateStore(policies.settings.state_url, create=False)
    except RotatorError:
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def leftovers_by_row(rows: list[dict[str, Any]], report: LeftoverReport,
                     policies: Policies) -> list[Leftover]:
    """Add ``staged_leftovers`` to each ``status`` row (a list, or None when the row's vault
    could not be listed); return the leftovers that belong to no row (their credential is not
    in the policy file any more)."""
    paths = {cred.name: (cred.vault, cred.path) for cred in policies.credentials}
    unknown = report.unlisted.keys() | report.unsupported
    for row in rows:
        row["staged_leftovers"] = None if row["vault"] in unknown else []
    by_name = {row["credential"]: row for row in rows}
    orphans: list[Leftover] = []
    for leftover in report.leftovers:
        if leftover.credential is not None:
            owners = [leftover.credential] if leftover.credential in by_name else []
        else:
            owners = [name for name, where in paths.items()
                      if where == (leftover.vault, leftover.copy.path)]
        for name in owners:
            by_name[name]["staged_leftovers"].append(leftover.as_json())
        if not owners:
            orphans.append(leftover)
    return orphans


def preflight(runtime: Runtime, credentials: list[CredentialConfig]) -> dict[str, list[str]]:
    """``rotate-now --dry-run``: everything a rotation of each credential would need, tried
    without changing anything: its vault answers, the agent's secret can be read, the vault
    lets rotator write where a rotation writes (asked of vaults that can say), and the
    provider accepts rotator's admin credentials. Credential name -> what would fail."""
    checked: dict[tuple[str, str], str | None] = {}  # each vault and provider asked once

    def problem_of(kind: str, name: str, check: Callable[[], None]) -> str | None:
        if (kind, name) not in checked:
            try:
                check()
                checked[kind, name] = None
            except RotatorError as exc:
                checked[kind, name] = str(exc)
        return checked[kind, name]

    out: dict[str, list[str]] = {}
    for cred in credentials:
        problems = out.setdefault(cred.name, [])
        vault_down = problem_of("vault", cred.vault,
                                lambda c=cred: runtime.vault(c.vault).health())
        no_access = problem_of("provider", cred.provider,
                               lambda c=cred: runtime.provider(c.provider).check_access())
        problems += [p for p in (vault_down, no_access) if p]
        if vault_down:
            continue
        vault = runtime.vault(cred.vault)
        try:
            vault.read(cred.path, cred.field)
        except NotFound:
            pass  # nothing there yet: the first rotation provisions it
        except RotatorError as exc:
            problems.append(str(exc))
        if isinstance(vault, WriteAccessCheck):
            try:
                problems += vault.missing_write_access(cred.path, cred.field)
            except RotatorError as exc:
                problems.append(str(exc))
    return out


def online_check(policies: Policies, runtime: Runtime,
                 bad_vaults: set[str] | None = None) -> list[str]:
    """Reach every vault and provider the file names; return one problem line per failure.
    ``bad_vaults``, if given, gets the names of the vaults that failed their check."""
    bad_vaults = set() if bad_vaults is None else bad_vaults
    problems = plugin_check(policies, runtime, bad_vaults)
    problems += list(credential_read_check(policies, runtime, bad_vaults))
    return problems + notifier_check(policies, runtime)


def plugin_check(policies: Policies, runtime: Runtime, bad_vaults: set[str]) -> list[str]:
    """The first part of ``online_check``: one call to each vault and each provider (a
    handful, however many credentials), so the daemon can say at start what it cannot use.
    ``bad_vaults`` gets the names of the vaults that failed."""
    problems: list[str] = []
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
    return problems


def credential_read_check(policies: Policies, runtime: Runtime, bad_vaults: Collection[str],
                          stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The part of ``online_check`` that grows with the fleet: each credential's secret read
    from its vault (a vault in ``bad_vaults`` skipped), one problem line per failure, lazily,
    until ``stop()`` says to stop. A missing secret is no problem: the first rotation
    provisions it."""
    for cred in policies.credentials:
        if stop():
            return
        if cred.vault in bad_vaults:
            continue
        try:
            runtime.vault(cred.vault).read(cred.path, cred.field)
        except NotFound:
            pass
        except RotatorError as exc:
            yield f"credentials {cred.name!r}: {exc}"


def notifier_check(policies: Policies, runtime: Runtime) -> list[str]:
    """The last part of ``online_check``: each notifier's secret references resolve."""
    return Notifier(policies.notify, runtime.resolve_secret).check()
