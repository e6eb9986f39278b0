"""The rotation protocol: the steps, resume, rollback and grace; nothing else.

Each step is recorded in the state store before and after it runs and is safe to run again, so
a rotation interrupted anywhere (kill -9 included) resumes from its last recorded step:

    prepare -> [revoke_first] -> create -> verify -> store -> health -> grace -> revoke -> done
                     any failure before grace -> rollback

The new secret is staged in the vault by the same step that receives it from the provider, so
it never lives only in memory. The old key is revoked only after the new one is current in the
vault and the consumer is healthy, which is what keeps agents from ever reading a dead key.

Every plugin call runs under the credential's lease and is fenced by it (``_guarded``): right
before each attempt the lease must still be held with the epoch it was acquired under, and
backoff sleeps end as soon as it is lost. Keys carry that epoch in their names (``key_tag``), so
a clean-up touches only its own and earlier owners' keys. See docs/replicas.md, "Fencing".
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_any,
    wait_exponential_jitter,
)

from rotator import health, policy, redaction
from rotator.crashpoints import crashpoint
from rotator.errors import (
    CredentialRejected,
    Interrupted,
    LockHeld,
    NotFound,
    PermanentError,
    RateLimited,
    RotatorError,
    TransientError,
)
from rotator.events import (
    CallObserver,
    Listener,
    PluginCall,
    RotationFinished,
    StepFinished,
    TransactionalListener,
)
from rotator.generation import Generation
from rotator.interfaces import KeyTerms, NewKey, Provider, Secret, Vault, VaultValue
from rotator.outages import OutageLog
from rotator.policy import GraceWait
from rotator.protocol import PROTOCOL, OldKeyRevocation, Produced
from rotator.sibling_keys import SiblingKeys
from rotator.state.leases import Fence, Leases
from rotator.state.models import CredentialState, Revocation, Rotation
from rotator.state.store import DueFacts, StaleRotation, StateStore, lock_owner_id

if TYPE_CHECKING:
    from rotator.config import CredentialConfig, Policies
    from rotator.runtime import Runtime

__all__ = ["Engine", "Interrupted", "RotationRequest", "RotationResult", "key_tag",
           "new_rotation_id"]

log = logging.getLogger("rotator.engine")
T = TypeVar("T")

TRIGGERS = ("schedule", "manual", "emergency")
REVOKE_MODES = ("grace", "immediately", "first")
IN_RESULT = {"in_result": True}
"""``extra`` of a log record that says what the rotation's result says too (a failed step and
its cause, a key to revoke by hand): ``rotate-now`` prints the result and drops these."""
FAILURE_BACKOFF_BASE = timedelta(minutes=1)
FAILURE_BACKOFF_MAX = timedelta(hours=1)
VERIFY_ATTEMPTS = 6
"""A new key can take a moment to propagate at the provider: verify tries this many times."""
SLEEP_SLICE = 1.0
"""A backoff sleep wakes at least this often (seconds) to check the lease is still held."""
MUTATIONS = frozenset({"create", "create_with_terms", "revoke", "apply", "stage", "promote",
                       "restore", "discard_staged"})
"""Plugin methods that change something: the fence asks the store before each is sent."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_rotation_id(now: datetime) -> str:
    """Sortable, unique, and short enough to fit in a provider's key name."""
    return f"r{now:%Y%m%d%H%M%S}-{secrets.token_hex(4)}"


def _grace_wait(rev: Revocation) -> GraceWait:
    return GraceWait(rev.not_before, rev.key_id, rev.rotation_id, rev.attempts)


def key_tag(rotation_id: str, epoch: int) -> str:
    """What a provider names a rotation's key after (as its ``rotation_id`` argument): the
    rotation id and the epoch of the lease it was created under, so a clean-up can tell the
    keys of its own and earlier owners from a newer owner's. Epoch 0: a rotation started before
    epochs existed, whose keys carry the bare rotation id."""
    return rotation_id if epoch == 0 else f"{rotation_id}-e{epoch}"


class HealthCheckFailed(PermanentError):
    """The consumer did not come back healthy on the new key."""


@dataclass(frozen=True)
class RotationRequest:
    credential: str
    trigger: str = "schedule"
    revoke_mode: str = "grace"
    reason: str | None = None
    requested_by: str | None = None


@dataclass(frozen=True)
class RotationResult:
    credential: str
    rotation_id: str | None
    outcome: str
    """``success``, ``failed``, ``rolled_back``, ``skipped`` (locked) or ``interrupted``."""
    message: str
    revoke_at: datetime | None = None
    manual_revoke: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "success"


