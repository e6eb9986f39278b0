"""Prometheus metrics: counters and histograms from engine events, state gauges from the store.

A private registry, so nothing else in the process leaks into ``/metrics``. The per-credential
gauges are computed from the state store at scrape time (cert-manager's collector pattern), so
they are right from the first scrape after a restart. No label value is ever a secret: labels
are credential, agent and provider names, triggers, outcomes and step names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rotator import __version__
from rotator.events import PluginCall, RotationFinished, StepFinished

if TYPE_CHECKING:
    from rotator.config import Policies
    from rotator.state.store import StateStore

__all__ = ["Metrics"]

log = logging.getLogger("rotator.metrics")

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StateCollector(Collector):
    """Gauges derived from the state store on every scrape."""

    def __init__(self, store: StateStore, policies: Callable[[], Policies]) -> None:
        self.store = store
        self.policies = policies

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["credential", "agent", "provider"]
        last = GaugeMetricFamily("rotator_credential_last_rotation_timestamp_seconds",
                                 "When the credential's key was last replaced (Unix time).",
                                 labels=labels)
        nxt = GaugeMetricFamily("rotator_credential_next_rotation_timestamp_seconds",
                                "When the credential is next due to rotate (Unix time).",
                                labels=labels)
        max_age = GaugeMetricFamily("rotator_credential_max_age_seconds",
                                    "The policy's interval: the oldest the key should get.",
                                    labels=labels)
        in_progress = GaugeMetricFamily("rotator_rotations_in_progress",
                                        "Rotations between create and grace right now.")
        awaiting = GaugeMetricFamily("rotator_old_keys_awaiting_revocation",
                                     "Old keys still valid: in their grace period, or failing "
                                     "to revoke.")
        info = GaugeMetricFamily("rotator_build_info", "rotator's version.", labels=["version"])
        info.add_metric([__version__], 1)
        try:
            policies = self.policies()
            states = {s.name: s for s in self.store.credentials()}
            for cred in policies.credentials:
                values = [cred.name, cred.agent, cred.provider]
                state = states.get(cred.name)
                if state is not None and state.last_rotated_at is not None:
                    last.add_metric(values, state.last_rotated_at.timestamp())
                if state is not None and state.next_due_at is not None:
                    nxt.add_metric(values, state.next_due_at.timestamp())
                if cred.interval is not None:
                    max_age.add_metric(values, cred.interval.total_seconds())
            in_progress.add_metric([], len(self.store.unfinished_rotations()))
            awaiting.add_metric([], self.store.count_pending_revocations())
        except Exception:  # a scrape must answer even when the store hiccups
            log.exception("could not read the state store for /metrics")
        yield from (last, nxt, max_age, in_progress, awaiting, info)


class Metrics:
    """Owns the registry; subscribe ``on_event`` to the engine and call ``serve``."""

    def __init__(self, store: StateStore, policies: Callable[[], Policies]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rotations = Counter(
            "rotator_rotations_total", "Finished rotations by outcome.",
            ["credential", "provider", "trigger", "outcome"], registry=self.registry)
        self.duration = Histogram(
            "rotator_rotation_duration_seconds", "From create to done (grace included).",
            ["provider"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.step_duration = Histogram(
            "rotator_rotation_step_duration_seconds", "How long each protocol step took.",
            ["provider", "step"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.step_failures = Counter(
            "rotator_rotation_step_failures_total", "Protocol steps that failed.",
            ["provider", "step"], registry=self.registry)
        self.provider_requests = Counter(
            "rotator_provider_requests_total",
            "Calls to provider APIs by operation and status (ok, transient_error, error).",
            ["provider", "operation", "status"], registry=self.registry)
        self.vault_requests = Counter(
            "rotator_vault_requests_total",
            "Calls to vaults by operation and status (ok, transient_error, error).",
            ["vault", "operation", "status"], registry=self.registry)
        self.retries = Counter(
            "rotator_retries_total", "Provider and vault calls repeated after a transient error.",
            ["kind", "plugin", "operation"], registry=self.registry)
        self.registry.register(_StateCollector(store, policies))
        self._server: Any = None

    def prime(self, policies: Policies) -> None:
        """Create every credential's counters at 0, so a first failure is an increase that
        ``increase()``/``rate()`` and the alert rules can see."""
        for cred in policies.credentials:
            for trigger in ("schedule", "manual", "emergency"):
                for outcome in ("success", "failed", "rolled_back"):
                    self.rotations.labels(cred.name, cred.provider, trigger, outcome)

    def on_event(self, event: StepFinished | RotationFinished) -> None:
        if isinstance(event, StepFinished):
            self.step_duration.labels(event.provider, event.step).observe(event.duration)
            if event.status != "succeeded":
                self.step_failures.labels(event.provider, event.step).inc()
        else:
            self.rotations.labels(event.credential, event.provider, event.trigger,
                                  event.outcome).inc()
            self.duration.labels(event.provider).observe(event.duration)

    def on_call(self, call: PluginCall) -> None:
        counter = self.provider_requests if call.kind == "provider" else self.vault_requests
        counter.labels(call.plugin, call.operation, call.status).inc()
        if call.attempt > 1:
            self.retries.labels(call.kind, call.plugin, call.operation).inc()

    def serve(self, address: str) -> str:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks one); returns the bound address."""
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                            registry=self.registry)
        self._server = server
        bound_host, bound_port = server.server_address[:2]
        return f"{bound_host}:{bound_port}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
