"""Webhook notifications: tell people when a rotation needs their attention.

The engine calls its listeners on the rotation's own thread, so :class:`Notifier` only decides
whether an event matters and queues a small document; one daemon thread per ``[notify.NAME]``
target sends it. A webhook that is slow, down or refusing can only delay its own later
notifications, never a rotation: each target's queue is bounded (when full the oldest entry is
dropped, with a warning), every request has a timeout, retries back off, and
:meth:`Notifier.close` waits a bounded time at exit.

What a target can ask for (its ``events``):

- ``failure``: a rotation ended ``failed``; an old key could not be revoked after its grace
  period (it is still valid); the clean-up after a failed rotation is failing; or a rotation
  succeeded but left an old key that must be revoked by hand.
- ``rollback``: the agent did not come up healthy on the new key; the old key is current again.
- ``emergency``: every ``rotate-now --revoke-first`` / ``--revoke-immediately``, whatever its
  outcome.
- ``success``: every rotation that ended ``success`` (off by default: it is noise for a pager).

Nothing secret is ever sent or logged: documents carry names, key ids and the engine's already
scrubbed messages. A target's URL and header values may be secret references; they are read in
the sending thread, wrapped as :class:`~rotator.interfaces.Secret` (so the log filter scrubs them
anywhere) and never logged: messages name the target ``notify.NAME``.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx

from rotator import __version__, redaction
from rotator.errors import RotatorError, TransientError
from rotator.events import MisuseDetected, RotationFinished, StepFinished
from rotator.plugin_support import retry_after

__all__ = [
    "EXIT_WAIT_SECONDS",
    "SCHEMA",
    "Notification",
    "Notifier",
    "NotifyTarget",
    "classify",
    "generic_payload",
    "slack_payload",
]

log = logging.getLogger("rotator.notify")

SCHEMA = "rotator.notification/v1"
"""``schema`` of every generic document; a change that breaks receivers bumps it."""
QUEUE_SIZE = 256
"""Notifications waiting per target; beyond that the oldest is dropped."""
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
RETRY_AFTER_MAX = 120.0
"""A ``Retry-After`` longer than this is cut short: the queue behind it is waiting."""
EXIT_WAIT_SECONDS = 5.0
"""How long a command or the daemon waits at exit for notifications still queued."""
DROP_WARNING_INTERVAL = 60.0
_DEDUPE = 1024
_EXCERPT = 200
_EMERGENCY_MODES = ("first", "immediately")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class NotifyTarget(Protocol):
    """What :class:`Notifier` reads from a ``[notify.NAME]`` section
    (:class:`rotator.config.NotifyConfig`)."""

    @property
    def type(self) -> str: ...  # "webhook" | "slack"
    @property
    def url(self) -> Any: ...  # str or SecretRef
    @property
    def events(self) -> Sequence[str]: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def bearer_token(self) -> Any: ...
    @property
    def timeout(self) -> timedelta: ...
    @property
    def retries(self) -> int: ...
    def wants(self, credential: str) -> bool: ...


@dataclass(frozen=True)
class Notification:
    """One thing to tell: ``document`` is the generic JSON body (see :func:`generic_payload`)."""

    id: str
    event: str
    categories: frozenset[str]
    credential: str
    document: dict[str, Any] = field(hash=False, compare=False)


# -- what is worth telling ---------------------------------------------------------------------


def classify(event: StepFinished | RotationFinished | MisuseDetected
             ) -> tuple[str, frozenset[str]] | None:
    """The notification kind of an engine event and the ``events`` categories it belongs to,
    or None when it is not worth a notification."""
    if isinstance(event, MisuseDetected):
        return "misuse_detected", frozenset({"misuse"} | (
            {"emergency"} if event.action == "revoke" else set()))
    if isinstance(event, RotationFinished):
        kind = {"failed": "rotation_failed", "rolled_back": "rotation_rolled_back",
                "success": "rotation_succeeded"}.get(event.outcome)
        if kind is None:
            return None
        categories = {{"rotation_failed": "failure", "rotation_rolled_back": "rollback",
                       "rotation_succeeded": "success"}[kind]}
        if _is_emergency(event):
            categories.add("emergency")
        if event.manual_revoke:
            categories.add("failure")  # a person must revoke an old key
        return kind, frozenset(categories)
    if event.status == "failed" and event.step == "revoke":
        return "revocation_failed", frozenset({"failure"})
    if event.status == "failed" and event.step == "rollback":
        return "cleanup_failed", frozenset({"failure"})
    return None


def _is_emergency(event: RotationFinished) -> bool:
    return event.trigger == "emergency" or event.revoke_mode in _EMERGENCY_MODES


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def misuse_payload(event: MisuseDetected, categories: frozenset[str], host: str
                   ) -> dict[str, Any]:
    """The generic JSON document of a misuse alert: the rotation fields are null, ``rule``,
    ``action`` and ``figures`` say what fired (documented in docs/notifications.md)."""
    doc: dict[str, Any] = {
        "schema": SCHEMA, "id": f"misuse:{event.anomaly_id}", "event": "misuse_detected",
        "categories": sorted(categories), "summary": "", "credential": event.credential,
        "agent": event.agent, "provider": event.provider, "rotation_id": None,
        "outcome": None, "step": None, "emergency": event.action == "revoke", "trigger": None,
        "revoke_mode": None, "requested_by": None, "reason": None, "error": None,
        "action_needed": None, "old_key_id": None, "new_key_id": None,
        "duration_seconds": 0.0, "at": _iso(event.at),
        "rotator": {"host": host, "version": __version__},
        "rule": event.rule, "action": event.action, "key_id": event.key_id,
        "figures": event.figures,
    }
    verb = ("rotating it now and revoking the key" if event.action == "revoke"
            else "look at `rotator usage " + event.credential + "`")
    doc["summary"] = f"Misuse of {event.credential} ({event.rule}): {event.message}; {verb}"
    return doc


def generic_payload(event: StepFinished | RotationFinished, kind: str,
                    categories: frozenset[str], host: str) -> dict[str, Any]:
    """The generic JSON document (documented in docs/notifications.md)."""
    finished = isinstance(event, RotationFinished)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "id": f"{event.rotation_id}:{kind}",
        "event": kind,
        "categories": sorted(categories),
        "summary": "",
        "credential": event.credential,
        "agent": event.agent,
        "provider": event.provider,
        "rotation_id": event.rotation_id,
        "outcome": event.outcome if finished else None,
        "step": None if finished else event.step,
        "emergency": finished and _is_emergency(event),
        "trigger": event.trigger if finished else None,
        "revoke_mode": event.revoke_mode if finished else None,
        "requested_by": event.requested_by if finished else None,
        "reason": event.reason if finished else None,
        "error": event.message,
        "action_needed": event.manual_revoke if finished else None,
        "old_key_id": event.old_key_id,
        "new_key_id": event.new_key_id,
        "duration_seconds": round(event.duration, 3),
        "at": _iso(event.at),
        "rotator": {"host": host, "version": __version__},
    }
    doc["summary"] = _headline(doc)
    return doc


def _headline(doc: Mapping[str, Any]) -> str:
    """One sentence an on-call engineer can act on, without the error text."""
    cred, event = doc["credential"], doc["event"]
    what = "Emergency rotation" if doc["emergency"] else "Rotation"
    mode = f" ({_MODES[doc['revoke_mode']]})" if doc["revoke_mode"] in _MODES else ""
    if event == "rotation_failed":
        tail = ("the old key may already be revoked: check the agent"
                if doc["revoke_mode"] == "first" else "the old key is still in use")
        text = f"{what} of {cred}{mode} failed; {tail}"
    elif event == "rotation_rolled_back":
        text = (f"{what} of {cred}{mode} rolled back: the agent failed its health check (or "
                "reload hook) on the new key; the old key is current again")
    elif event == "rotation_succeeded":
        text = f"{what} of {cred}{mode} succeeded: new key {doc['new_key_id'] or '?'} is current"
        if doc["emergency"] and doc["old_key_id"]:
            text += f", old key {doc['old_key_id']} revoked"
    elif event == "revocation_failed":
        text = (f"Old key {doc['old_key_id'] or '?'} of {cred} could not be revoked and is "
                "still valid; rotator keeps retrying")
    else:
        text = f"Clean-up after the failed rotation of {cred} is failing; rotator keeps retrying"
    if doc["action_needed"]:
        text += "; ACTION NEEDED"
    return text


_SLACK_EMOJI = {"rotation_failed": ":x:", "rotation_rolled_back": ":leftwards_arrow_with_hook:",
                "rotation_succeeded": ":white_check_mark:", "revocation_failed": ":warning:",
                "cleanup_failed": ":warning:", "misuse_detected": ":rotating_light:"}


_MODES = {"first": "old key revoked first", "immediately": "no grace period"}


def _slack_escape(text: object, limit: int) -> str:
    """Slack's three control characters escaped, and the text cut to ``limit``."""
    value = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value if len(value) <= limit else value[:limit - 1] + "…"


