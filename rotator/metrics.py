"""Prometheus metrics: counters and histograms from engine events, state gauges from the store.

A private registry, so nothing else in the process leaks into ``/metrics``. The per-credential
gauges are computed from the state store at scrape time (cert-manager's collector pattern), so
they are right from the first scrape after a restart. No label value is ever a secret: labels
are credential, agent and provider names, triggers, outcomes and step names.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from rotator import __version__
from rotator.events import MisuseDetected, PluginCall, RotationFinished, StepFinished
from rotator.probes import ProbeResult

if TYPE_CHECKING:
    from rotator.config import CredentialConfig, Policies
    from rotator.policy import Decision
    from rotator.state.store import DueFacts, StateStore

__all__ = ["Metrics"]

DueGate = Callable[["Mapping[str, DueFacts]"], "Mapping[str, Decision]"]
"""Every credential's due decision from the facts a scrape read (``Engine.due_decisions``)."""

disable_created_metrics()  # `_created` series double the page and no dashboard or alert uses them

log = logging.getLogger("rotator.metrics")

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StateCollector(Collector):
    """Process-wide gauges derived from the state store on every scrape."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_progress = GaugeMetricFamily("rotator_rotations_in_progress",
                                        "Rotations between create and grace right now.")
        awaiting = GaugeMetricFamily("rotator_old_keys_awaiting_revocation",
                                     "Old keys still valid: in their grace period, or failing "
                                     "to revoke.")
        info = GaugeMetricFamily("rotator_build_info", "rotator's version.", labels=["version"])
        info.add_metric([__version__], 1)
        try:
            in_progress.add_metric([], len(self.store.unfinished_rotations()))
            awaiting.add_metric([], self.store.count_pending_revocations())
        except Exception:  # a scrape must answer even when the store hiccups
            log.exception("could not read the state store for /metrics")
        yield from (in_progress, awaiting, info)


class _ReadinessCollector(Collector):
    """``rotator_ready{check}``: /readyz's checks as a gauge, so Prometheus sees (and alerts on)
    a replica that cannot reach its state store or a vault, not just Kubernetes."""

    def __init__(self, ready: Callable[[], Callable[[], ProbeResult]]) -> None:
        self.ready = ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("rotator_ready", "1 while this readiness check passes (the "
                                  "same checks as /readyz), 0 while it fails.", labels=["check"])
        try:
            result = self.ready()()
        except Exception:  # a scrape must answer even when a check misbehaves
            log.exception("could not run the readiness checks for /metrics")
            return
        for check, status in sorted(result.checks.items()):
            gauge.add_metric([check], 1 if status == "ok" else 0)
        yield gauge


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value))


class _PerCredential:
    """The per-credential series, rendered straight to text.

    With thousands of credentials these are nearly all of ``/metrics``, and prometheus-client's
    generic exposition spends ~13 us per sample on them; label strings built once per
    credential and f-strings keep a 10,000-credential scrape well under a second.
    """

    TRIGGERS = ("schedule", "manual", "emergency")
    OUTCOMES = ("success", "failed", "rolled_back")

    def __init__(self, store: StateStore, policies: Callable[[], Policies],
                 due: DueGate | None = None) -> None:
        self.store = store
        self.policies = policies
        self.due = due
        self._lock = threading.Lock()
        self._rotations: dict[tuple[str, str, str, str], float] = {}
        self._rotation_lines: dict[tuple[str, str, str, str], str] = {}
        self._rotations_text: bytes | None = None
        """``rotator_rotations_total`` as encoded text, until a count changes (nine series per
        credential: 90,000 lines at 10,000 credentials, too many to write on every scrape)."""
        self._labels: dict[tuple[str, str, str], str] = {}
        self._max_age: tuple[Policies, list[str]] | None = None
        self._written: dict[str, tuple[Any, ...]] = {}
        """name -> (its policy, due reason, stored facts, and the four lines written from
        them): a credential's lines are written again only when one of those changes."""

    def prime(self, policies: Policies) -> None:
        with self._lock:
            for cred in policies.credentials:
                for trigger in self.TRIGGERS:
                    for outcome in self.OUTCOMES:
                        key = (cred.name, cred.provider, trigger, outcome)
                        if key not in self._rotations:
                            self._set_rotations(key, 0.0)

    def rotated(self, event: RotationFinished) -> None:
        key = (event.credential, event.provider, event.trigger, event.outcome)
        with self._lock:
            self._set_rotations(key, self._rotations.get(key, 0.0) + 1)

    def _set_rotations(self, key: tuple[str, str, str, str], value: float) -> None:
        """Set a count and its line (under ``_lock``); the page is rebuilt at the next scrape."""
        name, provider, trigger, outcome = key
        self._rotations[key] = value
        self._rotation_lines[key] = (f'rotator_rotations_total{{credential="{_escape(name)}",'
                                     f'outcome="{outcome}",provider="{_escape(provider)}",'
                                     f'trigger="{trigger}"}} {_number(value)}')
        self._rotations_text = None

    def _rotations_block(self) -> bytes:
        with self._lock:
            if self._rotations_text is None:
                lines = [self._rotation_lines[k] for k in sorted(self._rotation_lines)]
                self._rotations_text = "\n".join(
                    ["# HELP rotator_rotations_total Finished rotations by outcome.",
                     "# TYPE rotator_rotations_total counter", *lines, ""]).encode()
            return self._rotations_text

    def _max_age_lines(self, policies: Policies) -> list[str]:
        """``rotator_credential_max_age_seconds``: the policy's alone, so written once per
        policy generation."""
        cached = self._max_age
        if cached is not None and cached[0] is policies:
            return cached[1]
        lines = [f"rotator_credential_max_age_seconds"
                 f"{{{self._agent_labels(c.name, c.agent, c.provider)}}} "
                 f"{_number(c.interval.total_seconds())}"
                 for c in policies.credentials if c.interval is not None]
        self._max_age = (policies, lines)
        return lines

    def _agent_labels(self, name: str, agent: str, provider: str) -> str:
        key = (name, agent, provider)
        text = self._labels.get(key)
        if text is None:
            text = (f'agent="{_escape(agent)}",credential="{_escape(name)}",'
                    f'provider="{_escape(provider)}"')
            self._labels[key] = text
        return text

    def _credential_lines(self, cred: CredentialConfig, reason: str | None,
                          fact: DueFacts | None
                          ) -> tuple[str | None, str | None, str | None, str | None]:
        """One credential's due reason, last and next rotation and key expiry lines."""
        labels = self._agent_labels(cred.name, cred.agent, cred.provider)
        reason_line = last_line = next_line = expiry_line = None
        if reason is not None:
            reason_line = f'rotator_credential_due_reason{{{labels},reason="{reason}"}} 1'
        last, nxt = (fact.last_rotated_at, fact.next_due_at) if fact else (None, None)
        if last is not None:
            last_line = (f"rotator_credential_last_rotation_timestamp_seconds"
                         f"{{{labels}}} {_number(last.timestamp())}")
        if nxt is not None:
            next_line = (f"rotator_credential_next_rotation_timestamp_seconds"
                         f"{{{labels}}} {_number(nxt.timestamp())}")
        if last is not None and cred.key_ttl is not None:
            # The key was created moments before the rotation finished: an expiry this
            # late at the latest (the rotation's own duration earlier, in truth).
            expiry_line = (f"rotator_credential_key_expiry_timestamp_seconds"
                           f"{{{labels}}} {_number((last + cred.key_ttl).timestamp())}")
        return reason_line, last_line, next_line, expiry_line

    def render(self) -> bytes:
        rotations = self._rotations_block()
        out: list[str] = []
        try:
            policies = self.policies()
            facts = self.store.due_facts()
            decisions = self.due(facts) if self.due is not None else {}
        except Exception:  # a scrape must answer even when the store hiccups
            log.exception("could not read the state store for /metrics")
            return rotations
        last_lines, next_lines, reason_lines, expiry_lines = [], [], [], []
        age_lines = self._max_age_lines(policies)
        written = self._written
        for cred in policies.credentials:
            decision = decisions.get(cred.name)
            reason = decision.reason if decision is not None else None
            fact = facts.get(cred.name)
            known = written.get(cred.name)
            if known is None or known[0] is not cred or known[1] != reason \
                    or known[2] != fact:
                known = written[cred.name] = (cred, reason, fact,
                                              *self._credential_lines(cred, reason, fact))
            if known[3] is not None:
                reason_lines.append(known[3])
            if known[4] is not None:
                last_lines.append(known[4])
            if known[5] is not None:
                next_lines.append(known[5])
            if known[6] is not None:
                expiry_lines.append(known[6])
        if len(written) > 2 * len(policies.credentials):
            names = {c.name for c in policies.credentials}  # after a reload removed some
            for name in [n for n in written if n not in names]:
                del written[name]
        for name, kind, text, lines in (
            ("rotator_credential_last_rotation_timestamp_seconds", "gauge",
             "When the credential's key was last replaced (Unix time).", last_lines),
            ("rotator_credential_next_rotation_timestamp_seconds", "gauge",
             "When the credential is next due to rotate (Unix time).", next_lines),
            ("rotator_credential_max_age_seconds", "gauge",
             "The policy's interval: the oldest the key should get.", age_lines),
            ("rotator_credential_key_expiry_timestamp_seconds", "gauge",
             "When the credential's current key expires at the provider (key_ttl; Unix "
             "time): a rotation must replace it before then.", expiry_lines),
            ("rotator_credential_due_reason", "gauge",
             "1 for the due gate's reason code now: why the credential is or is not due "
             "(in_grace, retry_backoff, outside_window, not_due, ...).", reason_lines),
        ):
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)
        return rotations + "\n".join(out).encode() + b"\n"


