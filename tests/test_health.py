"""Health checks and on_rotate hooks against real loopback servers and real subprocesses.

The engine rolls back on what these return, so the tests pin the failure shapes: which errors
are transient, what a failed check's message says, that attempts and delays are honoured, and
that no secret ever reaches a hook's environment.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.errors import PermanentError, TransientError
from rotator.health import CheckContext, HealthResult, run_health_check, run_hook
from rotator.interfaces import Secret
from rotator.testing.agent import SampleAgent

CTX = CheckContext(credential="research-agent/openai", agent="research-agent",
                   rotation_id="rot-123", key_id="key_new")
PY = sys.executable


@dataclass
class Check:
    """Stands in for ``rotator.config.HealthCheck`` (same attribute names)."""

    type: str = "http"
    url: str | None = None
    expect_status: int = 200
    expect_json: dict[str, str] | None = None
    run: list[str] | None = None
    timeout: timedelta = timedelta(seconds=2)
    attempts: int = 1
    delay: timedelta = timedelta(seconds=0)


@dataclass
class Hook:
    """Stands in for ``rotator.config.Hook``."""

    type: str = "command"
    run: list[str] | None = None
    url: str | None = None
    method: str = "POST"
    timeout: timedelta = timedelta(seconds=2)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class Consumer:
    """A scripted loopback HTTP server: answers queued replies, then ``default``."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.default = Reply(200, {"ok": True})
        self.requests: list[tuple[str, str, bytes]] = []
        consumer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                consumer.requests.append((self.command, self.path, self.rfile.read(length)))
                reply = consumer.replies.popleft() if consumer.replies else consumer.default
                time.sleep(reply.delay)
                raw = (reply.body if isinstance(reply.body, str)
                       else json.dumps(reply.body)).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            do_GET = do_POST = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    server = Consumer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def unused_url() -> str:
    """A loopback URL nothing listens on (bound, then released)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}/healthz"


class Sleeps:
    """An injected ``sleep`` that records instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def py(code: str, *args: str) -> list[str]:
    return [PY, "-c", code, *args]


# -- HTTP checks -------------------------------------------------------------------------------


def test_none_check_is_healthy_at_once() -> None:
    assert run_health_check(Check(type="none"), CTX) == HealthResult(
        ok=True, attempts=0, message="no health check configured")
    assert run_health_check(None, CTX).ok


def test_http_check_ok_on_expected_status(consumer: Consumer) -> None:
    consumer.default = Reply(204, "")
    result = run_health_check(Check(url=consumer.url + "/healthz", expect_status=204), CTX)
    assert result.ok and result.attempts == 1
    assert consumer.requests[0][:2] == ("GET", "/healthz")


def test_http_check_retries_with_delay_then_reports_last_attempt(consumer: Consumer) -> None:
    consumer.default = Reply(503, "x" * 150 + "MIDDLE" + "y" * 1000)
    sleeps = Sleeps()
    check = Check(url=consumer.url, attempts=3, delay=timedelta(seconds=1.5))
    result = run_health_check(check, CTX, sleep=sleeps)
    assert not result.ok
    assert result.attempts == 3 and len(consumer.requests) == 3
    assert sleeps.calls == [1.5, 1.5]  # between attempts, not after the last
    assert "503" in result.message and "expected 200" in result.message
    assert "MIDDLE" in result.message  # the body excerpt's start
    assert "y" * 200 not in result.message  # ... limited to 200 characters


def test_http_check_first_healthy_answer_wins(consumer: Consumer) -> None:
    consumer.replies.extend([Reply(503, "warming up"), Reply(401, "old key")])
    sleeps = Sleeps()
    result = run_health_check(Check(url=consumer.url, attempts=5,
                                    delay=timedelta(seconds=2)), CTX, sleep=sleeps)
    assert result.ok and result.attempts == 3
    assert sleeps.calls == [2.0, 2.0]


