"""Each proxied call as an audit event and in the proxy's metrics.

The audit trail is written off the request path: calls are queued and a thread appends them
in batches (one write transaction each), so a busy proxy neither waits for the state store nor
holds its write lock per call. An event names the agent, route, method, path pattern, status,
outcome, duration and bytes: never a body, a header value or a token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from rotator.audit import AuditLog
from rotator.proxy.server import CallRecord

__all__ = ["CallRecorder"]

log = logging.getLogger("rotator.proxy")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120)
BATCH = 2000
FLUSH_SECONDS = 0.25
"""Longest a call's audit event waits to be written with others."""


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
        self._queue: queue.Queue[CallRecord | None] = queue.Queue(maxsize=100_000)
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
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            log.error("the proxy's audit queue is full; a call went unrecorded")

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            # Gather for a moment: one transaction per batch, not per call, costs the event
            # loop (which shares the interpreter) almost nothing.
            until = time.monotonic() + FLUSH_SECONDS
            while len(batch) < BATCH and first is not None and batch[-1] is not None:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, until - time.monotonic())))
                except queue.Empty:
                    break
            records = [r for r in batch if r is not None]
            try:
                self.audit.record_many([self._event(r) for r in records])
            except Exception:
                log.exception("could not write %d proxy audit event(s)", len(records))
            if None in batch:
                return

    def _event(self, r: CallRecord) -> dict[str, object]:
        return {"kind": "proxy", "actor": self.actor, "credential": None,
                "at": datetime.now(UTC),
                "detail": {"agent": r.agent, "route": r.route, "method": r.method,
                           "path": r.path, "status": r.status, "outcome": r.outcome,
                           "duration_seconds": round(r.duration, 4), "bytes": r.bytes_out}}