class Engine:
    """Runs rotations for the credentials of one ``Policies`` against one state store."""

    def __init__(
        self,
        policies: Policies,
        runtime: Runtime,
        store: StateStore,
        *,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] | None = None,
        owner: str | None = None,
    ) -> None:
        self._current = Generation(policies, runtime)
        self._generation_lock = threading.Lock()
        self.store = store
        self.clock = clock
        self.stop_event = threading.Event()
        self._sleep = sleep or (lambda seconds: self.stop_event.wait(seconds) and None)
        self._local = threading.local()
        """``fence``: the lease the rotation on this thread runs under (see ``_locked``)."""
        self.outages = OutageLog()
        self.owner = owner or lock_owner_id(secrets.token_hex(4))
        self.leases = Leases(store, self.owner, policies.settings.lock_ttl, clock)
        self.listeners: list[Listener] = []
        self.call_observers: list[CallObserver] = []
        """Told of every provider/vault call attempt (metrics); must return at once."""
        self.sibling_keys = SiblingKeys()
        """What never-rotated credentials hold, for the shared-key check before a revoke."""

    # -- generations -----------------------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        """The generation this thread's rotation runs with, else the current one."""
        return getattr(self._local, "generation", None) or self._current

    @property
    def policies(self) -> Policies:
        return self.generation.policies

    @property
    def runtime(self) -> Runtime:
        return self.generation.runtime

    def use(self, policies: Policies, runtime: Runtime) -> Generation:
        """Make ``policies`` and ``runtime`` the generation new work starts with (a reload).
        Rotations in flight keep theirs; the old generation is closed once they end."""
        with self._generation_lock:
            old = self._current
            self._current = Generation(policies, runtime, old.number + 1)
            new = self._current
        old.retire()
        return new

    @contextmanager
    def _pinned(self) -> Iterator[Generation]:
        """Hold the current generation for this thread's work until the block ends."""
        held = getattr(self._local, "generation", None)
        if held is not None:  # nested: the outer call holds it
            yield held
            return
        with self._generation_lock:
            generation = self._current
            generation.enter()
        self._local.generation = generation
        try:
            yield generation
        finally:
            self._local.generation = None
            generation.leave()

    # -- public API ----------------------------------------------------------------------------

    def sync_credentials(self) -> None:
        """Make the store know every credential of the policy file and its next due time."""
        now = self.clock()
        by_name = {c.name: c for c in self.policies.credentials}

        def next_due(state: Any) -> tuple[datetime | None, str] | None:
            if state.failures and state.next_due_at is not None:
                return None  # keep the failure backoff
            first_seen = state.first_seen_at or now
            return self._next_due(by_name[state.name], state.last_rotated_at, first_seen, now)

        self.store.sync_credentials(
            [(c.name, c.agent, c.provider) for c in self.policies.credentials], now, next_due)

    def rotate(self, request: RotationRequest, *, wait: float = 0.0,
               claimed: bool = False) -> RotationResult:
        """Rotate one credential now, after finishing any rotation of it left unfinished.

        Waits up to ``wait`` seconds for another worker's rotation of the same credential.
        ``claimed``: ``claim_due`` already took the lease; it is given back at the end, however
        the call ends. A scheduled rotation runs only if the credential is still due once the
        lease is held (another replica may have just rotated it).
        """
        if claimed and self.leases.epoch(request.credential) is None:
            return RotationResult(request.credential, None, "skipped",
                                  "the claimed lease is no longer held")
        with self._pinned():
            return self._rotate(request, wait, claimed=claimed)

    def _rotate(self, request: RotationRequest, wait: float, *,
                claimed: bool) -> RotationResult:
        cred = self.policies.credential(request.credential)
        if request.revoke_mode not in REVOKE_MODES or request.trigger not in TRIGGERS:
            raise ValueError(f"bad request {request!r}")
        try:
            with self._locked(cred.name, wait, claimed=claimed):
                for unfinished in self.store.unfinished_rotations(cred.name):
                    log.info("%s: resuming rotation %s at step %s first", cred.name,
                             unfinished.id, unfinished.step)
                    earlier = self._drive(unfinished, cred)
                    if earlier.outcome == "interrupted" or \
                            self._reload(unfinished.id).status == "running":
                        return earlier  # its clean-up is still pending: do not pile on
                if request.trigger == "schedule":
                    decision = self.due_decision(cred.name)
                    if not decision.due:
                        self.store.update_credential(cred.name, next_due_at=decision.due_at,
                                                     due_reason=decision.reason)
                        return RotationResult(cred.name, None, "skipped",
                                              f"no longer due ({decision.reason}): "
                                              f"{decision.message}")
                # An emergency also kills keys still in the grace of earlier rotations, first:
                # they are no longer in the vault, and a service with a cap on live keys (AWS
                # IAM: two per user) needs the room for the new one.
                if (request.revoke_mode != "grace"
                        and self.store.expedite_revocations(cred.name, self.clock())):
                    self._revoke_credential(cred)
                now = self.clock()
                rotation = Rotation(
                    id=new_rotation_id(now), credential=cred.name, agent=cred.agent,
                    provider=cred.provider, trigger=request.trigger,
                    revoke_mode=request.revoke_mode, reason=request.reason,
                    requested_by=request.requested_by, status="running", step="prepare",
                    started_at=now,
                )
                step_row = self.store.start_rotation(rotation, self._fence.epoch)
                log.info("%s: rotation %s started (trigger %s, revoke %s)", cred.name,
                         rotation.id, request.trigger, request.revoke_mode)
                return self._drive(rotation, cred, step_row=step_row)
        except LockHeld as exc:
            return RotationResult(cred.name, None, "skipped", str(exc))
        except Interrupted as exc:  # outside a rotation's own steps (an earlier one's revoke)
            log.warning("%s: stopped: %s", cred.name, exc)
            return RotationResult(cred.name, None, "interrupted", str(exc))

    def resume(self, name: str) -> RotationResult | None:
        """Finish ``name``'s rotation left unfinished by a crash or a stop, if any.

        Returns None when there was nothing to resume or another worker holds the credential.
        """
        with self._pinned():
            return self._resume(name)

    def _resume(self, name: str) -> RotationResult | None:
        cred = self._credential_or_none(name)
        if cred is None:
            if self.store.unfinished_rotations(name):
                log.error("a rotation of %s cannot resume: the credential is no longer in the "
                          "policy file; put it back to finish or roll it back", name)
            return None
        try:
            with self._locked(name, 0):
                result = None
                for rotation in self.store.unfinished_rotations(name):
                    log.info("%s: resuming rotation %s at step %s", name, rotation.id,
                             rotation.step)
                    result = self._drive(rotation, cred)
                return result
        except LockHeld:
            return None

    def credentials_with_due_revocations(self) -> list[str]:
        """Credentials with an old key whose grace is over, or a rotation whose last
        revocation was done just before a crash (so it only needs finishing); leaving out
        those another worker holds right now."""
        now = self.clock()
        names = {r.credential for r in self.store.pending_revocations(due_by=now)}
        names |= self.store.grace_without_pending()
        if names:
            names -= self.store.live_leases(now)
        return sorted(names)

    def resumable(self) -> list[str]:
        """Credentials with an unfinished rotation that no worker holds: their worker was
        stopped, or died and its lease expired (or it ran on this host and its process is
        gone). Any replica may take such a rotation over; it resumes from its last step."""
        names = {r.credential for r in self.store.unfinished_rotations()}
        if names:
            names -= self.store.live_leases(self.clock())
        return sorted(names)

    def claim_due(self, names: list[str], limit: int, exclude: set[str]) -> list[str]:
        """Claim up to ``limit`` due credentials among ``names`` for this process, atomically
        against every other replica; run each with ``rotate(..., claimed=True)`` or give it
        back with ``release``."""
        return self.leases.claim_due(names, limit, exclude)

    def release(self, name: str) -> None:
        """Give back a lease taken by ``claim_due`` that will not be used."""
        self.leases.release(name)

    def revoke_due(self, name: str) -> int:
        """Revoke ``name``'s old keys whose grace is over; 0 if another worker holds it."""
        with self._pinned():
            return self._revoke_due(name)

    def _revoke_due(self, name: str) -> int:
        cred = self._credential_or_none(name)
        if cred is None:
            return 0
        try:
            with self._locked(name, 0):
                return self._revoke_credential(cred)
        except LockHeld:
            return 0
        except Interrupted as exc:
            log.warning("%s: revocation stopped: %s", name, exc)
            return 0

    def orphaned_work(self) -> list[str]:
        """One line per unfinished rotation or pending revocation of a credential that is no
        longer in the policy file: rotator cannot act on it, an operator must."""
        known = {c.name for c in self.policies.credentials}
        lines = [f"rotation {r.id} of {r.credential} stopped at step {r.step}"
                 for r in self.store.unfinished_rotations() if r.credential not in known]
        lines += [f"old key {r.key_id} of {r.credential} awaits revocation (due "
                  f"{r.not_before:%Y-%m-%d %H:%M} UTC)"
                  for r in self.store.pending_revocations() if r.credential not in known]
        return lines

    def close(self) -> None:
        self.leases.close()

    # -- driving a rotation --------------------------------------------------------------------

    @contextmanager
    def _locked(self, name: str, wait: float, *, claimed: bool = False) -> Iterator[None]:
        """Hold ``name``'s lease (taking it unless ``claimed``) and fence this thread's plugin
        calls with it until the block ends; the lease is given back then."""
        deadline = time.monotonic() + wait
        while not claimed:
            holder = self.leases.acquire(name)
            if holder is None:
                break
            if time.monotonic() >= deadline or self.stop_event.is_set():
                raise LockHeld(name, holder)
            self._sleep(0.25)
        epoch = self.leases.epoch(name)
        self._local.fence = None if epoch is None else Fence(self.leases, name, epoch)
        try:
            yield
        finally:
            self._local.fence = None
            self.leases.release(name)

    @property
    def _fence(self) -> Fence:
        fence = getattr(self._local, "fence", None)
        if fence is None:  # every plugin call of a rotation is made under its lease
            raise Interrupted("no lease is held for this rotation")
        return fence

    def due_decision(self, name: str, *, rotating: bool = False) -> policy.Decision:
        """Is a scheduled rotation of ``name`` due now? Asks the due gate (``policy.decide``)
        with what the store knows: last rotation, first seen, a failure's retry time, an old
        key still awaiting its revocation."""
        pending = self.store.pending_revocations(credential=name)
        return self._decide(self.policies.credential(name), self.store.credential(name),
                            rotating, _grace_wait(pending[0]) if pending else None, self.clock())

    def due_decisions(self, facts: Mapping[str, DueFacts] | None = None
                      ) -> dict[str, policy.Decision]:
        """The due gate's answer for every credential of the policy file, from three reads of
        the store (``status``, ``plan`` and ``/metrics`` show these); ``facts``, if the caller
        already read them (``/metrics`` does, for its timestamps), saves one."""
        now = self.clock()
        states = self.store.due_facts() if facts is None else facts
        rotating = {r.credential for r in self.store.unfinished_rotations()}
        waits: dict[str, GraceWait] = {}
        for rev in self.store.pending_revocations():  # earliest first
            waits.setdefault(rev.credential, _grace_wait(rev))
        return {c.name: self._decide(c, states.get(c.name), c.name in rotating,
                                     waits.get(c.name), now)
                for c in self.policies.credentials}

    def _decide(self, cred: CredentialConfig, state: CredentialState | DueFacts | None,
                rotating: bool,
                grace: GraceWait | None, now: datetime) -> policy.Decision:
        spec = cred.schedule_spec(self.policies.settings.jitter)
        if grace is not None and cred.revoke_when == "quiet" and not grace.failed_attempts:
            grace = dataclasses.replace(grace, quiet_for=cred.quiet_for)
        retry_at = state.next_due_at if state is not None and state.failures else None
        return policy.decide(spec, state.last_rotated_at if state else None,
                             (state.first_seen_at if state else None) or now, now,
                             rotating=rotating, retry_at=retry_at, grace=grace)

    def _drive(self, rotation: Rotation, cred: CredentialConfig, *,
               step_row: int | None = None) -> RotationResult:
        """Run ``rotation`` from its recorded step until it is done, in grace, or failed.

        ``step_row`` is the open record of the step about to run (None when resuming: the
        step then counts as a re-run, and cleans up after a crashed run of itself).
        """
        try:
            if step_row is None:  # resuming: say who drives it now, before any plugin call
                self.store.join_rotation(rotation.id, self._fence.epoch)
            return self._run_steps(rotation, cred, step_row)
        except Interrupted as exc:
            return self._interrupted(rotation, str(exc))

    def _run_steps(self, rotation: Rotation, cred: CredentialConfig,
                   step_row: int | None) -> RotationResult:
        rid = rotation.id
        while True:
            if self.stop_event.is_set():
                return self._interrupted(rotation, "the daemon is stopping")
            if cred.name in self.leases.lost:
                return self._interrupted(rotation, "the lease was lost to another worker")
            if not self.leases.usable(cred.name):
                return self._interrupted(rotation, "the lease could not be renewed in time "
                                         "(state store unreachable?); another worker may "
                                         "take the rotation over")
            step = rotation.step
            if step == "revoke":
                return self._revoke_phase(rotation, cred)
            if rotation.status != "running":
                return self._result(rotation, rotation.outcome or rotation.status)
            rerun = step_row is None
            if step_row is None:
                step_row = self.store.resume_step(rid, step, self.clock())
            t0 = time.monotonic()
            transition = PROTOCOL[step]
            try:
                produced: Produced = getattr(self, f"_step_{step}")(rotation, cred, rerun)
            except Interrupted as exc:
                return self._interrupted(rotation, str(exc))
            except Exception as exc:
                if self.stop_event.is_set():
                    return self._interrupted(rotation, "the daemon is stopping")
                message = _describe(exc)
                self._emit_step(rotation, step, "failed", t0, message)
                if transition.on_failure is None:
                    # Keep the root cause in `error`; the clean-up's own failure is the step's.
                    self._transition(rid, step_row, "failed", message, None, step)
                    log.error("%s: clean-up of rotation %s failed, will retry: %s", cred.name,
                              rid, message, extra=IN_RESULT)
                    cause = f"{rotation.error}; " if rotation.error else ""
                    return self._result(rotation, "failed", extra=(
                        f"{cause}clean-up pending, will retry: {message}"))
                log.error("%s: step %s of rotation %s failed: %s", cred.name, step, rid,
                          message, extra=IN_RESULT)
                fields = {"outcome": transition.failure_outcome, "error": message}
                step_row = self._transition(rid, step_row, "failed", message,
                                            transition.on_failure, step, **fields)
                _apply(rotation, fields, transition.on_failure)
                continue
            fields, next_step = produced.fields, transition.next(produced.branch)
            crashpoint(f"effect:{step}")
            event = self._step_event(rotation, step, "succeeded", t0, None,
                                     old_key_id=fields.get("old_key_id", rotation.old_key_id),
                                     new_key_id=fields.get("new_key_id", rotation.new_key_id))
            step_row = self._transition(rid, step_row, "succeeded", None, next_step, step,
                                        event=event, credential=(cred.name, produced.credential),
                                        revocation=produced.revocation, **fields)
            crashpoint(f"after:{step}")
            _apply(rotation, fields, next_step)
            self._emit(event, recorded=True)
            if next_step == "done":
                return self._finish(rotation, cred, rotation.outcome or "failed")

    # -- the steps: each returns what it produced; rotator.protocol says where it leads ---------

    def _step_prepare(self, rot: Rotation, cred: CredentialConfig,
                      rerun: bool) -> Produced:
        vault = self.runtime.vault(cred.vault)
        provider = self.runtime.provider(cred.provider)
        info = self.runtime.info(cred)
        try:
            current = self._retry(vault.read, cred.path, cred.field,
                                  provider.companion_fields(info))
        except NotFound:
            current = None
        old_key_id = old_version = manual = None
        if current is not None and current.secret is not None:
            old_version = current.version
            old_key_id = current.metadata.get("key_id") or None
            if old_key_id is None and provider.capabilities.identify:
                old_key_id = self._retry(provider.identify, info, current.secret,
                                         dict(current.companions))
            if old_key_id is None:
                manual = (f"the key in vault {cred.vault!r} at {cred.path}#{cred.field} "
                          f"(version {old_version}) was not written by rotator and provider "
                          f"{cred.provider!r} could not identify it: revoke it by hand")
                log.warning("%s: %s", cred.name, manual, extra=IN_RESULT)
        branch = "revoke_first" if rot.revoke_mode == "first" else None
        if branch is None and not provider.capabilities.create:
            raise PermanentError(
                f"provider {cred.provider!r} cannot create keys; only "
                "`rotator rotate-now --revoke-first` is possible for it")
        return Produced({"old_key_id": old_key_id, "old_version": old_version,
                         "manual_revoke": manual}, branch=branch)

    def _step_revoke_first(self, rot: Rotation, cred: CredentialConfig,
                           rerun: bool) -> Produced:
        provider = self.runtime.provider(cred.provider)
        if rot.old_key_id:
            self._retry(provider.revoke, self.runtime.info(cred), rot.old_key_id)
            log.warning("%s: old key %s revoked before anything else (--revoke-first)",
                        cred.name, rot.old_key_id)
        if not provider.capabilities.create:
            # Emergency revocation is all such a provider can do: the rotation ends here.
            return Produced({"status": "grace"}, branch="nothing_to_create", credential={
                "current_key_id": None, "last_outcome": "success", "last_rotation_id": rot.id})
        return Produced()

    def _step_create(self, rot: Rotation, cred: CredentialConfig,
                     rerun: bool) -> Produced:
        provider = self.runtime.provider(cred.provider)
        vault = self.runtime.vault(cred.vault)
        info = self.runtime.info(cred)
        tag = key_tag(rot.id, self._fence.epoch)
        if rerun:
            self._remove_created_keys(rot, cred)
        if provider.capabilities.in_place:
            # One key per credential: the new one must be safe in the vault before the service
            # switches to it, or a crash in between would lose the only working key.
            key = provider.generate(info, tag)
            self._retry(vault.stage, cred.path, cred.field, key.secret, rot.id,
                        provider.companions(info, key.key_id))
            self._retry(provider.apply, info, key)
            crashpoint("created:create")
            return Produced({"new_key_id": key.key_id})
        tries: list[int] = []
        if (cred.key_ttl is not None or cred.budget is not None) \
                and isinstance(provider, KeyTerms):
            key = self._retry(provider.create_with_terms, info, tag, tries=tries,
                              ttl=cred.key_ttl,
                              budget=cred.budget.budget() if cred.budget else None)
        else:
            key = self._retry(provider.create, info, tag, tries=tries)
        if tries[0] > 1:
            # A timed-out attempt may have created a key after all: keep only this one. Only
            # this owner's keys carry ``tag``: a newer owner's are never touched.
            for key_id in self._retry(provider.find_by_rotation, info, tag):
                if key_id != key.key_id:
                    self._retry(provider.revoke, info, key_id)
        crashpoint("created:create")  # the key exists at the provider, nowhere else yet
        self._retry(vault.stage, cred.path, cred.field, key.secret, rot.id,
                    provider.companions(info, key.key_id))
        return Produced({"new_key_id": key.key_id})

    def _step_verify(self, rot: Rotation, cred: CredentialConfig,
                     rerun: bool) -> Produced:
        provider = self.runtime.provider(cred.provider)
        vault = self.runtime.vault(cred.vault)
        secret = self._retry(vault.read_staged, cred.path, cred.field, rot.id)
        if secret is None:
            raise PermanentError(f"the new key of rotation {rot.id} is no longer staged in "
                                 f"vault {cred.vault!r}; the rotation will be rolled back")
        # A new key may take a moment to work at the provider: a few attempts. One the
        # provider refused for its rate limit is not one of them (the pacer waits those out).
        local = self._local
        throttled_before = getattr(local, "throttled_calls", 0)

        def tried_enough(state: RetryCallState) -> bool:
            refused = getattr(local, "throttled_calls", 0) - throttled_before
            return state.attempt_number - refused >= VERIFY_ATTEMPTS

        retrying = Retrying(
            retry=retry_if_exception_type((TransientError, CredentialRejected)),
            stop=stop_any(tried_enough, self._deadline()),
            wait=_unless_throttled(wait_exponential_jitter(multiplier=0.2, max=5)),
            sleep=self._pause, reraise=True,
        )
        info = self.runtime.info(cred)
        retrying(self._guarded(provider.verify), info, secret, key_id=rot.new_key_id)
        return Produced()

    def _step_store(self, rot: Rotation, cred: CredentialConfig,
                    rerun: bool) -> Produced:
        vault = self.runtime.vault(cred.vault)
        meta = {"key_id": rot.new_key_id or "", "rotation_id": rot.id,
                "rotated_at": self.clock().isoformat()}
        version = self._retry(vault.promote, cred.path, cred.field, rot.id, meta)
        try:
            self._retry(vault.discard_staged, cred.path, rot.id)
        except Interrupted:
            raise
        except RotatorError as exc:
            log.warning("%s: staged copy of rotation %s not removed: %s", cred.name, rot.id, exc)
        return Produced({"new_version": version})

    def _step_health(self, rot: Rotation, cred: CredentialConfig,
                     rerun: bool) -> Produced:
        ctx = health.CheckContext(credential=cred.name, agent=cred.agent, rotation_id=rot.id,
                                  key_id=rot.new_key_id)
        if cred.on_rotate is not None:
            try:
                self._retry(health.run_hook, cred.on_rotate, ctx)
            except PermanentError as exc:
                raise HealthCheckFailed(f"on_rotate hook failed: {exc}") from exc
        result = health.run_health_check(cred.health_check, ctx, sleep=self._pause)
        if self.stop_event.is_set() and not result.ok:
            raise Interrupted("the daemon is stopping")
        if not result.ok:
            raise HealthCheckFailed(
                f"agent {cred.agent!r} failed its health check after the new key was stored "
                f"({result.attempts} attempt(s)): {result.message}")
        return Produced()

    def _step_grace(self, rot: Rotation, cred: CredentialConfig,
                    rerun: bool) -> Produced:
        now = self.clock()
        grace = cred.grace if rot.revoke_mode == "grace" else timedelta(0)
        revocation = None
        if rot.old_key_id and rot.revoke_mode != "first":
            revocation = OldKeyRevocation(rot.old_key_id, rot.old_version, now + grace)
        due, reason = self._next_due(cred, now, now, now)
        return Produced({"status": "grace"}, revocation=revocation, credential={
            "last_rotated_at": now, "last_rotation_id": rot.id, "last_outcome": "success",
            "last_error": None, "current_key_id": rot.new_key_id, "next_due_at": due,
            "due_reason": reason, "failures": 0})

    def _step_rollback(self, rot: Rotation, cred: CredentialConfig,
                       rerun: bool) -> Produced:
        """Undo whatever the rotation did: old key current again, every new key revoked."""
        vault = self.runtime.vault(cred.vault)
        provider = self.runtime.provider(cred.provider)
        info = self.runtime.info(cred)
        stored = any(s.step == "store" for s in self.store.steps(rot.id))
        if stored:
            try:
                current = self._retry(vault.read, cred.path, cred.field)
            except NotFound:
                current = None
            # The metadata names this rotation once the store step finished; if the step
            # failed after writing the value (say, the metadata write was denied), the value
            # itself says so: it is the key staged for this rotation.
            if current is not None and (
                    current.metadata.get("rotation_id") == rot.id
                    or (current.secret is not None
                        and current.secret == self._retry(vault.read_staged, cred.path,
                                                          cred.field, rot.id))):
                if rot.revoke_mode == "first" or not rot.old_version:
                    # Nothing working to go back to: the new key is the agent's only key.
                    why = ("the old key was already revoked (--revoke-first)"
                           if rot.revoke_mode == "first" else "there was no key before")
                    message = f"new key {rot.new_key_id} kept in the vault because {why}"
                    log.error("%s: %s", cred.name, message, extra=IN_RESULT)
                    return Produced({"status": "failed", "outcome": "failed",
                                     "error": message, "finished_at": self.clock()},
                                    credential=self._failure_fields(
                                        rot, cred, message, new_key_kept=True))
                meta = {"key_id": rot.old_key_id or "", "rotation_id": f"{rot.id}/rollback",
                        "rotated_at": self.clock().isoformat()}
                self._retry(vault.restore, cred.path, cred.field, rot.old_version,
                            f"{rot.id}/rollback", meta, provider.companion_fields(info))
                log.warning("%s: old key restored as current in vault %s", cred.name,
                            cred.vault)
                if cred.on_rotate is not None:
                    ctx = health.CheckContext(cred.name, cred.agent, rot.id, rot.old_key_id)
                    try:
                        self._retry(health.run_hook, cred.on_rotate, ctx)
                    except Interrupted:
                        raise
                    except RotatorError as exc:
                        log.warning("%s: on_rotate after rollback failed: %s", cred.name, exc)
        if provider.capabilities.in_place and rot.old_version and rot.revoke_mode != "first":
            self._reapply_old_key(rot, cred, info, provider)
        self._remove_created_keys(rot, cred, info=info, provider=provider)
        message = rot.error or "rotation failed"
        if rot.revoke_mode == "first" and rot.old_key_id and any(
                s.step == "revoke_first" and s.status == "succeeded"
                for s in self.store.steps(rot.id)):
            message = (f"{message}; the old key {rot.old_key_id} was already revoked "
                       "(--revoke-first), so the agent has NO working key until a rotation "
                       f"succeeds: fix the cause and run `rotator rotate-now {cred.name}` "
                       "(the daemon also retries it)")
        return Produced({"status": rot.outcome or "failed", "finished_at": self.clock(),
                         "error": message}, credential=self._failure_fields(
                             rot, cred, message, old_key_dead=rot.revoke_mode == "first"))

    # -- revocation ----------------------------------------------------------------------------

    def _revoke_phase(self, rotation: Rotation, cred: CredentialConfig) -> RotationResult:
        """Revoke this rotation's old keys that are due; finish it once none is pending."""
        return self._revoke_rotation(rotation, cred)[0]

    def _revoke_rotation(self, rotation: Rotation,
                         cred: CredentialConfig) -> tuple[RotationResult, int]:
        """The revoke phase, and how many keys it revoked."""
        now = self.clock()
        pending = [r for r in self.store.revocations(rotation.id) if r.status == "pending"]
        revoked = 0
        for rev in [r for r in pending if r.not_before <= now]:
            if self._revoke_one(cred, rotation, rev):
                pending.remove(rev)
                revoked += 1
        if pending:
            when = min(r.not_before for r in pending)
            return self._result(rotation, "success", revoke_at=when,
                                extra=f"old key revoked after {when:%Y-%m-%d %H:%M:%S} UTC"
                                ), revoked
        self._revoke_strays(rotation, cred)
        return self._finish(rotation, cred, "success"), revoked

    def _revoke_credential(self, cred: CredentialConfig) -> int:
        """Run the revoke phase of every rotation of ``cred`` in its grace period."""
        return sum(self._revoke_rotation(rotation, cred)[1]
                   for rotation in self.store.rotations_in_grace()
                   if rotation.credential == cred.name)

    def _revoke_one(self, cred: CredentialConfig, rotation: Rotation, rev: Revocation) -> bool:
        provider = self.runtime.provider(cred.provider)
        info = self.runtime.info(cred)
        started, t0 = self.clock(), time.monotonic()
        try:
            old = self._old_value(cred, rev)
            holders = self._still_held_by(cred, rev, old)
            if holders:
                self.store.record_revocation(
                    rev.id, rotation.id, started, self.clock(), ok=True, handed_over=True,
                    message=f"shared key {rev.key_id} left to {', '.join(holders)}")
                self._emit_step(rotation, "revoke", "succeeded", t0, None)
                log.info("%s: old key %s of rotation %s is shared and still the key of %s: "
                         "it is revoked once the last of them has rotated", cred.name,
                         rev.key_id, rotation.id, ", ".join(holders))
                return True
            self._retry(provider.revoke, info, rev.key_id)
            if provider.capabilities.verify_revoked and rev.vault_version:
                if old is None:  # the version was pruned: the revoke stands, unconfirmed
                    log.warning("%s: vault version %s holding old key %s is gone; revoked "
                                "without checking the provider now refuses it", cred.name,
                                rev.vault_version, rev.key_id)
                else:
                    self._retry(self._confirm_dead, provider, info, old, rev.key_id)
        except Interrupted:
            raise
        except Exception as exc:
            message = _describe(exc)
            attempts = rev.attempts + 1
            backoff = min(FAILURE_BACKOFF_BASE * 2 ** (attempts - 1), FAILURE_BACKOFF_MAX)
            self.store.record_revocation(rev.id, rotation.id, started, self.clock(), ok=False,
                                         message=message, retry_at=self.clock() + backoff)
            self._emit_step(rotation, "revoke", "failed", t0, message)
            log.error("%s: revoking old key %s failed (attempt %d, next try in %s): %s",
                      cred.name, rev.key_id, attempts, backoff, message)
            return False
        crashpoint("effect:revoke")
        self.store.record_revocation(rev.id, rotation.id, started, self.clock(), ok=True,
                                     message=f"revoked {rev.key_id}")
        crashpoint("after:revoke")
        self._emit_step(rotation, "revoke", "succeeded", t0, None)
        log.info("%s: old key %s of rotation %s revoked", cred.name, rev.key_id, rotation.id)
        return True

    def _old_value(self, cred: CredentialConfig, rev: Revocation) -> Secret | None:
        """The old key as the vault version that held it has it (one read serves the
        shared-key check and the check that the provider refuses it); None when that version
        is gone or its field is empty."""
        if not rev.vault_version:
            return None
        try:
            return self._retry(self.runtime.vault(cred.vault).read_version, cred.path,
                               cred.field, rev.vault_version)
        except NotFound:
            return None

    def _still_held_by(self, cred: CredentialConfig, rev: Revocation,
                       old: Secret | None) -> list[str]:
        """Other credentials of the same provider that still use the key ``rev`` would revoke
        (``old``, its value, when the vault still has it): one key several agents shared
        before ``rotator import`` gave each a credential. It dies with the revocation of the
        last of them, so no agent loses a key it still reads.

        Two filtered queries, and vault reads only for credentials rotator has not rotated yet
        (no ``current_key_id``): only those can hold an adopted key. What they hold is kept a
        few seconds (``SiblingKeys``), so a fleet-wide batch reads each of them about once."""
        siblings = {c.name: c for c in self.policies.credentials
                    if c.provider == cred.provider and c.name != cred.name}
        if not siblings:
            return []
        # Siblings whose own revocation of this key comes after this one (by due time, then
        # row id: one order every replica sees) will kill it; the last in that order does.
        # Two revocations due together cannot each leave the key to the other.
        later = sorted({r.credential for r in self.store.pending_revocations(key_id=rev.key_id)
                        if r.credential in siblings
                        and (r.not_before, r.id) > (rev.not_before, rev.id)})
        unrotated = sorted(self.store.never_rotated() & siblings.keys())
        if not unrotated:
            return later
        provider = self.runtime.provider(cred.provider)
        holders = list(later)

        def current(name: str) -> VaultValue | None:
            sib = siblings[name]
            try:
                return self._retry(self.runtime.vault(sib.vault).read, sib.path, sib.field,
                                   provider.companion_fields(self.runtime.info(sib)))
            except NotFound:
                return None

        if old is not None:
            holders += self.sibling_keys.holders(self.sibling_keys.fingerprint(old), unrotated,
                                                 current)
            return sorted(set(holders))
        for name in unrotated:
            # The old version is gone: ask the provider whose key the sibling holds.
            sib = siblings[name]
            value = current(name)
            if value is None or value.secret is None or value.metadata.get("key_id"):
                continue  # written by rotator: that credential has a key of its own
            if self._retry(provider.identify, self.runtime.info(sib), value.secret,
                           dict(value.companions)) == rev.key_id:
                holders.append(name)
        return sorted(set(holders))

    @staticmethod
    def _confirm_dead(provider: Any, info: Any, old: Any, key_id: str) -> None:
        try:
            provider.verify(info, old, key_id=key_id)
        except CredentialRejected:
            return
        raise TransientError(f"old key {key_id} is still accepted after revocation")

    # -- helpers -------------------------------------------------------------------------------

    def _reapply_old_key(self, rot: Rotation, cred: CredentialConfig, info: Any,
                         provider: Any) -> None:
        """In-place providers: the new key replaced the old one at the service, so rolling
        back means putting the old key (still in the vault's previous version) back there."""
        vault = self.runtime.vault(cred.vault)
        old = self._retry(vault.read_version, cred.path, cred.field, rot.old_version)
        if old is None:
            raise PermanentError(
                f"vault {cred.vault!r} version {rot.old_version} of {cred.path} no longer holds "
                f"{cred.field!r}: the old key cannot be put back at provider {cred.provider!r}")
        self._retry(provider.apply, info, NewKey(rot.old_key_id or "adopted", old))
        log.warning("%s: old key %s put back at provider %s", cred.name,
                    rot.old_key_id or "(adopted)", cred.provider)

    def _remove_created_keys(self, rot: Rotation, cred: CredentialConfig, *,
                             info: Any = None, provider: Any = None) -> None:
        """Revoke every key this rotation's owners up to this one may have created (their
        epochs are recorded before their first call), and drop its staged copy.

        Never a key of a newer owner (its epoch is not searched) and never the key the store
        records as the credential's current one: a stale owner that slipped past its fence
        still cannot break what a newer owner made.
        """
        provider = provider or self.runtime.provider(cred.provider)
        info = info or self.runtime.info(cred)
        key_ids = self._keys_of_rotation(rot, provider, info)
        if rot.new_key_id:
            key_ids.add(rot.new_key_id)
        state = self.store.credential(cred.name)
        current = state.current_key_id if state is not None else None
        if current in key_ids:
            key_ids.discard(current)
            log.warning("%s: key %s of rotation %s is the credential's current key: left "
                        "alone", cred.name, current, rot.id)
        for key_id in sorted(key_ids):
            self._retry(provider.revoke, info, key_id)
            log.info("%s: key %s created by rotation %s revoked", cred.name, key_id, rot.id)
        try:
            self._retry(self.runtime.vault(cred.vault).discard_staged, cred.path, rot.id)
        except Interrupted:
            raise
        except RotatorError as exc:
            # Harmless once the keys above are revoked: whatever is staged holds a dead key.
            log.warning("%s: staged copy of rotation %s not removed: %s (the next clean-up "
                        "or `rotator check --online` reports it)", cred.name, rot.id, exc)

    def _epochs_up_to_mine(self, rot: Rotation) -> list[int]:
        """The epochs ``rot`` was driven under, up to this owner's (0: before epochs existed)."""
        return [e for e in self.store.rotation_epochs(rot.id) or [0] if e <= self._fence.epoch]

    def _keys_of_rotation(self, rot: Rotation, provider: Any, info: Any,
                          epochs: list[int] | None = None) -> set[str]:
        """Live keys named after ``rot`` by this owner or an earlier one: never a newer
        owner's, whose epoch is not searched."""
        found: set[str] = set()
        for epoch in self._epochs_up_to_mine(rot) if epochs is None else epochs:
            found.update(self._retry(provider.find_by_rotation, info, key_tag(rot.id, epoch)))
        return found

    def _revoke_strays(self, rot: Rotation, cred: CredentialConfig) -> None:
        """After a takeover, revoke keys an earlier owner of this rotation created that never
        became current: a create already on the wire when that owner's lease ran out can land
        after the new owner's clean-up. Only this owner's and earlier epochs are searched, and
        the new key, the credential's current key and the key the vault now serves are kept.
        In-place providers are skipped: their "keys" are the credential's own roles."""
        provider = self.runtime.provider(cred.provider)
        if not provider.capabilities.create or provider.capabilities.in_place:
            return
        epochs = self._epochs_up_to_mine(rot)
        if len(epochs) < 2:
            return
        info = self.runtime.info(cred)
        strays = self._keys_of_rotation(rot, provider, info, epochs)
        state = self.store.credential(cred.name)
        strays -= {rot.new_key_id, state.current_key_id if state is not None else None}
        if strays and provider.capabilities.identify:
            vault = self.runtime.vault(cred.vault)
            current = self._retry(vault.read, cred.path, cred.field,
                                  provider.companion_fields(info))
            if current.secret is not None:
                strays.discard(self._retry(provider.identify, info, current.secret,
                                           dict(current.companions)))
        for key_id in sorted(k for k in strays if k):
            self._retry(provider.revoke, info, key_id)
            log.warning("%s: key %s, created for rotation %s by a worker that lost its lease, "
                        "revoked", cred.name, key_id, rot.id)

    def _failure_fields(self, rot: Rotation, cred: CredentialConfig, message: str,
                        new_key_kept: bool = False, old_key_dead: bool = False
                        ) -> dict[str, Any]:
        """The credential's fields after a failed rotation: the failure counted and, for a
        scheduled one (or a dead old key), a retry after a backoff that grows with each."""
        state = self.store.credential(cred.name)
        failures = (state.failures if state else 0) + 1
        backoff = min(FAILURE_BACKOFF_BASE * 2 ** (failures - 1), FAILURE_BACKOFF_MAX)
        fields: dict[str, Any] = {"last_outcome": rot.outcome or "failed",
                                  "last_error": message, "last_rotation_id": rot.id,
                                  "failures": failures}
        if rot.trigger == "schedule" or old_key_dead:
            # A dead old key (--revoke-first) cannot wait for the next interval: retry soon.
            fields.update(next_due_at=self.clock() + backoff, due_reason="retry_backoff")
        if new_key_kept:
            fields.update(current_key_id=rot.new_key_id)
        elif old_key_dead:
            fields.update(current_key_id=None)
        return fields

    def _finish(self, rotation: Rotation, cred: CredentialConfig,
                outcome: str) -> RotationResult:
        now = self.clock()
        if rotation.status in ("grace", "running") or rotation.finished_at is None:
            status = "succeeded" if outcome == "success" else outcome
            fields = {"status": status, "outcome": outcome, "step": "done", "finished_at": now}
            if not self.store.finish_rotation(rotation.id, **fields):
                raise Interrupted(f"rotation {rotation.id} was finished by another worker")
            _apply(rotation, fields, "done")
        duration = (rotation.finished_at or now) - rotation.started_at
        event = RotationFinished(
            rotation.id, rotation.credential, rotation.agent, rotation.provider,
            rotation.trigger, outcome, duration.total_seconds(), rotation.error, now,
            old_key_id=rotation.old_key_id, new_key_id=rotation.new_key_id,
            revoke_mode=rotation.revoke_mode, reason=rotation.reason,
            requested_by=rotation.requested_by, manual_revoke=rotation.manual_revoke)
        self._emit(event)
        log.info("%s: rotation %s finished: %s", cred.name, rotation.id, outcome)
        return self._result(rotation, outcome)

    def _result(self, rotation: Rotation, outcome: str, *, revoke_at: datetime | None = None,
                extra: str | None = None) -> RotationResult:
        if outcome == "success":
            message = f"new key {rotation.new_key_id} is current"
            if rotation.revoke_mode == "first":
                message = f"old key {rotation.old_key_id} revoked first; " + message
            if extra:
                message += f"; {extra}"
        else:
            message = extra or rotation.error or outcome
        return RotationResult(rotation.credential, rotation.id, outcome, message,
                              revoke_at=revoke_at, manual_revoke=rotation.manual_revoke)

    def _interrupted(self, rotation: Rotation, why: str) -> RotationResult:
        log.warning("%s: rotation %s paused at step %s: %s", rotation.credential, rotation.id,
                    rotation.step, why)
        return RotationResult(rotation.credential, rotation.id, "interrupted",
                              f"paused at step {rotation.step}: {why}")

    def _reload(self, rotation_id: str) -> Rotation:
        rotation = self.store.rotation(rotation_id)
        assert rotation is not None
        return rotation

    def _credential_or_none(self, name: str) -> CredentialConfig | None:
        try:
            return self.policies.credential(name)
        except KeyError:
            return None

    def _next_due(self, cred: CredentialConfig, last: datetime | None, first_seen: datetime,
                  now: datetime) -> tuple[datetime | None, str]:
        spec = cred.schedule_spec(self.policies.settings.jitter)
        decision = policy.decide(spec, last, first_seen, now, rotating=False)
        if spec.manual_only:
            return None, decision.reason
        return policy.compute_next_due(spec, last, first_seen, now), decision.reason

    def _transition(self, rid: str, step_row: int, outcome: str, message: str | None,
                    next_step: str | None, step: str, /, event: StepFinished | None = None,
                    credential: tuple[str, dict[str, Any]] | None = None,
                    revocation: OldKeyRevocation | None = None, **fields: Any) -> int | None:
        """Record the end of ``step`` (``outcome``: succeeded/failed) and the start of the
        next, with ``event`` for the listeners that record in the same transaction (the
        audit trail); a rotation another worker took over stops this one (``Interrupted``)."""
        also = None
        if event is not None:
            in_tx = [listener.in_tx for listener in self.listeners
                     if isinstance(listener, TransactionalListener)]

            def also(conn: Any) -> None:
                for record in in_tx:
                    record(conn, event)

        try:
            return self.store.step_transition(rid, step_row, outcome, self.clock(), message,
                                              next_step, expect_step=step, also=also,
                                              credential=credential, revocation=revocation,
                                              **fields)
        except StaleRotation as exc:
            raise Interrupted(str(exc)) from exc

    def _deadline(self) -> _Deadline:
        """``retry_deadline`` for this thread's retries, waits for a rate limit excused."""
        return _Deadline(self.policies.settings.retry_deadline.total_seconds(),
                         self.stop_event, self._local)

    def _retry(self, fn: Callable[..., T], *args: Any, tries: list[int] | None = None,
               **kwargs: Any) -> T:
        """Call ``fn`` retrying only ``TransientError``, with backoff, until the deadline.
        Every attempt is fenced (see ``_guarded``) and every backoff sleep ends early when the
        lease is lost. Time spent waiting for a rate limit does not count against the
        deadline (``_Deadline``): a 429 slows a rotation down, it never fails it. ``tries``, if
        given, gets the number of attempts the remote may have acted on appended (an attempt
        refused for the rate limit was not)."""
        owner = getattr(fn, "__self__", None)
        plugin = isinstance(owner, Provider | Vault)
        paced = isinstance(owner, Provider)
        local = self._local

        def excused_wait(state: RetryCallState) -> float:
            """A throttled vault (no pacer) is waited out here, off the deadline."""
            seconds = _wait_retry_after(state)
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, RateLimited):
                local.throttle_wait = getattr(local, "throttle_wait", 0.0) + seconds
            return seconds

        retrying = Retrying(
            retry=retry_if_exception_type(TransientError),
            stop=self._deadline(),
            # A provider's pacer holds every worker as long as a 429 asked.
            wait=_unless_throttled(_wait_retry_after) if paced else excused_wait,
            sleep=self._pause,
            reraise=True,
            # A plugin's outage is logged once by ``outages``; each attempt only at debug.
            before_sleep=_log_retry_quietly if plugin else _log_retry,
        )
        refused = getattr(local, "throttled_calls", 0)
        try:
            return retrying(self._guarded(fn), *args, **kwargs)
        finally:
            if tries is not None:
                refused = getattr(local, "throttled_calls", 0) - refused
                tries.append(max(1, retrying.statistics.get("attempt_number", 1) - refused))

    def _pause(self, seconds: float) -> None:
        """A backoff sleep under the fence: it ends early (``LeaseLost``) as soon as the lease
        is lost or runs out, so a paused or cut-off worker never wakes into a retry."""
        fence = getattr(self._local, "fence", None)
        if fence is None:
            self._sleep(seconds)
            return
        remaining = seconds
        while True:
            fence.check()
            if remaining <= 0 or self.stop_event.is_set():
                return
            chunk = min(remaining, SLEEP_SLICE)
            self._sleep(chunk)
            remaining -= chunk

    def _guarded(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` checking the rotation's fence right before each attempt is sent (the store
        is asked too before a call that changes something), and, for a plugin method,
        telling ``call_observers`` and ``outages`` how each attempt went.

        A provider call first waits its turn at the provider's pacer (``rotator.pacing``),
        which it then tells whether the provider throttled it (``RateLimited``); that wait
        and a throttled attempt's own time are added to this thread's ``throttle_wait``, which
        ``_Deadline`` does not count. The wait ends early when the lease is lost
        (``LeaseLost``) or the daemon stops (``Interrupted``)."""
        owner = getattr(fn, "__self__", None)
        fence = getattr(self._local, "fence", None)
        plugin = isinstance(owner, Provider | Vault)
        name = getattr(fn, "__name__", "")
        confirm = plugin and name in MUTATIONS
        kind = "provider" if isinstance(owner, Provider) else "vault"
        pacer = self.runtime.pacer(owner.name) if isinstance(owner, Provider) else None
        local = self._local
        attempt = 0

        def pause(seconds: float) -> None:
            self._pause(seconds)
            if self.stop_event.is_set():
                raise Interrupted("the daemon is stopping")

        def guarded(*call_args: Any, **kwargs: Any) -> T:
            nonlocal attempt
            ticket = pacer.acquire(pause) if pacer is not None else None
            if ticket is not None and ticket.waited:
                local.throttle_wait = getattr(local, "throttle_wait", 0.0) + ticket.waited
            if fence is not None:
                fence.confirm() if confirm else fence.check()
            if not plugin:
                return fn(*call_args, **kwargs)
            attempt += 1
            t0 = time.monotonic()
            status = "error"
            throttled = False
            try:
                result = fn(*call_args, **kwargs)
                status = "ok"
                if pacer is not None and ticket is not None:
                    pacer.succeeded(ticket)
                self.outages.succeeded(kind, owner.name, t0)
                return result
            except RateLimited as exc:
                status, throttled = "transient_error", True
                if pacer is not None and ticket is not None:
                    pacer.throttled(ticket, exc.retry_after)
                local.throttle_wait = (getattr(local, "throttle_wait", 0.0)
                                       + time.monotonic() - t0)
                local.throttled_calls = getattr(local, "throttled_calls", 0) + 1
                self.outages.succeeded(kind, owner.name, t0)  # it answered: it is serving
                raise
            except TransientError as exc:
                status = "transient_error"
                self.outages.failed(kind, owner.name, str(exc))
                raise
            except RotatorError:
                if pacer is not None and ticket is not None:
                    pacer.succeeded(ticket)
                self.outages.succeeded(kind, owner.name, t0)  # it answered: it is serving
                raise
            finally:
                if self.call_observers:
                    self._observe(PluginCall(
                        kind, owner.name, name, status, time.monotonic() - t0, attempt,
                        throttled=throttled,
                        paced_rate=pacer.rate if pacer is not None else None))

        return guarded

    def _observe(self, call: PluginCall) -> None:
        for observer in self.call_observers:
            try:
                observer(call)
            except Exception:  # an observer must never break a rotation
                log.exception("call observer failed")

    def _emit_step(self, rotation: Rotation, step: str, status: str, t0: float,
                   message: str | None) -> None:
        self._emit(self._step_event(rotation, step, status, t0, message,
                                    old_key_id=rotation.old_key_id,
                                    new_key_id=rotation.new_key_id))

    def _step_event(self, rotation: Rotation, step: str, status: str, t0: float,
                    message: str | None, *, old_key_id: str | None,
                    new_key_id: str | None) -> StepFinished:
        return StepFinished(rotation.id, rotation.credential, rotation.agent, rotation.provider,
                            step, status, time.monotonic() - t0, message, self.clock(),
                            old_key_id=old_key_id, new_key_id=new_key_id)

    def _emit(self, event: StepFinished | RotationFinished, *, recorded: bool = False) -> None:
        """Tell the listeners; with ``recorded``, skip those that already recorded ``event``
        inside its step transaction."""
        for listener in self.listeners:
            if recorded and isinstance(listener, TransactionalListener):
                continue
            try:
                listener(event)
            except Exception as exc:  # an observer must never break a rotation
                if self.store.is_unreachable(exc):  # an outage, reported once by the daemon
                    log.error("event listener could not record %s of %s: the state store is "
                              "unavailable (%s)", type(event).__name__, event.credential,
                              self.store.describe_error(exc))
                else:
                    log.exception("event listener failed")


def _apply(rotation: Rotation, fields: dict[str, Any], step: str | None) -> None:
    """Mirror what was just recorded onto the in-memory row (saves reading it back)."""
    for key, value in fields.items():
        setattr(rotation, key, value)
    if step is not None:
        rotation.step = step


_exponential = wait_exponential_jitter(multiplier=0.5, max=10)


class _Deadline:
    """``retry_deadline`` as a tenacity stop, not counting the time this thread spent waiting
    for a rate limit since the retrying began (``local.throttle_wait``: its provider's pacer,
    a 429's round trip, a throttled vault's ``Retry-After``): in a long emergency against a
    rate-limited provider, waiting is the work, and it must not fail rotations. Stops at once
    when the daemon stops."""

    def __init__(self, seconds: float, stop_event: threading.Event,
                 local: threading.local) -> None:
        self.seconds = seconds
        self.stop_event = stop_event
        self.local = local
        self.excused_before = getattr(local, "throttle_wait", 0.0)

    def __call__(self, state: RetryCallState) -> bool:
        if self.stop_event.is_set():
            return True
        excused = getattr(self.local, "throttle_wait", 0.0) - self.excused_before
        return state.seconds_since_start - excused >= self.seconds


def _unless_throttled(wait: Callable[[RetryCallState], float]
                      ) -> Callable[[RetryCallState], float]:
    """``wait`` after a failure, none after a 429: the provider's pacer waits that out."""
    def waiting(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return 0.0 if isinstance(exc, RateLimited) else wait(state)
    return waiting


def _wait_retry_after(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return min(float(retry_after), 60.0)
    return _exponential(state)


def _log_retry(state: RetryCallState, level: int = logging.WARNING) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.log(level, "transient error (attempt %d), retrying: %s", state.attempt_number,
            _describe(exc) if exc else "?")


def _log_retry_quietly(state: RetryCallState) -> None:
    _log_retry(state, logging.DEBUG)


def _describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` safe to store: rotator errors as they are, anything
    else with its type, and every remembered secret scrubbed either way."""
    if isinstance(exc, RotatorError):
        text = str(exc)
    else:
        text = f"internal error {type(exc).__name__}: {exc}"
    return redaction.scrub(text)[:2000]
