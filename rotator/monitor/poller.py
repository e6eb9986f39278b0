"""The usage poller: asks each provider that reports per-key usage for it, keeps the buckets,
checks the misuse rules, acts on what fires, and revokes quiet old keys early.

One poll per provider serves all its credentials (the usage APIs answer for many keys at once).
A poll runs under the provider's lease (``usage:NAME`` in the locks table), so among replicas
one polls, and where each provider's poll stands (``usage_polls``) is in the store, so a
restart or another replica carries on from it. A rate-limited or failing poll backs off
(the provider's ``Retry-After`` when it gives one) and never touches a rotation.

Hourly buckets are kept for every key in use and those replaced within the baseline, backfilled
over the baseline on the first poll; keys just replaced, and their successors, are also polled
in minute buckets, which the old-key rule and ``revoke_when = "quiet"`` need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from rotator.app import App
from rotator.config import CredentialConfig
from rotator.durations import format_duration
from rotator.engine import RotationRequest, RotationResult
from rotator.errors import RotatorError, TransientError
from rotator.events import MisuseDetected
from rotator.interfaces import UsageBucket, UsageReport
from rotator.key_usage import KeyHistory, key_histories
from rotator.memory import release_freed_memory
from rotator.monitor import PROXY_USAGE
from rotator.monitor.rules import DAY, Finding, evaluate, switched_at, used
from rotator.state.models import KeyUsage

__all__ = ["PollResult", "UsageMonitor"]

log = logging.getLogger("rotator.monitor")

HOUR, MINUTE = timedelta(hours=1), timedelta(minutes=1)
FINE_POLL = timedelta(minutes=1)
"""Poll at least this often while a quiet revocation waits on a provider's keys."""
MAX_BACKOFF = timedelta(hours=1)
PRUNE_EVERY = timedelta(hours=1)
ACTOR = "monitor"


def _floor(value: datetime, width: timedelta) -> datetime:
    seconds = int(width.total_seconds())
    return value - timedelta(seconds=int(value.timestamp()) % seconds,
                             microseconds=value.microsecond)


@dataclass
class PollResult:
    """What one poll of one provider did (the bench and tests read it)."""

    provider: str
    outcome: str
    """``ok``, ``rate_limited``, ``unavailable`` (the service did not answer), ``error`` or
    ``skipped`` (another replica holds the lease)."""
    keys: int = 0
    calls: int = 0
    buckets: int = 0
    findings: list[Finding] = field(default_factory=list)
    revoked_early: list[str] = field(default_factory=list)


