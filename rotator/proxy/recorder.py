"""Each proxied call as an audit event and in the proxy's metrics.

The audit trail is written off the request path: calls are appended to a deque (atomic, no
lock, no thread to wake) and a thread writes what gathered every quarter second in one write
transaction, so a busy proxy neither waits for the state store nor holds its write lock per
call. An event names the agent, route, method, path pattern, status,
outcome, duration and bytes: never a body, a header value or a token.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from rotator.audit import AuditLog
from rotator.monitor import PROXY_USAGE
from rotator.proxy.server import CallRecord

__all__ = ["CallRecorder", "usage_rows"]

log = logging.getLogger("rotator.proxy")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120)
BATCH = 2000
FLUSH_SECONDS = 0.25
"""Longest a call's audit event waits to be written with others."""
MAX_PENDING = 200_000
"""Calls waiting to be written beyond which new ones are counted as lost, not kept."""


class CallRecorder:
    """Counts each call in ``registry`` at once and queues its audit event."""

    def __init__(self, audit: AuditLog, registry: CollectorRegistry,
                 actor: str = "proxy") -> None:
        self.audit, self.actor = audit, actor
        self.requests = Counter("rotator_proxy_requests_total",
                                "Calls through the credential proxy, by agent, route and "
                                "outcome (ok, upstream_error, or the denial's code).",
                                ["agent", "route", "outcome"], registry=registry)
        self.latency = Histogram("rotator_proxy_request_duration_seconds",
                                 "Time from a call's arrival to its last byte sent back.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._histograms: dict[str, Any] = {}
        self._pending: deque[CallRecord] = deque()
        self._closing = threading.Event()
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="proxy-audit", daemon=True)
        self._thread.start()

    def __call__(self, record: CallRecord) -> None:
        key = (record.agent, record.route, record.outcome)
        counter = self._counters.get(key)
        if counter is None:  # a label lookup takes a lock: once per series, not per call
            counter = self._counters[key] = self.requests.labels(*key)
        counter.inc()
        histogram = self._histograms.get(record.route)
        if histogram is None:
            histogram = self._histograms[record.route] = self.latency.labels(record.route)
        histogram.observe(record.duration)
        if len(self._pending) < MAX_PENDING:
            self._pending.append(record)
        else:
            self._dropped += 1

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop."""
        self._closing.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            closing = self._closing.wait(FLUSH_SECONDS)
            while self._pending:
                batch = [self._pending.popleft()
                         for _ in range(min(BATCH, len(self._pending)))]
                try:
                    self.audit.record_many([self._event(r) for r in batch])
                except Exception:
                    log.exception("could not write %d proxy audit event(s)", len(batch))
                try:
                    self.audit.store.add_usage(PROXY_USAGE, usage_rows(batch))
                except Exception:
                    log.exception("could not count %d proxied call(s) as key usage",
                                  len(batch))
            if self._dropped:
                log.error("the proxy's audit backlog was full (the state store too slow?): "
                          "%d call(s) went unrecorded", self._dropped)
                self._dropped = 0
            if closing:
                return

    def _event(self, r: CallRecord) -> dict[str, object]:
        return {"kind": "proxy", "actor": self.actor, "credential": None,
                "at": datetime.fromtimestamp(r.at, UTC),
                "detail": {"agent": r.agent, "route": r.route, "method": r.method,
                           "path": r.path, "status": r.status, "outcome": r.outcome,
                           "duration_seconds": round(r.duration, 4), "bytes": r.bytes_out}}


def usage_rows(records: list[CallRecord]) -> list[dict[str, object]]:
    """The forwarded calls of ``records`` as key usage: requests per credential and key, per
    minute and per hour (what the misuse rules read with ``source = "proxy"``)."""
    counts: dict[tuple[str, str, int, int], int] = {}
    for r in records:
        if r.credential is None:
            continue
        for width in (60, 3600):
            key = (r.credential, r.key_id or "(unknown)", width, int(r.at // width * width))
            counts[key] = counts.get(key, 0) + 1
    return [{"credential": cred, "key_id": key_id, "width": width,
             "start": datetime.fromtimestamp(start, UTC), "requests": n}
            for (cred, key_id, width, start), n in counts.items()]