class _CredentialCounter:
    """A counter with a series per credential (and rule), written to text once per change.

    prometheus-client's generic exposition spends ~13 us per sample: the 40,000 usage and
    misuse series of a 10,000-credential fleet took half a second of every scrape, although
    they change only when a usage poll or a misuse rule says so. Each series' line is written
    when its value changes and the family's text when the next scrape asks. ``family()`` is
    the same counter for ``CollectorRegistry.collect`` (``get_sample_value``, other readers).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], float] = {}
        self._lines: dict[tuple[str, ...], str] = {}
        self._text: bytes | None = None

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` (0 creates the series at 0, as ``Counter.labels`` does)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._lock:
            value = self._values.get(labels, 0.0) + amount
            if labels in self._values and not amount:
                return
            self._values[labels] = value
            pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in sorted(
                zip(self.labelnames, labels, strict=True)))  # sorted, as prometheus-client
            self._lines[labels] = f"{self.name}{{{pairs}}} {floatToGoString(value)}"
            self._text = None

    def render(self) -> bytes:
        with self._lock:
            if self._text is None:
                self._text = "\n".join([f"# HELP {self.name} {_escape_help(self.documentation)}",
                                        f"# TYPE {self.name} counter", *self._lines.values(),
                                        ""]).encode()
            return self._text

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name.removesuffix("_total"), self.documentation,
                                     labels=list(self.labelnames))
        with self._lock:
            for labels, value in self._values.items():
                family.add_metric(list(labels), value)
        return family

    def value(self, labels: tuple[str, ...]) -> float | None:
        with self._lock:
            return self._values.get(labels)


class _CredentialCounters(Collector):
    """Puts the :class:`_CredentialCounter` families in the registry for anything that
    collects it, except ``Metrics.render``, which writes them from their cached text."""

    def __init__(self, counters: tuple[_CredentialCounter, ...]) -> None:
        self.counters = counters
        self.hidden = threading.local()

    def describe(self) -> Iterator[CounterMetricFamily]:
        for counter in self.counters:
            yield CounterMetricFamily(counter.name.removesuffix("_total"),
                                      counter.documentation, labels=list(counter.labelnames))

    def collect(self) -> Iterator[CounterMetricFamily]:
        if getattr(self.hidden, "on", False):
            return
        for counter in self.counters:
            yield counter.family()


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Handler(BaseHTTPRequestHandler):
    server_version = "rotator"

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        metrics: Metrics = self.server.metrics  # type: ignore[attr-defined]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, *metrics.render_parts())
        elif path in ("/healthz", "/readyz"):
            probe = metrics.live if path == "/healthz" else metrics.ready
            try:
                result = probe()
            except Exception as exc:  # a probe must answer, and say why it cannot
                log.exception("%s failed", path)
                result = ProbeResult(False, {"probe": f"internal error {type(exc).__name__}"})
            body = json.dumps(result.as_json(), sort_keys=True).encode() + b"\n"
            self._send(200 if result.ok else 503, "application/json", body)
        elif path == "/":
            self._send(200, "text/plain; charset=utf-8",
                       b"rotator: see /metrics, /healthz and /readyz\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, *body: bytes) -> None:
        """Answer with ``body`` written part by part (an 18 MB page is not copied into one)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(part) for part in body)))
        self.end_headers()
        for part in body:
            self.wfile.write(part)