class UsageMonitor:
    """Polls usage for the credentials of ``app``'s current policies.

    ``run_action(name, work)`` runs a ``revoke`` action's emergency rotation (the daemon hands it
    to its worker pool; tests run it inline). ``listeners`` hear each :class:`MisuseDetected`
    (metrics, log); the audit trail and notifications are always told. ``on_usage`` and
    ``on_poll`` feed the metrics; ``wake`` asks the daemon for a tick (a revocation made due).
    """

    def __init__(self, app: App, clock: Callable[[], datetime], *,
                 run_action: Callable[[str, Callable[[], Any]], Any] | None = None,
                 listeners: Sequence[Callable[[MisuseDetected], None]] = (),
                 on_usage: Callable[[str, str, str, int, int], None] | None = None,
                 on_poll: Callable[[str, str], None] | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        self.app, self.clock = app, clock
        self.run_action = run_action or (lambda _name, work: work())
        self.listeners = list(listeners)
        self.on_usage, self.on_poll, self.wake = on_usage, on_poll, wake
        self.started = clock()
        self._pruned: datetime | None = None
        self._adopted: dict[str, tuple[str | None, str | None]] = {}

    # -- which providers -----------------------------------------------------------------------

    def monitored(self) -> dict[str, list[CredentialConfig]]:
        """Provider name -> its credentials with rules, for providers that report usage."""
        policies = self.app.policies
        if policies.settings.usage_poll_interval <= timedelta(0):
            return {}
        out: dict[str, list[CredentialConfig]] = {}
        for cred in policies.credentials:
            if cred.misuse is not None:
                source = PROXY_USAGE if cred.misuse.source == "proxy" else cred.provider
                out.setdefault(source, []).append(cred)
        return out

    def poll_due(self) -> list[PollResult]:
        """Poll every monitored provider whose next poll is due."""
        now = self.clock()
        results = []
        for name in self.monitored():
            state = self.app.store.usage_poll(name)
            if state is None or state.next_poll_at <= now:
                results.append(self.poll(name))
        return results

    # -- one poll ------------------------------------------------------------------------------

    def poll(self, provider_name: str) -> PollResult:
        creds = self.monitored().get(provider_name, [])
        provider = None if provider_name == PROXY_USAGE else \
            self.app.runtime.provider(provider_name)
        if not creds or (provider is not None and (not isinstance(provider, UsageReport)
                                                   or not provider.usage_widths)):
            return PollResult(provider_name, "skipped")
        store, settings = self.app.store, self.app.policies.settings
        lease, owner = f"usage:{provider_name}", self.app.engine.owner
        now = self.clock()
        if store.take_lock(lease, owner, settings.lock_ttl, now).holder is not None:
            return PollResult(provider_name, "skipped")
        try:
            result = (self._judge_proxy_counts(creds, now) if provider is None
                      else self._poll(provider_name, provider, creds, now))
        except TransientError as exc:  # rate limited (with Retry-After), or away
            result = self._failed(provider_name, now, exc, "rate_limited"
                                  if exc.retry_after is not None else "unavailable")
        except RotatorError as exc:
            result = self._failed(provider_name, now, exc, "error")
        finally:
            store.unlock(lease, owner)
            release_freed_memory()  # a poll of thousands of keys leaves a heap of garbage
        if self.on_poll is not None:
            self.on_poll(provider_name, result.outcome)
        return result

    def _failed(self, name: str, now: datetime, exc: RotatorError, outcome: str) -> PollResult:
        state = self.app.store.usage_poll(name)
        failures = (state.failures if state else 0) + 1
        interval = self.app.policies.settings.usage_poll_interval
        wait = min(interval * 2 ** min(failures, 10), MAX_BACKOFF)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            wait = max(wait, timedelta(seconds=retry_after))
        (log.error if outcome == "error" else log.warning)(
            "usage poll of %s failed (%s); next try in %.0fs", name, exc, wait.total_seconds())
        self.app.store.set_usage_poll(name, next_poll_at=now + wait, failures=failures,
                                      last_error=str(exc)[:500])
        return PollResult(name, outcome)

    def _poll(self, name: str, provider: UsageReport, creds: list[CredentialConfig],
              now: datetime) -> PollResult:
        store = self.app.store
        result = PollResult(name, "ok")
        baseline = max((c.misuse.spike.baseline_days if c.misuse and c.misuse.spike else 1)
                       for c in creds)
        keep = DAY * (baseline + 1)
        histories: dict[str, dict[str, KeyHistory]] = {}
        owner: dict[str, CredentialConfig] = {}
        for cred in creds:
            if self.app.engine.stop_event.is_set():
                # A first poll of a large fleet asks the vault (and the provider) once per
                # never-rotated credential: a stop must not wait for all of them.
                return PollResult(name, "skipped")
            keys = {k: h for k, h in key_histories(store, cred).items()
                    if h.replaced_at is None or now - h.replaced_at < keep}
            if not keys:
                adopted = self._adopted_key(cred)
                if adopted is not None:
                    keys[adopted] = KeyHistory(cred.name, cred.agent, cred.provider, adopted)
            histories[cred.name] = keys
            owner.update({k: cred for k in keys})
        result.keys = len(owner)
        if not owner:
            return self._done(name, now, result, fine=False)
        state = store.usage_poll(name)
        # Hourly buckets where the service has them (a day's where it keeps only days).
        coarse = HOUR if HOUR in provider.usage_widths else min(
            (w for w in provider.usage_widths if w > HOUR), default=HOUR)
        backfill = _floor(now - keep, coarse)
        known = {r.key_id for r in store.usage(key_ids=list(owner), since=backfill,
                                               width=int(coarse.total_seconds()),
                                               provider=name)}
        since = (_floor(state.polled_at - coarse, coarse) if state and state.polled_at
                 else backfill)
        groups = [(sorted(known), max(since, backfill)),
                  (sorted(set(owner) - known), backfill)]
        end = now + MINUTE  # the current bucket, however far it has filled
        hourly: list[UsageBucket] = []
        for key_ids, start in groups:
            if key_ids:
                hourly += provider.usage(key_ids, start, end, coarse)
                result.calls += 1
        fine_keys, fine_since = self._fine_keys(histories, now)
        minute: list[UsageBucket] = []
        if fine_keys and MINUTE in provider.usage_widths:
            fine_from = max(_floor(fine_since, MINUTE), now - DAY)
            minute = provider.usage(sorted(fine_keys), fine_from, end, MINUTE)
            result.calls += 1
        self._save(name, owner, hourly + minute)
        result.buckets = len(hourly) + len(minute)
        self._check(name, creds, histories, now, result)
        self._quiet(creds, histories, now, result)
        return self._done(name, now, result, fine=bool(fine_keys))

    def _judge_proxy_counts(self, creds: list[CredentialConfig], now: datetime
                            ) -> PollResult:
        """``source = "proxy"``: nothing to ask; the proxy (each replica adding its own) has
        counted the calls it forwarded, and the rules judge those buckets."""
        result = PollResult(PROXY_USAGE, "ok")
        histories = {c.name: key_histories(self.app.store, c) for c in creds}
        result.keys = sum(len(h) for h in histories.values())
        self._check(PROXY_USAGE, creds, histories, now, result)
        return self._done(PROXY_USAGE, now, result, fine=False)

    def _adopted_key(self, cred: CredentialConfig) -> str | None:
        """The id of the key a never-rotated credential holds (imported, or adopted from a
        ``.env`` file): from the vault's metadata or the provider's ``identify``, once per
        vault version, so it is watched before its first rotation."""
        runtime = self.app.runtime
        try:
            provider = runtime.provider(cred.provider)
            info = runtime.info(cred)
            current = runtime.vault(cred.vault).read(cred.path, cred.field,
                                                      provider.companion_fields(info))
            if current.secret is None:
                return None
            cached = self._adopted.get(cred.name)
            if cached is not None and cached[0] == current.version:
                return cached[1]
            key_id = current.metadata.get("key_id") or None
            if key_id is None and provider.capabilities.identify:
                key_id = provider.identify(info, current.secret, dict(current.companions))
        except RotatorError as exc:
            log.info("%s: cannot tell which key it holds yet (%s); its usage is watched "
                     "from its first rotation", cred.name, exc)
            return None
        self._adopted[cred.name] = (current.version, key_id)
        return key_id

    def _fine_keys(self, histories: dict[str, dict[str, KeyHistory]], now: datetime
                   ) -> tuple[set[str], datetime]:
        """Old keys still in their grace period (and their successors), and since when."""
        keys: set[str] = set()
        since = now
        for history in (h for keys_ in histories.values() for h in keys_.values()):
            if (history.replaced_at is not None and history.revoked_at is None
                    and self.app.store.pending_revocations(key_id=history.key_id,
                                                           credential=history.credential)):
                keys.add(history.key_id)
                if history.replaced_by:
                    keys.add(history.replaced_by)
                since = min(since, history.replaced_at - MINUTE)
        return keys, since

    def _save(self, name: str, owner: dict[str, CredentialConfig],
              buckets: list[UsageBucket]) -> None:
        """Store the buckets and count what grew since the last poll in the metrics."""
        store = self.app.store
        if not buckets:
            return
        first = min(b.start for b in buckets)
        before = {(r.key_id, r.width, r.start): r for r in store.usage(
            key_ids=sorted({b.key_id for b in buckets}), since=first, provider=name)}
        rows = []
        grew: dict[str, tuple[CredentialConfig, list[int]]] = {}
        for b in buckets:
            cred = owner.get(b.key_id)
            if cred is None:
                continue
            width = int(b.width.total_seconds())
            rows.append({"key_id": b.key_id, "credential": cred.name, "start": b.start,
                         "width": width, "requests": b.requests, "tokens": b.tokens,
                         "cost": b.cost})
            # Counted from hourly (or daily) buckets only (minute ones cover the same calls),
            # and only those this process saw fill, so a restart's backfill is no burst.
            if width >= 3600 and b.start + b.width > self.started:
                old = before.get((b.key_id, width, b.start))
                t = grew.setdefault(cred.name, (cred, [0, 0]))[1]
                t[0] += max(0, (b.requests or 0) - ((old.requests or 0) if old else 0))
                t[1] += max(0, (b.tokens or 0) - ((old.tokens or 0) if old else 0))
        store.save_usage(name, rows)
        if self.on_usage is not None:
            for cred, (requests, tokens) in grew.values():
                self.on_usage(cred.name, cred.agent, cred.provider, requests, tokens)

    def _done(self, name: str, now: datetime, result: PollResult, *, fine: bool) -> PollResult:
        settings = self.app.policies.settings
        interval = settings.usage_poll_interval
        if fine:
            interval = min(interval, FINE_POLL)
        self.app.store.set_usage_poll(name, polled_at=now, next_poll_at=now + interval,
                                      failures=0, last_error=None)
        if self._pruned is None or now - self._pruned >= PRUNE_EVERY:
            self._pruned = now
            self.app.store.prune_usage(now - settings.usage_retention)
        return result

    # -- rules and actions ---------------------------------------------------------------------

    def _rows(self, cred: CredentialConfig, now: datetime, keep: timedelta
              ) -> tuple[list[KeyUsage], list[KeyUsage]]:
        rows = self.app.store.usage(credentials=[cred.name], since=now - keep)
        return ([r for r in rows if r.width >= 3600], [r for r in rows if r.width == 60])

    def _check(self, name: str, creds: list[CredentialConfig],
               histories: dict[str, dict[str, KeyHistory]], now: datetime,
               result: PollResult) -> None:
        store = self.app.store
        longest = max(c.misuse.spike.baseline_days if c.misuse and c.misuse.spike else 1
                      for c in creds)
        # Two reads for the whole provider, not two per credential.
        rows: dict[str, list[KeyUsage]] = {}
        for row in store.usage(provider=name, since=now - DAY * (longest + 1)):
            rows.setdefault(row.credential, []).append(row)
        recent: dict[str, set[str]] = {}
        for anomaly in store.anomalies(since=now - DAY):
            recent.setdefault(anomaly.credential, set()).add(anomaly.rule)
        for cred in creds:
            assert cred.misuse is not None
            baseline = cred.misuse.spike.baseline_days if cred.misuse.spike else 1
            own = [r for r in rows.get(cred.name, ()) if r.start >= now - DAY * (baseline + 1)]
            hourly = [r for r in own if r.width >= 3600]
            minute = [r for r in own if r.width == 60]
            for finding in evaluate(cred, histories[cred.name], hourly, minute, now,
                                    recent.get(cred.name, set())):
                if self._fire(cred, finding, now):
                    result.findings.append(finding)

    def _fire(self, cred: CredentialConfig, finding: Finding, now: datetime) -> bool:
        """Record the anomaly (once: False if it fired before), tell everyone, act."""
        anomaly_id = self.app.store.record_anomaly(
            credential=cred.name, agent=cred.agent, provider=cred.provider,
            key_id=finding.key_id, rule=finding.rule, subject=finding.subject,
            action=finding.action, detected_at=now, message=finding.message)
        if anomaly_id is None:
            return False
        event = MisuseDetected(anomaly_id, cred.name, cred.agent, cred.provider,
                               finding.key_id, finding.rule, finding.action, finding.message,
                               finding.figures, now)
        log.warning("misuse of %s (agent %s, rule %s, action %s): %s", cred.name, cred.agent,
                    finding.rule, finding.action, finding.message)
        self.app.audit.record("misuse", credential=cred.name, actor=ACTOR,
                              reason=finding.message, at=now, detail={
                                  "anomaly_id": anomaly_id, "rule": finding.rule,
                                  "action": finding.action, "key_id": finding.key_id,
                                  "agent": cred.agent, "figures": finding.figures})
        self.app.notifier(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a misuse listener failed")
        if finding.action == "revoke":
            self.run_action(cred.name, lambda: self.revoke(cred.name, anomaly_id, finding))
        return True

    def revoke(self, name: str, anomaly_id: int, finding: Finding) -> RotationResult:
        """A ``revoke`` action: rotate now and revoke the old key as soon as the agent is
        healthy on the new one (no grace), so the agent loses no call; if that cannot work
        (the provider cannot create keys, or the rotation fails or rolls back), revoke the
        key first anyway: a key being misused must die, and an agent without a key is the
        lesser harm."""
        engine = self.app.engine
        cred = self.app.policies.credential(name)
        reason = f"misuse ({finding.rule}): {finding.message}"
        can_create = self.app.runtime.provider(cred.provider).capabilities.create
        wait = self.app.policies.settings.lock_ttl.total_seconds()
        result: RotationResult | None = None
        if can_create and not cred.manual_only:
            result = engine.rotate(RotationRequest(
                credential=name, trigger="emergency", revoke_mode="immediately",
                reason=reason, requested_by=ACTOR), wait=wait)
        if result is None or result.outcome in ("failed", "rolled_back"):
            if result is not None:
                log.error("misuse of %s: the rotation %s (%s); revoking the key first",
                          name, result.outcome, result.message)
            result = engine.rotate(RotationRequest(
                credential=name, trigger="emergency", revoke_mode="first", reason=reason,
                requested_by=ACTOR), wait=wait)
        self.app.store.update_anomaly(anomaly_id, rotation_id=result.rotation_id)
        return result

    # -- revoke when quiet ---------------------------------------------------------------------

    def _quiet(self, creds: list[CredentialConfig],
               histories: dict[str, dict[str, KeyHistory]], now: datetime,
               result: PollResult) -> None:
        """Make the revocation of an old key due now once it has gone unused for
        ``quiet_for`` since the switch; name a straggler still using it ``quiet_for`` after
        the switch, once (it is revoked at the grace bound, as with a fixed grace)."""
        store = self.app.store
        for cred in creds:
            if cred.revoke_when != "quiet":
                continue
            _hourly, minute = self._rows(cred, now, DAY)
            for rev in store.pending_revocations(credential=cred.name):
                history = histories[cred.name].get(rev.key_id)
                if history is None or history.replaced_at is None or rev.not_before <= now:
                    continue
                used_in = [r for r in minute if r.key_id == rev.key_id and used(r)]
                last = max((r.start + MINUTE for r in used_in), default=None)
                quiet_since = max(history.replaced_at, last or history.replaced_at)
                if now - quiet_since >= cred.quiet_for:
                    store.reschedule_revocation(rev.id, now)
                    result.revoked_early.append(rev.key_id)
                    log.info("%s: old key %s unused for %s since %s: revoking it now, before "
                             "its grace ends at %s", cred.name, rev.key_id,
                             format_duration(cred.quiet_for),
                             quiet_since.isoformat(timespec="seconds"),
                             rev.not_before.isoformat(timespec="seconds"))
                    if self.wake is not None:
                        self.wake()
                elif now - history.replaced_at >= cred.quiet_for:
                    switched = switched_at(history, minute)
                    message = (f"{cred.agent} still uses old key {rev.key_id} of {cred.name} "
                               f"(last use before {last.isoformat(timespec='minutes')}, "
                               "the switch was at "
                               f"{history.replaced_at.isoformat(timespec='minutes')}); "
                               "the grace period ends at "
                               f"{rev.not_before.isoformat(timespec='minutes')} and revokes it"
                               + ("" if switched is None else
                                  f" (its new key has been in use since "
                                  f"{switched.isoformat(timespec='minutes')})"))
                    finding = Finding("straggler", f"straggler:{rev.key_id}", rev.key_id,
                                      "alert", message,
                                      {"last_use_before": last.isoformat(),
                                       "grace_ends": rev.not_before.isoformat()})
                    if self._fire(cred, finding, now):
                        result.findings.append(finding)

