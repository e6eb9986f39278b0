"""Webhook notifications: what is sent, when, in which shape; that a bad webhook never holds up
a rotation nor leaks its URL; and the ``[notify.NAME]`` section of the policy file."""

from __future__ import annotations

import json
import logging
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from rotator.config import NotifyConfig, SecretRef, load_policies, parse_policies
from rotator.engine import Engine, RotationRequest
from rotator.errors import ConfigError
from rotator.events import RotationFinished, StepFinished
from rotator.interfaces import Secret
from rotator.notify import SCHEMA, Notifier, classify, generic_payload, slack_payload
from rotator.runtime import Runtime
from rotator.state.store import StateStore
from tests.support import Fleet, free_port, make_fleet, stop_daemon, wait_for

SECRET_PATH = "/services/T0ROTATOR/B0NOTIFY/s3cr3tWebhookToken42"
"""The secret part of the webhook URL the tests use: it must never show anywhere."""
SLACK_PATH = "/services/T0ROTATOR/B0SLACK/sl4ckWebhookToken42"
LEAKY = ("s3cr3tWebhookToken42", "sl4ckWebhookToken42")


# -- a webhook receiver on loopback ------------------------------------------------------------


class Receiver:
    """Records every request; answers from ``script`` (status, headers) first, then 200.

    ``status_for`` fixes the answer for a path (a health endpoint); ``hang`` makes every
    webhook request wait until the receiver closes; ``echo`` puts the request path in error
    bodies, as careless servers do.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.status_for: dict[str, int] = {}
        self.hang = False
        self.echo = False
        self._released = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(receiver.status_for.get(self.path, 200), {}, b"")

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.requests.append({
                        "path": self.path, "headers": {k.lower(): v for k, v in
                                                       self.headers.items()},
                        "body": json.loads(raw or b"null"), "at": time.monotonic()})
                    status, headers = (receiver.script.pop(0) if receiver.script
                                       else (200, {}))
                if receiver.hang:
                    receiver._released.wait(60)
                body = f"no such hook: {self.path}".encode() if receiver.echo else b"ok"
                self._answer(status, headers, body)

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = SECRET_PATH) -> str:
        return self.base + path

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests if path is None or r["path"] == path]

    def wait(self, count: int, path: str | None = None, timeout: float = 20) -> list[Any]:
        return wait_for(lambda: len(self.bodies(path)) >= count and self.bodies(path),
                        timeout=timeout, what=f"{count} webhook request(s)", interval=0.05)

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}{SECRET_PATH}"


# -- in-process helpers ------------------------------------------------------------------------


AT = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def finished(outcome: str = "failed", trigger: str = "manual", revoke_mode: str = "grace",
             **kw: Any) -> RotationFinished:
    values: dict[str, Any] = {
        "rotation_id": "r-20260304-abc", "credential": "research-agent/openai",
        "agent": "research-agent", "provider": "openai-prod", "trigger": trigger,
        "outcome": outcome, "duration": 2.5,
        "message": "create: provider said <no> & failed" if outcome != "success" else None,
        "at": AT, "old_key_id": "key_old", "new_key_id": None if outcome == "failed"
        else "key_new", "revoke_mode": revoke_mode, "reason": "leaked in a log",
        "requested_by": "alice"}
    values.update(kw)
    return RotationFinished(**values)


def step_failed(step: str, rotation_id: str = "r-1") -> StepFinished:
    return StepFinished(rotation_id, "research-agent/openai", "research-agent", "openai-prod",
                        step, "failed", 0.5, "provider said no", AT, old_key_id="key_old",
                        new_key_id="key_new")


def target(url: Any, kind: str = "webhook", **kw: Any) -> NotifyConfig:
    return NotifyConfig.model_validate({"type": kind, "url": url, **kw})


def env_ref(name: str) -> dict[str, str]:
    return {"env": name}


def resolver(values: dict[str, str]) -> Any:
    def resolve(ref: SecretRef) -> Secret:
        return Secret(values[ref.env or ""])
    return resolve


# -- what is sent, and when --------------------------------------------------------------------


@pytest.mark.parametrize(("event", "expected"), [
    (finished("failed"), ("rotation_failed", {"failure"})),
    (finished("rolled_back"), ("rotation_rolled_back", {"rollback"})),
    (finished("success"), ("rotation_succeeded", {"success"})),
    (finished("success", "emergency", "first"), ("rotation_succeeded", {"success", "emergency"})),
    (finished("failed", "emergency", "immediately"),
     ("rotation_failed", {"failure", "emergency"})),
    (finished("success", manual_revoke="revoke key_x by hand"),
     ("rotation_succeeded", {"success", "failure"})),
    (finished("interrupted"), None),
    (step_failed("revoke"), ("revocation_failed", {"failure"})),
    (step_failed("rollback"), ("cleanup_failed", {"failure"})),
    (step_failed("create"), None),
])
def test_classify(event: Any, expected: Any) -> None:
    found = classify(event)
    assert (found if found is None else (found[0], set(found[1]))) == expected


def test_generic_document_has_every_documented_field() -> None:
    event = finished("failed", "emergency", "first")
    kind, categories = classify(event)  # type: ignore[misc]
    doc = generic_payload(event, kind, categories, "rotator-1")
    assert doc == {
        "schema": SCHEMA, "id": "r-20260304-abc:rotation_failed", "event": "rotation_failed",
        "categories": ["emergency", "failure"],
        "summary": ("Emergency rotation of research-agent/openai (old key revoked first) "
                    "failed; the old key may already be revoked: check the agent"),
        "credential": "research-agent/openai", "agent": "research-agent",
        "provider": "openai-prod", "rotation_id": "r-20260304-abc", "outcome": "failed",
        "step": None, "emergency": True, "trigger": "emergency", "revoke_mode": "first",
        "requested_by": "alice", "reason": "leaked in a log",
        "error": "create: provider said <no> & failed", "action_needed": None,
        "old_key_id": "key_old", "new_key_id": None, "duration_seconds": 2.5,
        "at": "2026-03-04T05:06:07Z", "rotator": {"host": "rotator-1", "version": doc[
            "rotator"]["version"]},
    }
    json.dumps(doc)


def test_slack_message_is_short_escaped_and_complete() -> None:
    event = finished("rolled_back", manual_revoke="revoke key <x> by hand")
    kind, categories = classify(event)  # type: ignore[misc]
    message = slack_payload(generic_payload(event, kind, categories, "host-1"))
    assert set(message) == {"text", "blocks"}
    assert message["text"].startswith(":leftwards_arrow_with_hook: Rotation of "
                                      "research-agent/openai rolled back")
    assert "ACTION NEEDED" in message["text"]
    lead, action, facts, context = message["blocks"]
    assert lead["type"] == "section" and "&lt;no&gt; &amp; failed" in lead["text"]["text"]
    assert "<no>" not in json.dumps(message["blocks"])
    assert "revoke key &lt;x&gt; by hand" in action["text"]["text"]
    labels = [f["text"].split("\n")[0] for f in facts["fields"]]
    assert labels == ["*Credential*", "*Agent*", "*Provider*", "*Outcome*", "*Trigger*",
                      "*Requested by*", "*Reason*", "*Old key*", "*New key*", "*Rotation*"]
    assert context["type"] == "context" and "host-1" in context["elements"][0]["text"]


def test_only_wanted_events_and_credentials_are_queued(receiver: Receiver) -> None:
    notifier = Notifier({
        "all": target(receiver.url("/all"), events=["failure", "rollback", "emergency",
                                                    "success"]),
        "default": target(receiver.url("/default")),
        "research": target(receiver.url("/research"), events=["failure"],
                           credentials=["research-*/*"]),
        "other": target(receiver.url("/other"), credentials=["billing-agent/*"]),
    })
    notifier(finished("success"))
    notifier(finished("failed"))
    notifier(finished("success", "emergency", "immediately"))
    notifier(step_failed("create"))
    assert notifier.flush(10)
    assert [b["event"] for b in receiver.bodies("/all")] == [
        "rotation_succeeded", "rotation_failed", "rotation_succeeded"]
    assert [b["emergency"] for b in receiver.bodies("/default")] == [False, True]
    assert [b["event"] for b in receiver.bodies("/research")] == ["rotation_failed"]
    assert receiver.bodies("/other") == []
    headers = next(r["headers"] for r in receiver.requests if r["path"] == "/all")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("rotator/")
    assert headers["idempotency-key"] == receiver.bodies("/all")[0]["id"]
    assert notifier.stats()["all"] == {"sent": 3, "failed": 0, "dropped": 0, "retried": 0,
                                       "queued": 0}
    assert notifier.close(1)


def test_a_failing_revocation_is_told_once_per_rotation(receiver: Receiver) -> None:
    notifier = Notifier({"ops": target(receiver.url())})
    for _ in range(3):  # the engine retries a revocation with backoff, for hours
        notifier(step_failed("revoke", "r-1"))
    notifier(step_failed("revoke", "r-2"))
    notifier(step_failed("rollback", "r-2"))
    assert notifier.flush(10)
    assert [(b["rotation_id"], b["event"]) for b in receiver.bodies()] == [
        ("r-1", "revocation_failed"), ("r-2", "revocation_failed"), ("r-2", "cleanup_failed")]
    assert receiver.bodies()[0]["step"] == "revoke" and receiver.bodies()[0]["outcome"] is None
    notifier.close(1)


def test_headers_and_bearer_token_come_from_secret_references(receiver: Receiver) -> None:
    notifier = Notifier({"ops": target(env_ref("HOOK"), headers={
        "X-Team": "infra", "X-Api-Key": env_ref("API_KEY")}, bearer_token=env_ref("TOKEN"))},
        resolver({"HOOK": receiver.url(), "API_KEY": "k-123456789", "TOKEN": "t-987654321"}))
    notifier(finished())
    assert notifier.flush(10)
    headers = receiver.requests[0]["headers"]
    assert headers["x-team"] == "infra" and headers["x-api-key"] == "k-123456789"
    assert headers["authorization"] == "Bearer t-987654321"
    notifier.close(1)


# -- retries -----------------------------------------------------------------------------------


def test_retries_on_500_then_delivers(receiver: Receiver) -> None:
    receiver.script = [(500, {}), (503, {})]
    notifier = Notifier({"ops": target(receiver.url(), retries=3)}, backoff_base=0.05)
    notifier(finished())
    assert notifier.flush(10)
    assert len(receiver.bodies()) == 3
    assert len({json.dumps(b) for b in receiver.bodies()}) == 1, "the same document each time"
    assert notifier.stats()["ops"] == {"sent": 1, "failed": 0, "dropped": 0, "retried": 2,
                                       "queued": 0}
    notifier.close(1)


def test_429_honours_retry_after(receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "1"})]
    notifier = Notifier({"ops": target(receiver.url())}, backoff_base=0.01)
    notifier(finished())
    assert notifier.flush(10)
    first, second = receiver.requests
    assert second["at"] - first["at"] >= 0.9
    notifier.close(1)


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_other_4xx_are_not_retried(receiver: Receiver, status: int,
                                   caplog: pytest.LogCaptureFixture) -> None:
    receiver.script = [(status, {})]
    notifier = Notifier({"ops": target(receiver.url())}, backoff_base=0.01)
    with caplog.at_level(logging.INFO, logger="rotator.notify"):
        notifier(finished())
        assert notifier.flush(10)
    assert len(receiver.bodies()) == 1
    assert notifier.stats()["ops"]["failed"] == 1
    assert f"answered {status}" in caplog.text and "NOT delivered" in caplog.text
    notifier.close(1)


def test_retries_are_bounded_and_the_failure_logged_without_the_url(
        dead_url: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, str]] = []
    notifier = Notifier({"ops": target(env_ref("HOOK"), retries=2)},
                        resolver({"HOOK": dead_url}), backoff_base=0.05,
                        on_delivery=lambda name, outcome: seen.append((name, outcome)))
    with caplog.at_level(logging.DEBUG):
        notifier(finished())
        assert notifier.flush(10)
    assert notifier.stats()["ops"]["failed"] == 1 and notifier.stats()["ops"]["retried"] == 2
    assert seen == [("ops", "failed")]
    assert "notify.ops: rotation_failed of research-agent/openai NOT delivered" in caplog.text
    assert "ConnectError" in caplog.text
    assert not any(leak in caplog.text for leak in LEAKY)
    assert dead_url not in caplog.text
    notifier.close(1)


def test_an_echoing_server_does_not_get_the_url_into_the_log(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.echo = True
    receiver.script = [(404, {})]
    notifier = Notifier({"ops": target(env_ref("HOOK"))}, resolver({"HOOK": receiver.url()}))
    with caplog.at_level(logging.DEBUG):
        notifier(finished())
        assert notifier.flush(10)
    assert "answered 404: no such hook: [REDACTED]" in caplog.text
    assert not any(leak in caplog.text for leak in LEAKY)
    notifier.close(1)


def test_an_unreadable_secret_reference_fails_that_notification_only(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    def resolve(ref: SecretRef) -> Secret:
        from rotator.errors import PermanentError
        raise PermanentError(f"environment variable {ref.env} is not set or empty")

    notifier = Notifier({"ops": target(env_ref("NOPE"))}, resolve)
    notifier(finished())
    assert notifier.flush(10)
    assert notifier.stats()["ops"]["failed"] == 1
    assert "environment variable NOPE is not set" in caplog.text
    notifier.close(1)


def test_check_reads_every_reference_and_sends_nothing(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    policies = parse_policies(BASE + textwrap.dedent("""
        [notify.ok]
        type = "slack"
        url = { env = "ROTATOR_TEST_SLACK_URL" }
        [notify.unset]
        type = "webhook"
        url = "http://127.0.0.1:1/hook"
        bearer_token = { env = "ROTATOR_TEST_UNSET_TOKEN" }
        [notify.notaurl]
        type = "webhook"
        url = { env = "ROTATOR_TEST_NOT_A_URL" }
        [notify.newline]
        type = "webhook"
        url = "http://127.0.0.1:1/hook"
        headers = { X-Api-Key = { env = "ROTATOR_TEST_NEWLINE" } }
        """))
    monkeypatch.setenv("ROTATOR_TEST_SLACK_URL", receiver.url())
    monkeypatch.setenv("ROTATOR_TEST_NOT_A_URL", "hooks.example/XXXXSECRETXXXX")
    monkeypatch.setenv("ROTATOR_TEST_NEWLINE", "XXXXSECRETXXXX\n")
    monkeypatch.delenv("ROTATOR_TEST_UNSET_TOKEN", raising=False)
    problems = Notifier(policies.notify, Runtime(policies).resolve_secret).check()
    assert problems == [
        "notify.unset: environment variable ROTATOR_TEST_UNSET_TOKEN is not set or empty; "
        "export it for the rotator process (or use a vault or file reference)",
        "notify.notaurl: the url read from env ROTATOR_TEST_NOT_A_URL is not an http(s):// URL",
        "notify.newline: the headers.X-Api-Key read from env ROTATOR_TEST_NEWLINE contains "
        "control characters (a trailing newline?)"]
    assert receiver.requests == []


# -- never in the way --------------------------------------------------------------------------


def test_listener_returns_at_once_and_close_is_bounded(receiver: Receiver) -> None:
    receiver.hang = True
    notifier = Notifier({"ops": target(receiver.url(), timeout="30s")})
    started = time.monotonic()
    for _ in range(50):
        notifier(finished())
    assert time.monotonic() - started < 0.5
    receiver.wait(1)
    started = time.monotonic()
    assert notifier.close(0.5) is False
    assert time.monotonic() - started < 1.5


def test_a_full_queue_drops_the_oldest_with_a_warning(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.hang = True
    notifier = Notifier({"ops": target(receiver.url(), timeout="30s")}, queue_size=3)
    notifier(finished(rotation_id="r-0"))
    receiver.wait(1)  # r-0 is in flight; r-1..r-5 queue behind it
    with caplog.at_level(logging.WARNING, logger="rotator.notify"):
        for i in range(1, 6):
            notifier(finished(rotation_id=f"r-{i}"))
    stats = notifier.stats()["ops"]
    assert stats["dropped"] == 2 and stats["queued"] == 4
    assert "notification(s) dropped" in caplog.text
    sender = notifier._senders["ops"]
    assert [n.document["rotation_id"] for n in sender.queue] == ["r-3", "r-4", "r-5"]
    notifier.close(0.2)


def test_after_shutdown_nothing_new_is_accepted(receiver: Receiver) -> None:
    notifier = Notifier({"ops": target(receiver.url())})
    notifier.shutdown(5)
    notifier(finished())
    assert notifier.stats()["ops"]["dropped"] == 1
    assert notifier.close(1)


# -- with the real engine, vault and provider --------------------------------------------------


def notify_table(**targets: dict[str, Any]) -> Any:
    def extra(doc: dict[str, Any]) -> None:
        doc["notify"] = targets
    return extra


def fleet_with(tmp_path: Path, openbao: Any, fake_openai: Any, targets: dict[str, Any],
               **kw: Any) -> Fleet:
    return make_fleet(tmp_path, openbao, fake_openai, extra=notify_table(**targets), **kw)


def no_leaks(tmp_path: Path) -> None:
    """Neither the webhook URLs' secret parts nor the URLs appear in any file the test wrote
    (command output, daemon logs, the state store, the audit trail)."""
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for leak in LEAKY:
                assert leak.encode() not in data, f"{path} contains the webhook URL"


def test_engine_rotation_is_not_delayed_by_a_hanging_webhook(
        tmp_path: Path, openbao: Any, fake_openai: Any, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    monkeypatch.setenv("NOTIFY_URL", receiver.url())
    receiver.hang = True
    fleet = fleet_with(tmp_path, openbao, fake_openai, {"ops": {
        "type": "webhook", "url": {"env": "NOTIFY_URL"}, "timeout": "5m",
        "events": ["success"]}})
    policies = load_policies(fleet.config)
    store = StateStore(policies.settings.state_url)
    runtime = Runtime(policies)
    engine = Engine(policies, runtime, store)
    notifier = Notifier(policies.notify, runtime.resolve_secret)
    engine.listeners.append(notifier)
    engine.sync_credentials()
    try:
        name = fleet.credentials[0]["name"]
        started = time.monotonic()
        first = engine.rotate(RotationRequest(credential=name, trigger="manual"))
        second = engine.rotate(RotationRequest(credential=name, trigger="manual"))
        elapsed = time.monotonic() - started
        assert first.ok and second.ok
        # Blocked, the first rotation alone would wait a minute for the hanging receiver.
        assert elapsed < 30, f"two rotations took {elapsed:.1f}s behind a hanging webhook"
        receiver.wait(1)
        assert notifier.stats()["ops"]["queued"] == 2
    finally:
        engine.close()
        started = time.monotonic()
        notifier.close(0.5)
        assert time.monotonic() - started < 5
        runtime.close()
        store.close()


def test_rotate_now_failure_sends_generic_and_slack(tmp_path: Path, openbao: Any,
                                                      fake_openai: Any,
                                                      receiver: Receiver) -> None:
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "ops": {"type": "webhook", "url": {"env": "NOTIFY_URL"}},
        "chat": {"type": "slack", "url": {"env": "SLACK_URL"}}},
        settings={"retry_deadline": "1s"})
    cred = fleet.credentials[0]
    fleet.config.write_text(fleet.config.read_text().replace(cred["service_account_id"],
                                                             "svc_acct_gone"))
    result = fleet.cli("rotate-now", cred["name"], "--yes", "--reason", "quarterly check",
                       NOTIFY_URL=receiver.url(), SLACK_URL=receiver.url(SLACK_PATH))
    assert result.returncode == 1, result.stderr
    [doc] = receiver.bodies(SECRET_PATH)
    assert doc["event"] == "rotation_failed" and doc["categories"] == ["failure"]
    assert (doc["credential"], doc["agent"], doc["provider"]) == (
        cred["name"], cred["agent"], "openai-test")
    assert doc["outcome"] == "failed" and doc["trigger"] == "manual"
    assert doc["reason"] == "quarterly check" and doc["requested_by"]
    assert doc["old_key_id"] == fleet.legacy_keys[cred["name"]] and doc["new_key_id"] is None
    assert doc["error"] and doc["emergency"] is False and doc["rotator"]["host"]
    assert doc["summary"].endswith("failed; the old key is still in use")
    [slack] = receiver.bodies(SLACK_PATH)
    assert set(slack) == {"text", "blocks"}
    assert slack["text"].startswith(f":x: Rotation of {cred['name']} failed")
    no_leaks(tmp_path)


def test_check_online_reports_an_unreadable_webhook_url(tmp_path: Path, openbao: Any,
                                                         fake_openai: Any) -> None:
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "ops": {"type": "slack", "url": {"env": "ROTATOR_TEST_UNSET_URL"}}})
    result = fleet.cli("check", "--online")
    assert result.returncode == 2
    assert "notify.ops: environment variable ROTATOR_TEST_UNSET_URL is not set" in result.stderr


def test_rollback_is_sent(tmp_path: Path, openbao: Any, fake_openai: Any,
                          receiver: Receiver) -> None:
    receiver.status_for["/healthz"] = 503
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "ops": {"type": "webhook", "url": {"env": "NOTIFY_URL"}}},
        health={"type": "http", "url": receiver.url("/healthz"), "attempts": 1,
                "timeout": "2s"})
    result = fleet.cli("rotate-now", "--all", "--yes", NOTIFY_URL=receiver.url())
    assert result.returncode == 1
    [doc] = receiver.bodies(SECRET_PATH)
    assert doc["event"] == "rotation_rolled_back" and doc["outcome"] == "rolled_back"
    assert doc["categories"] == ["rollback"] and doc["new_key_id"]
    assert "health" in doc["error"]
    no_leaks(tmp_path)


def test_emergency_rotations_are_sent_and_plain_ones_are_not(
        tmp_path: Path, openbao: Any, fake_openai: Any, receiver: Receiver) -> None:
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "ops": {"type": "webhook", "url": {"env": "NOTIFY_URL"}},
        "chat": {"type": "slack", "url": {"env": "SLACK_URL"}, "events": ["emergency"]}})
    env = {"NOTIFY_URL": receiver.url(), "SLACK_URL": receiver.url(SLACK_PATH)}
    name = fleet.credentials[0]["name"]
    assert fleet.cli("rotate-now", name, "--yes", **env).returncode == 0
    assert receiver.bodies() == [], "a plain successful rotation is not news"
    first = fleet.cli("rotate-now", name, "--yes", "--revoke-first", "--reason", "key in a "
                      "public repo", **env)
    assert first.returncode == 0, first.stderr
    second = fleet.cli("rotate-now", "--agent", fleet.credentials[0]["agent"], "--yes",
                       "--revoke-immediately", **env)
    assert second.returncode == 0, second.stderr
    docs = receiver.bodies(SECRET_PATH)
    assert [(d["event"], d["trigger"], d["revoke_mode"], d["emergency"]) for d in docs] == [
        ("rotation_succeeded", "emergency", "first", True),
        ("rotation_succeeded", "emergency", "immediately", True)]
    assert docs[0]["categories"] == ["emergency", "success"]
    assert docs[0]["reason"] == "key in a public repo"
    assert docs[0]["summary"].startswith(f"Emergency rotation of {name} (old key revoked "
                                         "first) succeeded: new key ")
    assert docs[1]["old_key_id"] == docs[0]["new_key_id"]
    slack = receiver.bodies(SLACK_PATH)
    assert [s["text"].split(" ")[0] for s in slack] == [":rotating_light:"] * 2
    no_leaks(tmp_path)


def test_rotate_now_exits_promptly_with_a_hanging_or_dead_webhook(
        tmp_path: Path, openbao: Any, fake_openai: Any, receiver: Receiver,
        dead_url: str) -> None:
    receiver.hang = True
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "hangs": {"type": "webhook", "url": {"env": "NOTIFY_URL"}, "timeout": "5m"},
        "down": {"type": "slack", "url": {"env": "SLACK_URL"}, "retries": 1}})
    started = time.monotonic()
    result = fleet.cli("rotate-now", "--all", "--yes", "--revoke-immediately",
                       NOTIFY_URL=receiver.url(), SLACK_URL=dead_url)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    # Unbounded, it would wait 5 minutes for the hanging webhook (the command's own timeout
    # would fire first); bounded, a few seconds more than the rotation, however loaded the host.
    assert elapsed < 60, f"rotate-now took {elapsed:.1f}s: it waited for the webhook"
    assert len(receiver.bodies()) == 1
    assert "notify.down: rotation_succeeded of agent-0/openai NOT delivered: ConnectError" \
        in result.stderr
    assert "notify.hangs: 1 notification(s) still being sent as rotator exits" in result.stderr
    assert "127.0.0.1" not in result.stderr.replace(fake_openai.base_url, "")
    no_leaks(tmp_path)


def test_daemon_sends_scheduled_failures_and_keeps_rotating(
        tmp_path: Path, openbao: Any, fake_openai: Any, receiver: Receiver) -> None:
    receiver.script = [(500, {})]  # the first try fails: the daemon retries it
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "ops": {"type": "webhook", "url": {"env": "NOTIFY_URL"}},
        "chat": {"type": "slack", "url": {"env": "SLACK_URL"}}},
        n=2, settings={"retry_deadline": "1s"})
    broken = fleet.credentials[0]
    fleet.config.write_text(fleet.config.read_text().replace(broken["service_account_id"],
                                                             "svc_acct_gone"))
    daemon = fleet.start_daemon(NOTIFY_URL=receiver.url(),
                                SLACK_URL=f"http://127.0.0.1:{free_port()}{SLACK_PATH}")
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        [doc] = receiver.wait(2, SECRET_PATH, timeout=60)[1:]
        assert doc["event"] == "rotation_failed" and doc["trigger"] == "schedule"
        assert doc["credential"] == broken["name"] and doc["requested_by"] is None
        wait_for(lambda: any(r.outcome == "success" for r in
                             store.rotations(fleet.credentials[1]["name"])),
                 what="the healthy credential's rotation")
    finally:
        assert stop_daemon(daemon) == 0
        store.close()
    log = sorted((tmp_path / "out").glob("*-run.stderr"))[-1].read_text()
    assert "notify.chat: rotation_failed of agent-0/openai NOT delivered" in log
    assert "notify.ops: rotation_failed of agent-0/openai delivered (attempt 2)" in log
    no_leaks(tmp_path)


def test_a_reload_applies_the_new_notify_section(tmp_path: Path, openbao: Any,
                                                   fake_openai: Any, receiver: Receiver,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from rotator.scheduling import Daemon

    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    fleet = fleet_with(tmp_path, openbao, fake_openai, {
        "ops": {"type": "webhook", "url": receiver.url("/before"), "events": ["failure"]}})
    daemon = Daemon(fleet.config, load_policies(fleet.config))
    before = daemon.notifier
    try:
        fleet.config.write_text(fleet.config.read_text().replace("/before", "/after").replace(
            '"failure"', '"success"'))
        assert daemon.reload()
        assert daemon.notifier is not before
        assert before.stats()["ops"]["queued"] == 0
        daemon.wait_idle(60)
        assert daemon.notifier.flush(20), "notifications still queued"
        name = fleet.credentials[0]["name"]
        if not receiver.bodies("/after"):  # nothing was due at the reload's tick
            assert daemon.engine.rotate(RotationRequest(credential=name, trigger="manual")).ok
        [doc] = receiver.wait(1, "/after")
        assert doc["event"] == "rotation_succeeded" and doc["credential"] == name
        assert receiver.bodies("/before") == []
        kept = daemon.notifier
        fleet.config.write_text(fleet.config.read_text() + "\n")
        assert daemon.reload() and daemon.notifier is kept, "unchanged section: same notifier"
    finally:
        daemon.stop()
        daemon._shutdown()


# -- the [notify.NAME] section -----------------------------------------------------------------


BASE = textwrap.dedent("""\
    [vaults.main]
    type = "vault"
    url = "http://127.0.0.1:8200"
    token_env = "VAULT_TOKEN"

    [providers.openai-prod]
    type = "openai"
    project_id = "proj_1"
    admin_key = { env = "OPENAI_ADMIN_KEY" }

    [[credentials]]
    name = "research-agent/openai"
    agent = "research-agent"
    provider = "openai-prod"
    vault = "main"
    path = "agents/research-agent"
    field = "OPENAI_API_KEY"
    [credentials.params]
    service_account_id = "svc_1"
    """)


def problems(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_policies(text, "p.toml")
    return [(p.line, p.key, p.message) for p in info.value.problems]


def test_notify_section_loads_with_defaults() -> None:
    policies = parse_policies(BASE + textwrap.dedent("""
        [notify.oncall]
        type = "slack"
        url = { vault = "main", path = "rotator/slack", field = "url" }

        [notify.siem]
        type = "webhook"
        url = "https://siem.internal/hooks/rotator"
        events = ["failure", "success", "failure"]
        credentials = ["research-agent/*", "research-agent/openai"]
        headers = { X-Team = "infra", X-Api-Key = { env = "SIEM_KEY" } }
        bearer_token = { file = "/run/secrets/siem" }
        timeout = "5s"
        retries = 0
        """))
    oncall, siem = policies.notify["oncall"], policies.notify["siem"]
    assert oncall.events == ["failure", "rollback", "emergency", "misuse"]
    assert (oncall.retries, oncall.timeout.total_seconds(), oncall.headers) == (3, 10.0, {})
    assert str(oncall.url) == "vault main:rotator/slack#url"
    assert siem.events == ["failure", "success"]
    assert siem.url == "https://siem.internal/hooks/rotator"
    assert str(siem.headers["X-Api-Key"]) == "env SIEM_KEY" and siem.headers["X-Team"] == "infra"
    assert siem.wants("research-agent/openai") and not siem.wants("billing/openai")
    assert oncall.wants("anything")
    assert parse_policies(BASE).notify == {}


def test_notify_problems_have_lines_keys_and_hints() -> None:
    text = BASE + textwrap.dedent("""
        [notify.oncall]
        type = "slak"
        url = { env = "SLACK_URL" }
        evnts = ["failure"]

        [notify.siem]
        type = "webhook"
        url = { envv = "X" }
        events = ["failure", "rolback"]
        credentials = ["billing-agent/openai"]
        retries = 11
        timeout = "1h"
        bearer_token = { vault = "mian", path = "p", field = "f" }
        """)
    lines = text.splitlines()
    found = problems(text)

    def line(prefix: str, nth: int = 0) -> int:
        return [i + 1 for i, t in enumerate(lines) if t.startswith(prefix)][nth]

    expected = [
        (line("type = \"slak\""), "notify.oncall.type", "Input should be 'webhook' or 'slack'"),
        (line("evnts"), "notify.oncall.evnts", 'unknown key "evnts" (did you mean "events"?)'),
        (line("url = { envv"), "notify.siem.url.envv", 'unknown key "envv" (did you mean '
                                                        '"env"?)'),
        (line("events = [\"failure\", \"rolback\"]"), "notify.siem.events[1]",
         "Input should be 'failure', 'rollback', 'emergency', 'success' or 'misuse'"),
        (line("credentials"), "notify.siem.credentials[0]",
         'no credential named "billing-agent/openai" in [credentials] (did you mean '
         '"research-agent/openai"? known: research-agent/openai); a glob like '
         '"research-agent/*" matches several'),
        (line("retries"), "notify.siem.retries", "Input should be less than or equal to 10"),
        (line("timeout"), "notify.siem.timeout",
         "timeout is at most 5m: a webhook slower than that is down"),
        (line("bearer_token"), "notify.siem.bearer_token.vault",
         'no vault named "mian" in [vaults] (did you mean "main"? known: main)'),
    ]
    for item in expected:
        assert item in found, f"{item} not in {found}"
    assert len(found) == len(expected)


@pytest.mark.parametrize("body", [
    'type = "webhook"\nurl = "https://hooks.slack.com/services/T0/B0/XXXXSECRETXXXX"',
    'type = "slack"\nurl = "https://chat.internal/hooks/XXXXSECRETXXXX"',
    'type = "webhook"\nurl = "https://discord.com/api/webhooks/1/XXXXSECRETXXXX"',
])
def test_a_plain_secret_webhook_url_is_refused_and_never_echoed(body: str) -> None:
    [(_line, key, message)] = problems(BASE + "\n[notify.chat]\n" + body + "\n")
    assert key == "notify.chat.url" and "is a secret" in message
    assert 'url = { env = "SLACK_WEBHOOK_URL" }' in message and "XXXXSECRET" not in message


def test_secret_header_values_must_be_references() -> None:
    found = problems(BASE + textwrap.dedent("""
        [notify.siem]
        type = "webhook"
        url = "https://siem.internal/hook"
        headers = { Authorization = "Bearer XXXXSECRETXXXX" }
        """))
    assert [(k, m.split(":")[0]) for _l, k, m in found] == [
        ("notify.siem.headers.Authorization", "secrets never go in the policy file")]
    assert "XXXXSECRET" not in str(found)


def test_notify_shapes() -> None:
    found = problems('notify = "x"\n' + BASE)
    assert [(k, m) for _l, k, m in found] == [("notify", "[notify] must be a table")]
    found = problems(BASE + '[notify]\nops = 3\n[notify."bad name"]\ntype = "webhook"\n'
                     'url = "http://x/h"\n')
    assert ("notify.ops", "[notify.ops] must be a table with a type") in [
        (k, m) for _l, k, m in found]
    assert any(k == 'notify."bad name"' and "is not allowed" in m for _l, k, m in found)
    found = problems(BASE + '[notify.ops]\ntype = "webhook"\nurl = "ftp://x/h"\nevents = []\n'
                     'credentials = []\nheaders = { "Content-Type" = "text/plain" }\n')
    assert {k for _l, k, _m in found} == {"notify.ops.url", "notify.ops.events",
                                          "notify.ops.credentials", "notify.ops.headers"}


NOTIFY_KEYS = st.sampled_from(["type", "url", "events", "credentials", "headers",
                               "bearer_token", "timeout", "retries", "env", "vault", "path",
                               "field", "file", "x", "Authorization"])
NOTIFY_SCALARS = st.one_of(
    st.booleans(), st.integers(min_value=-5, max_value=20),
    st.sampled_from(["webhook", "slack", "failure", "rollback", "emergency", "success",
                     "http://127.0.0.1/h", "https://hooks.slack.com/services/SECRETX", "10s",
                     "0s", "main", "research-agent/*", "", "sk-planted0123456789"]),
    st.text(max_size=6))
NOTIFY_VALUES = st.recursive(NOTIFY_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(NOTIFY_KEYS, inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HypothesisHealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["ops", "chat", "bad name"]),
                       st.dictionaries(NOTIFY_KEYS, NOTIFY_VALUES, max_size=5), max_size=2))
def test_random_notify_sections_raise_only_config_error(notify: dict[str, Any]) -> None:
    text = BASE + tomli_w.dumps({"notify": notify})
    try:
        parse_policies(text)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert "sk-planted" not in str(problem) and "bug in rotator" not in str(problem)
            assert not (problem.key.endswith(".url") and "SECRETX" in str(problem))