def _always_ok() -> ProbeResult:
    return ProbeResult(True, {})


class Metrics:
    """Owns the registry; subscribe ``on_event`` to the engine and call ``serve``. The daemon
    sets ``live`` and ``ready``, which ``/healthz`` and ``/readyz`` answer with (200 or 503,
    JSON saying which check failed and why)."""

    def __init__(self, store: StateStore, policies: Callable[[], Policies],
                 due: DueGate | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.throttled = Counter(
            "rotator_provider_throttled_total", "Provider calls refused for the provider's "
            "rate limit (429): retried once the provider's pacer allows, never a failure.",
            ["provider"], registry=self.registry)
        self.paced_rate = Gauge(
            "rotator_provider_paced_rate", "Requests per second rotator paces a provider's "
            "calls at since it last throttled (absent: never throttled).", ["provider"],
            registry=self.registry)
        self.retries = Counter(
            "rotator_retries_total", "Provider and vault calls repeated after a transient error.",
            ["kind", "plugin", "operation"], registry=self.registry)
        self.notifications = Counter(
            "rotator_notifications_total", "Webhook notifications by outcome (sent, failed, "
            "dropped).", ["notifier", "outcome"], registry=self.registry)
        per_key = ("credential", "agent", "provider")
        self.key_requests = _CredentialCounter(
            "rotator_key_requests_total", "Requests made with the credential's keys, from the "
            "provider's usage records (counted as rotator polls them).", per_key)
        self.key_tokens = _CredentialCounter(
            "rotator_key_tokens_total", "Tokens used with the credential's keys, from the "
            "provider's usage records.", per_key)
        self.misuse = _CredentialCounter(
            "rotator_misuse_anomalies_total", "Misuse rules that fired (each once), by rule "
            "and action.", (*per_key, "rule", "action"))
        self._per_key = _CredentialCounters((self.key_requests, self.key_tokens, self.misuse))
        self.registry.register(self._per_key)
        self.usage_polls = Counter(
            "rotator_usage_polls_total", "Polls of a provider's usage records by outcome "
            "(ok, rate_limited, unavailable, error).", ["provider", "outcome"],
            registry=self.registry)
        self.registry.register(_StateCollector(store))
        self.per_credential = _PerCredential(store, policies, due)
        self._server: ThreadingHTTPServer | None = None
        self.live: Callable[[], ProbeResult] = _always_ok
        """``/healthz``: is the process working at all (a failure means restart it)."""
        self.ready: Callable[[], ProbeResult] = _always_ok
        """``/readyz``: can it do its job now (state store and vaults reachable)."""
        # Registered last: the registry collects once on registration, reading ``ready``.
        self.registry.register(_ReadinessCollector(lambda: self.ready))

    def prime(self, policies: Policies) -> None:
        """Create every credential's counters at 0, so a first failure is an increase that
        ``increase()``/``rate()`` and the alert rules can see."""
        self.per_credential.prime(policies)
        self.prime_usage(policies.credentials)
        for name in policies.notify:
            for outcome in ("sent", "failed", "dropped"):
                self.notifications.labels(name, outcome)

    def prime_usage(self, credentials: Iterable[CredentialConfig]) -> None:
        """Per-key usage and misuse counters at 0 for each monitored credential."""
        for cred in credentials:
            if cred.misuse is None:
                continue
            labels = (cred.name, cred.agent, cred.provider)
            self.key_requests.inc(labels, 0)
            self.key_tokens.inc(labels, 0)
            for rule, body in cred.misuse.active().items():
                self.misuse.inc((*labels, rule, body.action), 0)

    def on_usage(self, credential: str, agent: str, provider: str, requests: int,
                 tokens: int) -> None:
        self.key_requests.inc((credential, agent, provider), requests)
        self.key_tokens.inc((credential, agent, provider), tokens)

    def on_misuse(self, event: MisuseDetected) -> None:
        self.misuse.inc((event.credential, event.agent, event.provider, event.rule,
                         event.action))

    def on_notification(self, notifier: str, outcome: str) -> None:
        self.notifications.labels(notifier, outcome).inc()

    def render(self) -> bytes:
        """The whole ``/metrics`` page in Prometheus's text format."""
        return b"".join(self.render_parts())

    def render_parts(self) -> list[bytes]:
        """``render``'s page as the blocks it is made of, in order."""
        self._per_key.hidden.on = True  # this thread's collect: written from the cache below
        try:
            generic = generate_latest(self.registry)
        finally:
            self._per_key.hidden.on = False
        # Bytes throughout: the cached blocks are most of a 10,000-credential page (18 MB),
        # encoded once per change rather than on every scrape.
        return [generic, *(c.render() for c in self._per_key.counters),
                self.per_credential.render()]

    def on_event(self, event: StepFinished | RotationFinished) -> None:
        if isinstance(event, StepFinished):
            self.step_duration.labels(event.provider, event.step).observe(event.duration)
            if event.status != "succeeded":
                self.step_failures.labels(event.provider, event.step).inc()
        else:
            self.per_credential.rotated(event)
            self.duration.labels(event.provider).observe(event.duration)

    def on_call(self, call: PluginCall) -> None:
        counter = self.provider_requests if call.kind == "provider" else self.vault_requests
        counter.labels(call.plugin, call.operation, call.status).inc()
        if call.throttled:
            self.throttled.labels(call.plugin).inc()
        if call.paced_rate is not None:
            self.paced_rate.labels(call.plugin).set(call.paced_rate)
        if call.attempt > 1:
            self.retries.labels(call.kind, call.plugin, call.operation).inc()

    def serve(self, address: str) -> str:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0 picks
        one); returns the bound address."""
        host, _, port = address.rpartition(":")
        server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), _Handler)
        server.daemon_threads = True
        server.metrics = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, name="rotator-metrics",
                         daemon=True).start()
        self._server = server
        bound_host, bound_port = server.server_address[:2]
        return f"{bound_host}:{bound_port}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