def test_expect_json_dotted_path_and_placeholders(consumer: Consumer) -> None:
    consumer.default = Reply(200, {"ok": True, "count": 3,
                                   "auth": {"key_id": "key_new", "agent": "research-agent"},
                                   "keys": [{"id": "rot-123"}]})
    check = Check(url=consumer.url, expect_json={
        "auth.key_id": "{key_id}", "auth.agent": "{agent}", "keys.0.id": "{rotation_id}",
        "ok": "true", "count": "3"})
    assert run_health_check(check, CTX).ok

    stale = CheckContext(CTX.credential, CTX.agent, CTX.rotation_id, key_id="key_other")
    result = run_health_check(check, stale)
    assert not result.ok
    assert "auth.key_id" in result.message and "key_new" in result.message
    assert "key_other" in result.message


def test_expect_json_missing_field_and_non_json(consumer: Consumer) -> None:
    consumer.default = Reply(200, {"auth": {}})
    result = run_health_check(Check(url=consumer.url, expect_json={"auth.key_id": "{key_id}"}),
                              CTX)
    assert not result.ok and "'auth.key_id' is missing" in result.message

    consumer.default = Reply(200, "<html>fine</html>")
    result = run_health_check(Check(url=consumer.url, expect_json={"ok": "true"}), CTX)
    assert not result.ok and "not with JSON" in result.message and "<html>" in result.message


def test_expect_json_with_key_id_placeholder_needs_a_key_id(consumer: Consumer) -> None:
    consumer.default = Reply(200, {"key_id": ""})
    no_key = CheckContext(CTX.credential, CTX.agent, CTX.rotation_id, key_id=None)
    result = run_health_check(Check(url=consumer.url, expect_json={"key_id": "{key_id}"}),
                              no_key)
    assert not result.ok and "no key id" in result.message


def test_http_check_timeout_is_per_attempt(consumer: Consumer) -> None:
    consumer.default = Reply(200, {"ok": True}, delay=1.0)
    sleeps = Sleeps()
    started = time.monotonic()
    result = run_health_check(Check(url=consumer.url, timeout=timedelta(seconds=0.2),
                                    attempts=2), CTX, sleep=sleeps)
    assert time.monotonic() - started < 1.5
    assert not result.ok and result.attempts == 2
    assert "timed out after 0.2s" in result.message


def test_http_check_unreachable_consumer_is_unhealthy_not_an_exception(unused_url: str) -> None:
    result = run_health_check(Check(url=unused_url, attempts=2), CTX, sleep=Sleeps())
    assert not result.ok and result.attempts == 2
    assert "ConnectError" in result.message


def test_http_check_through_transport_seam() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"credential": "research-agent/openai"})

    check = Check(url="http://agent.internal/healthz", expect_json={"credential": "{credential}"})
    result = run_health_check(check, CTX, transport=httpx.MockTransport(handler))
    assert result.ok
    assert seen[0].method == "GET" and seen[0].url.host == "agent.internal"


def test_incomplete_check_is_not_healthy() -> None:
    result = run_health_check(Check(type="http", url=None), CTX)
    assert not result.ok and result.attempts == 0 and "url" in result.message
    assert not run_health_check(Check(type="command", run=[]), CTX).ok
    assert not run_health_check(Check(type="smoke-signal"), CTX).ok


# -- command checks ----------------------------------------------------------------------------


def test_command_check_exit_codes_and_attempts() -> None:
    assert run_health_check(Check(type="command", run=py("pass")), CTX).ok

    sleeps = Sleeps()
    check = Check(type="command", attempts=2, delay=timedelta(seconds=3),
                  run=py("import sys; print('agent says no', file=sys.stderr); sys.exit(3)"))
    result = run_health_check(check, CTX, sleep=sleeps)
    assert not result.ok and result.attempts == 2 and sleeps.calls == [3.0]
    assert "exited with code 3" in result.message and "agent says no" in result.message