def slack_payload(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message from a generic document: ``text`` (what a phone
    notification shows) and ``blocks`` (the message). Accepted by Mattermost too."""
    emoji = ":rotating_light:" if doc["emergency"] else _SLACK_EMOJI.get(doc["event"], ":bell:")
    error = " ".join(str(doc["error"] or "").split())
    text = f"{emoji} {doc['summary']}" + (f"\n{error[:_EXCERPT]}" if error else "")
    lead = f"{emoji} *{_slack_escape(doc['summary'], 600)}*"
    if error:
        lead += "\n>" + _slack_escape(error, 2000)
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": lead}}]
    if doc["action_needed"]:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": (
            ":warning: *Action needed:* " + _slack_escape(doc["action_needed"], 2500))}})
    facts = [("Credential", doc["credential"], True), ("Agent", doc["agent"], False),
             ("Provider", doc["provider"], False),
             ("Outcome", doc["outcome"] or (f"step {doc['step']} failed"), False),
             ("Trigger", ", ".join(v for v in (doc["trigger"], _MODES.get(doc["revoke_mode"]))
                                   if v), False),
             ("Requested by", doc["requested_by"], False), ("Reason", doc["reason"], False),
             ("Old key", doc["old_key_id"], True), ("New key", doc["new_key_id"], True),
             ("Rotation", doc["rotation_id"], True)]
    fields = [{"type": "mrkdwn", "text": f"*{label}*\n" + (
        f"`{_slack_escape(value, 500)}`" if code else _slack_escape(value, 500))}
        for label, value, code in facts if value]
    blocks.append({"type": "section", "fields": fields[:10]})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": (
        f"rotator {__version__} on {_slack_escape(doc['rotator']['host'], 200)} · "
        f"{doc['at']}")}]})
    return {"text": text, "blocks": blocks}


# -- delivery ----------------------------------------------------------------------------------

_PROBE = Notification("check", "check", frozenset(), "", {})


@dataclass
class _Attempt:
    ok: bool
    retry: bool = False
    retry_after: float | None = None
    why: str = ""


class _Sender:
    """One target: its bounded queue, its thread (started on first use), its counters."""

    def __init__(self, name: str, target: NotifyTarget, notifier: Notifier) -> None:
        self.name = name
        self.label = f"notify.{name}"
        self.target = target
        self.notifier = notifier
        self.queue: collections.deque[Notification] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.busy = False
        self.deadline: float | None = None
        """Set by shutdown: monotonic time after which nothing more is attempted."""
        self.counts = {"sent": 0, "failed": 0, "dropped": 0, "retried": 0}
        self._counts_lock = threading.Lock()
        self._dropped_since_warning = 0
        self._last_drop_warning = -DROP_WARNING_INTERVAL

    # -- engine side: never blocks beyond a short lock ----------------------------------------

    def put(self, note: Notification) -> None:
        dropped: Notification | None = None
        with self.cond:
            if self.deadline is not None:
                dropped = note
            else:
                if len(self.queue) >= self.notifier.queue_size:
                    dropped = self.queue.popleft()
                self.queue.append(note)
                if self.thread is None:
                    self.thread = threading.Thread(target=self._run, daemon=True,
                                                   name=f"notify-{self.name}")
                    self.thread.start()
                self.cond.notify_all()
        if dropped is not None:
            self._dropped(dropped)

    def _dropped(self, note: Notification) -> None:
        self._count("dropped")
        self._dropped_since_warning += 1
        now = time.monotonic()
        if now - self._last_drop_warning >= DROP_WARNING_INTERVAL:
            log.warning("%s: %d notification(s) dropped (the latest: %s of %s): the webhook is "
                        "not keeping up or rotator is stopping; at most %d wait per target",
                        self.label, self._dropped_since_warning, note.event, note.credential,
                        self.notifier.queue_size)
            self._dropped_since_warning = 0
            self._last_drop_warning = now

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self.counts[outcome] += 1
        callback = self.notifier.on_delivery
        if callback is not None and outcome != "retried":
            try:
                callback(self.name, outcome)
            except Exception:  # a metrics hook must not stop delivery
                log.exception("%s: delivery callback failed", self.label)

    # -- the sending thread -------------------------------------------------------------------

    def _run(self) -> None:
        _scrub_httpx_logs()
        client = httpx.Client(timeout=self.target.timeout.total_seconds(),
                              follow_redirects=False, transport=self.notifier.transport,
                              headers={"User-Agent": f"rotator/{__version__}"})
        try:
            while True:
                with self.cond:
                    while not self.queue and self.deadline is None:
                        self.cond.wait()
                    if not self.queue:
                        return
                    if self._remaining() <= 0:
                        self._abandon()
                        return
                    note = self.queue.popleft()
                    self.busy = True
                try:
                    delivered = self._deliver(client, note)
                except Exception as exc:  # never let one notification stop the thread
                    log.error("%s: %s of %s not delivered: internal error %s", self.label,
                              note.event, note.credential, type(exc).__name__)
                    delivered = False
                self._count("sent" if delivered else "failed")
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()
        finally:
            client.close()

    def _abandon(self) -> None:
        """Called with the lock held, at the shutdown deadline."""
        left = len(self.queue)
        self.queue.clear()
        for _ in range(left):
            self._count("failed")
        log.warning("%s: %d notification(s) not delivered: rotator is stopping", self.label,
                    left)

    def _remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def _deliver(self, client: httpx.Client, note: Notification) -> bool:
        attempts = 1 + self.target.retries
        body = self._body(note)
        result = _Attempt(ok=False, why="not attempted")
        for attempt in range(1, attempts + 1):
            result = self._attempt(client, note, body)
            if result.ok:
                log.info("%s: %s of %s delivered%s", self.label, note.event, note.credential,
                         f" (attempt {attempt})" if attempt > 1 else "")
                return True
            if not result.retry or attempt == attempts:
                break
            delay = (min(result.retry_after, RETRY_AFTER_MAX) if result.retry_after is not None
                     else self._backoff(attempt))
            if delay > self._remaining():
                result.why += "; gave up: rotator is stopping"
                break
            log.warning("%s: %s of %s not delivered (attempt %d of %d): %s; retrying in %.1fs",
                        self.label, note.event, note.credential, attempt, attempts, result.why,
                        delay)
            self._count("retried")
            if not self._pause(delay):
                result.why += "; gave up: rotator is stopping"
                break
        log.error("%s: %s of %s NOT delivered: %s (the rotation itself is unaffected)",
                  self.label, note.event, note.credential, result.why)
        return False

    def _backoff(self, attempt: int) -> float:
        base = min(self.notifier.backoff_base * 2 ** (attempt - 1), self.notifier.backoff_max)
        return base * random.uniform(0.5, 1.0)

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False at once if that would outlast a shutdown deadline."""
        end = time.monotonic() + seconds
        with self.cond:
            while True:
                if self.deadline is not None and end > self.deadline:
                    return False
                now = time.monotonic()
                if now >= end:
                    return True
                self.cond.wait(end - now)

    def _body(self, note: Notification) -> bytes:
        payload = slack_payload(note.document) if self.target.type == "slack" else note.document
        return json.dumps(payload, ensure_ascii=False).encode()

    def _attempt(self, client: httpx.Client, note: Notification, body: bytes) -> _Attempt:
        secrets: list[str] = []
        try:
            url = self._url(secrets)
            headers = self._headers(note, secrets)
        except TransientError as exc:
            return _Attempt(ok=False, retry=True, why=self._clean(str(exc), secrets))
        except RotatorError as exc:
            return _Attempt(ok=False, why=self._clean(str(exc), secrets))
        timeout = min(self.target.timeout.total_seconds(), self._remaining())
        if timeout <= 0:
            return _Attempt(ok=False, why="rotator is stopping")
        try:
            response = client.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException:
            return _Attempt(ok=False, retry=True, why=f"no answer within {timeout:.1f}s")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            return _Attempt(ok=False, why="the url is not a usable http(s) URL")
        except httpx.TransportError as exc:
            return _Attempt(ok=False, retry=True,
                            why=f"{type(exc).__name__}: {self._clean(str(exc), secrets)}")
        status = response.status_code
        if response.is_success:
            return _Attempt(ok=True)
        excerpt = self._clean(" ".join(response.text.split())[:_EXCERPT], secrets)
        why = f"answered {status}" + (f": {excerpt}" if excerpt else "")
        if status in (408, 429) or status >= 500:
            return _Attempt(ok=False, retry=True, retry_after=retry_after(response.headers),
                            why=why)
        if 300 <= status < 400:
            why += " (redirects are not followed: use the final URL)"
        return _Attempt(ok=False, why=why)

    def _url(self, secrets: list[str]) -> str:
        url = self._resolve(self.target.url, "url", secrets)
        if not re.match(r"https?://[^/\s]", url):
            raise RotatorError(f"the url read from {self.target.url} is not an http(s):// URL")
        return url

    def _headers(self, note: Notification, secrets: list[str]) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Idempotency-Key": note.id,
                   "X-Rotator-Event": note.event}
        for name, value in self.target.headers.items():
            headers[name] = self._resolve(value, f"headers.{name}", secrets)
        if self.target.bearer_token is not None:
            token = self._resolve(self.target.bearer_token, "bearer_token", secrets)
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _resolve(self, value: Any, what: str, secrets: list[str]) -> str:
        if isinstance(value, str):
            return value
        resolve = self.notifier.resolve
        if resolve is None:
            raise RotatorError(f"{what} is a secret reference and nothing can read it here")
        secret = resolve(value)
        text = secret.reveal() if hasattr(secret, "reveal") else str(secret)
        secrets.append(text)
        if _CONTROL.search(text):  # an HTTP library's error would quote it
            raise RotatorError(f"the {what} read from {value} contains control characters "
                               "(a trailing newline?)")
        return text

    def _clean(self, text: str, secrets: Sequence[str]) -> str:
        """``text`` safe to log: without this target's url, header values and the secret
        parts of a secret url (a server may echo the path of a Slack-style URL), scrubbed."""
        plain = self.target.url if isinstance(self.target.url, str) else None
        values = [*secrets, *([plain] if plain else [])]
        for value in list(secrets):
            values.extend(_secret_parts(value))
        for value in sorted(set(values), key=len, reverse=True):
            text = text.replace(value, "[url]" if value == plain else "[REDACTED]")
        return redaction.scrub(text)