def test_command_check_sees_key_id_in_env(tmp_path: Path) -> None:
    # The check passes only if the command saw the identifiers it is promised.
    code = ("import os, sys; e = os.environ; sys.exit(0 if (e['ROTATOR_KEY_ID'], "
            "e['ROTATOR_CREDENTIAL'], e['ROTATOR_AGENT'], e['ROTATOR_ROTATION_ID']) == "
            "('key_new', 'research-agent/openai', 'research-agent', 'rot-123') else 9)")
    assert run_health_check(Check(type="command", run=py(code)), CTX).ok


def test_command_check_timeout_kills_the_whole_process_group() -> None:
    # A grandchild holding stdout open must not keep the check waiting past its timeout.
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "time.sleep(30)")
    started = time.monotonic()
    result = run_health_check(Check(type="command", run=py(code),
                                    timeout=timedelta(seconds=0.5)), CTX)
    assert time.monotonic() - started < 4
    assert not result.ok and "timed out after 0.5s" in result.message


def test_command_check_missing_binary(tmp_path: Path) -> None:
    result = run_health_check(Check(type="command", run=[str(tmp_path / "nope")]), CTX)
    assert not result.ok and "could not be started" in result.message


# -- hooks -------------------------------------------------------------------------------------


def _env_dump_hook(out: Path) -> Hook:
    return Hook(run=py("import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))",
                       str(out)))


def test_command_hook_env_has_identifiers_and_no_secret(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    value = "sk-admin-" + "s3cr3t" * 6
    Secret(value)  # the daemon resolved it: rotator.redaction now knows it is a secret
    monkeypatch.setenv("OPENAI_ADMIN_KEY", value)
    monkeypatch.setenv("ROTATOR_TEST_HARMLESS", "plain")
    # Secrets rotator never reads itself (libpq and boto3 do): recognised by their names.
    for name in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "VAULT_TOKEN",
                 "CREDENTIALS_DIRECTORY"):
        monkeypatch.setenv(name, "never-seen-" + name.lower())
    out = tmp_path / "env.json"
    run_hook(_env_dump_hook(out), CTX)
    env = json.loads(out.read_text())
    assert env["ROTATOR_CREDENTIAL"] == "research-agent/openai"
    assert env["ROTATOR_AGENT"] == "research-agent"
    assert env["ROTATOR_ROTATION_ID"] == "rot-123"
    assert env["ROTATOR_KEY_ID"] == "key_new"
    assert env["ROTATOR_TEST_HARMLESS"] == "plain"  # the daemon's environment is inherited
    assert "OPENAI_ADMIN_KEY" not in env
    assert value not in out.read_text()
    assert "never-seen" not in out.read_text()


def test_command_hook_without_key_id_gets_empty_variable(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    run_hook(_env_dump_hook(out), CheckContext("c", "a", "r", key_id=None))
    assert json.loads(out.read_text())["ROTATOR_KEY_ID"] == ""


def test_command_hook_failure_names_credential_command_code_and_stderr_tail() -> None:
    code = ("import sys; sys.stderr.write('HEAD' + 'x' * 2000 + 'reload refused: no such unit');"
            " sys.exit(5)")
    with pytest.raises(PermanentError) as info:
        run_hook(Hook(run=py(code)), CTX)
    message = str(info.value)
    assert message.startswith("research-agent/openai: on_rotate command `")
    assert PY in message and "exited with code 5" in message
    stderr = message.split("; stderr: ", 1)[1]
    assert stderr.endswith("reload refused: no such unit")
    assert "HEAD" not in stderr and len(stderr) <= 501  # the last ~500 characters only
    assert not isinstance(info.value, TransientError)


def test_command_hook_timeout_is_permanent() -> None:
    started = time.monotonic()
    with pytest.raises(PermanentError, match=r"timed out after 0\.3s"):
        run_hook(Hook(run=py("import time; time.sleep(30)"), timeout=timedelta(seconds=0.3)),
                 CTX)
    assert time.monotonic() - started < 4


def test_command_hook_missing_binary_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="could not be started"):
        run_hook(Hook(run=[str(tmp_path / "nope")]), CTX)


def test_http_hook_sends_identifiers_only(consumer: Consumer) -> None:
    run_hook(Hook(type="http", url=consumer.url + "/reload", method="put"), CTX)
    method, path, body = consumer.requests[0]
    assert (method, path) == ("PUT", "/reload")
    assert json.loads(body) == {"credential": "research-agent/openai", "agent": "research-agent",
                                "rotation_id": "rot-123", "key_id": "key_new"}


@pytest.mark.parametrize(("status", "error"), [
    (500, TransientError), (503, TransientError), (429, TransientError),
    (404, PermanentError), (400, PermanentError), (302, PermanentError),
])
def test_http_hook_status_classes(consumer: Consumer, status: int,
                                  error: type[Exception]) -> None:
    consumer.default = Reply(status, "reload endpoint says: " + "z" * 500,
                             headers={"Retry-After": "7"})
    with pytest.raises(error) as info:
        run_hook(Hook(type="http", url=consumer.url + "/reload"), CTX)
    assert type(info.value) is error
    message = str(info.value)
    assert f"answered {status}" in message and "research-agent/openai" in message
    assert "z" * 201 not in message
    if status == 429:
        assert isinstance(info.value, TransientError) and info.value.retry_after == 7.0


def test_http_hook_connection_refused_and_timeout_are_transient(unused_url: str) -> None:
    with pytest.raises(TransientError, match="ConnectError"):
        run_hook(Hook(type="http", url=unused_url), CTX)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(TransientError, match="timed out"):
        run_hook(Hook(type="http", url="http://agent.internal/reload"), CTX,
                 transport=httpx.MockTransport(slow))


def test_http_hook_url_password_is_not_in_the_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403)

    with pytest.raises(PermanentError) as info:
        run_hook(Hook(type="http", url="http://ops:hunter2@agent.internal/reload"), CTX,
                 transport=httpx.MockTransport(handler))
    assert "hunter2" not in str(info.value) and "answered 403" in str(info.value)


# -- the sample agent as a real consumer -------------------------------------------------------


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_sample_agent_counts_and_serves_health(openbao: Any, fake_openai: Any) -> None:
    client = openbao.client()
    project = fake_openai.add_project()
    account = fake_openai.add_service_account(project, name="research-agent")
    key_id, value = fake_openai.seed_key(project, account)
    path = "agents/health-test/openai"
    written = client.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"OPENAI_API_KEY": value, "OTHER": "kept"})
    version = written["data"]["version"]
    client.secrets.kv.v2.update_metadata(path=path, custom_metadata={
        "OPENAI_API_KEY.key_id": key_id, "OPENAI_API_KEY.version": str(version)})

    with SampleAgent(openbao.url, openbao.root_token, path, "OPENAI_API_KEY",
                     fake_openai.base_url, period=0.05) as agent:
        _wait(lambda: agent.successes >= 2)
        assert agent.last_key_id == key_id
        check = Check(url=agent.health_url, expect_json={"key_id": "{key_id}", "ok": "true"})
        ctx = CheckContext("research-agent/openai", "research-agent", "rot-1", key_id)
        assert run_health_check(check, ctx).ok

        agent.fail_health(True)
        result = run_health_check(check, ctx)
        assert not result.ok and "503" in result.message
        agent.fail_health(False)

        # A new version without metadata for it: the agent cannot name the key it uses.
        client.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"OPENAI_API_KEY": "sk-proj-not-a-real-key-000000", "OTHER": "kept"})
        _wait(lambda: agent.rejections >= 1)
        assert agent.last_key_id is None
        assert agent.rejected_at and agent.rejected_at[0] <= time.time()
        status = httpx.get(agent.health_url)
        assert status.status_code == 503 and status.json()["ok"] is False
        assert "sk-proj-not-a-real-key" not in status.text and value not in status.text
    assert agent.errors == 0