def _secret_parts(value: str) -> list[str]:
    """The path, query and longer path segments of a URL held as a secret."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        return []
    if not url.host:
        return []
    parts = [url.raw_path.decode("ascii", "replace"), url.path, url.query.decode("ascii",
                                                                                  "replace")]
    parts += [segment for segment in url.path.split("/") if len(segment) >= 6]
    return [p for p in parts if len(p) >= 6]


_httpx_filter_lock = threading.Lock()
_httpx_filtered = False


def _scrub_httpx_logs() -> None:
    """httpx logs every request's URL at INFO: scrub remembered secrets (a Slack URL) from it
    even where logging was set up by someone else, at a level that shows it."""
    global _httpx_filtered
    from rotator.log import RedactingFilter

    with _httpx_filter_lock:
        if not _httpx_filtered:
            logging.getLogger("httpx").addFilter(RedactingFilter())
            _httpx_filtered = True


class Notifier:
    """An engine listener sending ``[notify.*]`` notifications from background threads.

    Calling it (the engine does, for every event) returns at once: it classifies the event,
    builds the document and queues it on each target that wants it. ``resolve`` reads a
    secret reference (``Runtime.resolve_secret``); it is called from the sending threads, per
    notification, so a URL rotated in the vault is picked up. ``on_delivery(target, outcome)``
    is called with ``sent``, ``failed`` or ``dropped`` for metrics. ``transport`` is the httpx
    seam for tests.
    """

    def __init__(self, targets: Mapping[str, NotifyTarget],
                 resolve: Callable[[Any], Any] | None = None, *,
                 on_delivery: Callable[[str, str], None] | None = None,
                 transport: httpx.BaseTransport | None = None, host: str | None = None,
                 queue_size: int = QUEUE_SIZE, backoff_base: float = BACKOFF_BASE,
                 backoff_max: float = BACKOFF_MAX) -> None:
        self.resolve = resolve
        self.on_delivery = on_delivery
        self.transport = transport
        self.host = host or socket.gethostname()
        self.queue_size = max(queue_size, 1)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._senders = {name: _Sender(name, target, self) for name, target in targets.items()}
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seen_lock = threading.Lock()

    def __call__(self, event: StepFinished | RotationFinished | MisuseDetected) -> None:
        if not self._senders:
            return
        try:
            self.notify(event)
        except Exception:  # an observer must never break a rotation
            log.exception("could not queue a notification")

    def notify(self, event: StepFinished | RotationFinished | MisuseDetected
               ) -> Notification | None:
        """Queue ``event`` on every target that wants it; the notification, or None."""
        found = classify(event)
        if found is None:
            return None
        kind, categories = found
        wanting = [s for s in self._senders.values()
                   if categories.intersection(s.target.events) and s.target.wants(event.credential)]
        if not wanting or (isinstance(event, StepFinished) and self._repeat(event, kind)):
            return None
        document = (misuse_payload(event, categories, self.host)
                    if isinstance(event, MisuseDetected)
                    else generic_payload(event, kind, categories, self.host))
        note = Notification(document["id"], kind, categories, event.credential, document)
        for sender in wanting:
            sender.put(note)
        return note

    def _repeat(self, event: StepFinished, kind: str) -> bool:
        """A failing revocation or clean-up is retried for hours: tell it once per rotation."""
        key = f"{event.rotation_id}:{kind}"
        with self._seen_lock:
            if key in self._seen:
                return True
            self._seen[key] = None
            while len(self._seen) > _DEDUPE:
                self._seen.popitem(last=False)
        return False

    def check(self) -> list[str]:
        """Read every target's secret references now and check the url is http(s); one
        problem line per target that could not send (``rotator check --online``). Nothing is
        sent: a test message on every check would be noise in the channel."""
        problems = []
        for name, sender in self._senders.items():
            secrets: list[str] = []
            try:
                sender._url(secrets)
                sender._headers(_PROBE, secrets)
            except RotatorError as exc:
                problems.append(f"notify.{name}: {sender._clean(str(exc), secrets)}")
            except Exception as exc:
                problems.append(f"notify.{name}: cannot read its settings "
                                f"({type(exc).__name__})")
        return problems

    def stats(self) -> dict[str, dict[str, int]]:
        """Per target: ``sent``, ``failed``, ``dropped``, ``retried`` so far, and ``queued``."""
        out = {}
        for name, sender in self._senders.items():
            with sender.cond, sender._counts_lock:
                out[name] = {**sender.counts, "queued": len(sender.queue) + int(sender.busy)}
        return out

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queue to empty; True if they did."""
        end = time.monotonic() + timeout
        for sender in self._senders.values():
            with sender.cond:
                while sender.queue or sender.busy:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    sender.cond.wait(left)
        return True

    def shutdown(self, timeout: float) -> None:
        """Accept nothing more; keep delivering what is queued for ``timeout`` seconds more,
        then give up. Returns at once (a policy reload retires the old notifier this way)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        for sender in self._senders.values():
            with sender.cond:
                if sender.deadline is None or deadline < sender.deadline:
                    sender.deadline = deadline
                sender.cond.notify_all()

    def close(self, timeout: float = EXIT_WAIT_SECONDS) -> bool:
        """:meth:`shutdown`, then wait up to ``timeout`` for the sending threads; True if
        everything queued was delivered or given up on. Threads are daemons: a request still
        in flight never keeps the process alive."""
        end = time.monotonic() + max(timeout, 0.0)
        self.shutdown(timeout)
        done = True
        for sender in self._senders.values():
            if sender.thread is None:
                continue
            sender.thread.join(max(end - time.monotonic(), 0.0))
            if sender.thread.is_alive():
                done = False
                with sender.cond:
                    left = len(sender.queue) + int(sender.busy)
                log.warning("%s: %d notification(s) still being sent as rotator exits",
                            sender.label, left)
        return done
