"""Vault answers that mean "not serving right now" are transient for every vault operation;
those that mean "this request is wrong" stay permanent.

Sealed, standby, 503, 429, 5xx, a refused or reset connection and a timeout are transient, so
the engine waits for the vault instead of failing a rotation (issue 10); permission denied, not
found and bad requests are permanent. What real servers can produce is produced on them (a real
OpenBao's rate-limit quota answers 429; a sealed one is in tests/test_vault_sealed.py); the
rest comes from a tiny local HTTP server that answers as a standby node, a load balancer or an
overloaded AWS endpoint does. No error ever quotes the value being staged.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rotator.errors import PermanentError, RotatorError, TransientError
from rotator.interfaces import Secret, StagingInventory, Vault
from rotator.testing.openbao import OpenBaoDevServer
from rotator.testing.server_process import HOST, free_port
from rotator.vaults.aws_secretsmanager import SecretsManagerSettings, SecretsManagerVault
from rotator.vaults.hashicorp_vault import HashiCorpVault, HashiCorpVaultSettings
from tests.support import remember_issued

TOKEN_ENV = "ROTATOR_TEST_OUTAGE_TOKEN"
TIMEOUT = 0.5
"""The vaults' request timeout here; the server's slow answer takes four times as long."""


@dataclass(frozen=True)
class Answer:
    """What the local server does with every request: an HTTP answer, or ``reset`` (close the
    connection with a TCP RST) or ``slow`` (answer after the client's timeout)."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    reset: bool = False
    slow: bool = False


class _Handler(BaseHTTPRequestHandler):
    server: FailingServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request body may hold the staged value."""

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/v1/auth/token/lookup-self"):
            # The token itself is fine (and never expires): only the requests fail.
            self._send(Answer(200, json.dumps({"data": {"ttl": 0}}).encode(),
                              (("Content-Type", "application/json"),)))
            return
        answer = self.server.answer
        self.server.requests += 1
        if answer.reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if answer.slow:
            time.sleep(TIMEOUT * 4)
        self._send(answer)

    def _send(self, answer: Answer) -> None:
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            pass  # the client gave up (a timeout)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = _any


class FailingServer(ThreadingHTTPServer):
    """Answers every request with ``answer``, on a free loopback port."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.answer = Answer()
        self.requests = 0
        """Requests answered with ``answer`` (token lookups not counted)."""
        self.url = f"http://{HOST}:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[FailingServer]:
    srv = FailingServer()
    try:
        yield srv
    finally:
        srv.close()


def vault_json(status: int, *errors: str) -> Answer:
    """An answer as Vault and OpenBao write them: ``{"errors": [...]}``."""
    return Answer(status, json.dumps({"errors": list(errors)}).encode(),
                  (("Content-Type", "application/json"),))


def aws_json(status: int, code: str, message: str = "") -> Answer:
    """An answer as AWS's JSON protocol (Secrets Manager) writes an error."""
    body = {"__type": code, "message": message} if code else {}
    return Answer(status, json.dumps(body).encode(),
                  (("Content-Type", "application/x-amz-json-1.1"),
                   ("x-amzn-RequestId", str(uuid.uuid4()))))


HTML_502 = Answer(502, b"<html><body>502 Bad Gateway</body></html>",
                  (("Content-Type", "text/html"),))
HTML_504 = Answer(504, b"<html><body>504 Gateway Time-out</body></html>",
                  (("Content-Type", "text/html"),))


def operations(vault: Vault, value: str) -> dict[str, Callable[[], object]]:
    """Every call the engine, the health check and the leftover report make on a vault."""
    path, field, rid = "agents/outage/openai", "API_KEY", "r20261205000000-outage"
    version = str(uuid.uuid4()) if isinstance(vault, SecretsManagerVault) else "1"
    calls: dict[str, Callable[[], object]] = {
        "health": vault.health,
        "read": lambda: vault.read(path, field, ("KEY_ID",)),
        "read_version": lambda: vault.read_version(path, field, version),
        "stage": lambda: vault.stage(path, field, Secret(value), rid, {"KEY_ID": "k1"}),
        "read_staged": lambda: vault.read_staged(path, field, rid),
        "promote": lambda: vault.promote(path, field, rid, {"key_id": "k1"}),
        "restore": lambda: vault.restore(path, field, version, f"{rid}/rollback",
                                         {"key_id": "k0"}),
        "discard_staged": lambda: vault.discard_staged(path, rid),
    }
    if isinstance(vault, StagingInventory):
        calls["staged_copies"] = vault.staged_copies
        calls["staged_rotations"] = lambda: vault.staged_rotations(path)
    return calls


def outcomes(vault: Vault, only: tuple[str, ...] = ()) -> dict[str, BaseException | None]:
    """Each operation's exception (None when it returned); no message shows the value."""
    value = f"sk-outage-{uuid.uuid4().hex}"
    remember_issued([value])
    found: dict[str, BaseException | None] = {}
    for name, call in operations(vault, value).items():
        if only and name not in only:
            continue
        try:
            call()
            found[name] = None
        except RotatorError as exc:
            found[name] = exc
        seen = found[name]
        while seen is not None:
            assert value not in str(seen) and value not in repr(seen), f"{name} shows the value"
            seen = seen.__cause__
    return found


def assert_transient(found: dict[str, BaseException | None], *fragments: str) -> None:
    """Every operation failed with a TransientError; each message (but health's, which reads
    the server's own health answer) holds ``fragments``."""
    wrong = {name: repr(exc) for name, exc in found.items()
             if not isinstance(exc, TransientError)}
    assert not wrong, f"not transient: {wrong}"
    for name, exc in found.items():
        for fragment in fragments if name != "health" else ():
            assert fragment in str(exc), f"{name}: {exc}"


def assert_permanent(found: dict[str, BaseException | None]) -> None:
    """Each operation failed permanently, or returned (e.g. "nothing staged" on a 404)."""
    wrong = {name: repr(exc) for name, exc in found.items()
             if exc is not None and not isinstance(exc, PermanentError)}
    assert not wrong, f"not permanent: {wrong}"


# -- HashiCorp Vault / OpenBao ----------------------------------------------------------------


@pytest.fixture
def kv(server: FailingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HashiCorpVault]:
    monkeypatch.setenv(TOKEN_ENV, f"hvs.{uuid.uuid4().hex}")
    vault = HashiCorpVault("bao", HashiCorpVaultSettings(url=server.url, token_env=TOKEN_ENV,
                                                         timeout=TIMEOUT))
    try:
        yield vault
    finally:
        vault.close()


NOT_SERVING = {
    "sealed (503)": (vault_json(503, "Vault is sealed"), "is sealed while", "operator unseal"),
    "unavailable (503)": (vault_json(503), "is unavailable while"),
    "rate-limited (429)": (vault_json(429, 'request path "secret/data/x": rate limit quota '
                                           "exceeded"), "rate-limited"),
    "standby, no active node (500)": (vault_json(
        500, "local node not active but active cluster node not found"), "failed"),
    "a DR secondary (472)": (vault_json(472, "disaster recovery secondary"), "not serving"),
    "a performance standby (473)": (vault_json(473, "performance standby"), "standby"),
    "standby (503)": (vault_json(503, "Vault is in standby mode"), "is unavailable"),
    "a load balancer's 502": (HTML_502, "failed"),
    "a load balancer's 504": (HTML_504, "not serving"),
}


@pytest.mark.parametrize("case", sorted(NOT_SERVING))
def test_kv_not_serving_right_now_is_transient_for_every_operation(
        kv: HashiCorpVault, server: FailingServer, case: str) -> None:
    answer, *fragments = NOT_SERVING[case]
    server.answer = answer
    assert_transient(outcomes(kv), f"vault 'bao' at {server.url}", *fragments)


WRONG_REQUEST = {
    "bad request (400)": vault_json(400, "invalid parameters"),
    "not found (404)": vault_json(404),
    "no such mount (404)": vault_json(404, "no handler for route \"secret/data/x\""),
    "permission denied (403)": vault_json(403, "permission denied"),
    "unauthenticated (401)": vault_json(401, "missing client token"),
}


@pytest.mark.parametrize("case", sorted(WRONG_REQUEST))
def test_kv_wrong_requests_stay_permanent(kv: HashiCorpVault, server: FailingServer,
                                          case: str) -> None:
    server.answer = WRONG_REQUEST[case]
    found = outcomes(kv)
    assert_permanent(found)
    assert isinstance(found["stage"], PermanentError), "a write that cannot land must fail"


def test_kv_connection_refused_reset_and_timeout_are_transient(
        kv: HashiCorpVault, server: FailingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    some = ("health", "read", "stage", "promote", "discard_staged", "staged_copies")
    server.answer = Answer(reset=True)
    assert_transient(outcomes(kv, some), "is unreachable")
    server.answer = Answer(slow=True)
    assert_transient(outcomes(kv, ("read", "stage")), f"did not answer within {TIMEOUT:g}s")
    refused = HashiCorpVault("bao", HashiCorpVaultSettings(
        url=f"http://{HOST}:{free_port()}", token_env=TOKEN_ENV, timeout=TIMEOUT))
    try:
        assert_transient(outcomes(refused, some), "is unreachable", "is it running?")
    finally:
        refused.close()


def test_a_real_openbao_rate_limit_is_transient(openbao: OpenBaoDevServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenBao's rate-limit quota answers 429, on a mount of this test's own."""
    client = openbao.client()
    mount, quota = f"rl{uuid.uuid4().hex[:8]}", f"rotator-test-{uuid.uuid4().hex[:8]}"
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    monkeypatch.setenv(TOKEN_ENV, openbao.root_token)
    vault = HashiCorpVault("bao", HashiCorpVaultSettings(url=openbao.url, token_env=TOKEN_ENV,
                                                         mount=mount))
    try:
        deadline = time.monotonic() + 10  # a new KV v2 mount upgrades itself for a moment
        while True:
            try:
                vault.stage("agents/rl", "K", Secret(f"sk-rl-{uuid.uuid4().hex}"), "r-1")
                break
            except TransientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.sys.create_or_update_quota(name=quota, rate=1.0, path=f"{mount}/",
                                          interval="30s")
        found = outcomes(vault, ("read", "stage", "read_staged", "promote", "discard_staged",
                                 "staged_copies"))
        limited = {name: exc for name, exc in found.items() if isinstance(exc, TransientError)}
        assert len(limited) >= len(found) - 1, found  # one call may fit in the quota
        assert_transient(limited, "rate-limited", "rate limit quota exceeded")
    finally:
        vault.close()
        client.sys.delete_quota(quota)
        client.sys.disable_secrets_engine(mount)


# -- AWS Secrets Manager ------------------------------------------------------------------------


@pytest.fixture
def sm(server: FailingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretsManagerVault]:
    monkeypatch.setenv("ROTATOR_TEST_OUTAGE_KEY", "AKIA" + "T" * 16)
    monkeypatch.setenv("ROTATOR_TEST_OUTAGE_SECRET", uuid.uuid4().hex)
    vault = SecretsManagerVault("sm", SecretsManagerSettings(
        region="us-east-1", endpoint_url=server.url, timeout=TIMEOUT,
        access_key_id={"env": "ROTATOR_TEST_OUTAGE_KEY"},
        secret_access_key={"env": "ROTATOR_TEST_OUTAGE_SECRET"}))
    try:
        yield vault
    finally:
        vault.close()


AWS_NOT_SERVING = {
    "ThrottlingException": aws_json(400, "ThrottlingException", "Rate exceeded"),
    "RequestLimitExceeded": aws_json(400, "RequestLimitExceeded", "Request limit exceeded."),
    "InternalServiceError": aws_json(500, "InternalServiceError", "An error occurred"),
    "ServiceUnavailable": aws_json(503, "ServiceUnavailable", "Service unavailable"),
    "a bare 429": aws_json(429, ""),
    "a load balancer's 502": HTML_502,
    "a load balancer's 504": HTML_504,
}


@pytest.mark.parametrize("case", sorted(AWS_NOT_SERVING))
def test_secretsmanager_not_serving_right_now_is_transient_for_every_operation(
        sm: SecretsManagerVault, server: FailingServer, case: str) -> None:
    server.answer = AWS_NOT_SERVING[case]
    assert_transient(outcomes(sm), "vault 'sm'", "AWS could not answer")


AWS_WRONG_REQUEST = {
    "AccessDeniedException": aws_json(400, "AccessDeniedException", "not authorized"),
    "ResourceNotFoundException": aws_json(400, "ResourceNotFoundException", "not found"),
    "InvalidParameterException": aws_json(400, "InvalidParameterException", "bad parameter"),
    "InvalidRequestException": aws_json(400, "InvalidRequestException", "bad request"),
    "UnrecognizedClientException": aws_json(400, "UnrecognizedClientException", "bad key"),
}


@pytest.mark.parametrize("case", sorted(AWS_WRONG_REQUEST))
def test_secretsmanager_wrong_requests_stay_permanent(
        sm: SecretsManagerVault, server: FailingServer, case: str) -> None:
    server.answer = AWS_WRONG_REQUEST[case]
    found = outcomes(sm)
    assert_permanent(found)
    assert isinstance(found["stage"], PermanentError), "a write that cannot land must fail"


def test_secretsmanager_connection_refused_reset_and_timeout_are_transient(
        sm: SecretsManagerVault, server: FailingServer) -> None:
    some = ("health", "read", "stage", "promote", "discard_staged", "staged_copies")
    server.answer = Answer(reset=True)
    assert_transient(outcomes(sm, some), "could not reach AWS")
    server.answer = Answer(slow=True)
    assert_transient(outcomes(sm, ("read", "stage")), "could not reach AWS")
    refused = SecretsManagerVault("sm", sm.cfg.model_copy(
        update={"endpoint_url": f"http://{HOST}:{free_port()}"}))
    try:
        assert_transient(outcomes(refused, some), "could not reach AWS")
    finally:
        refused.close()


@pytest.mark.parametrize("answer", [aws_json(400, "ThrottlingException", "Rate exceeded"),
                                    aws_json(503, "ServiceUnavailable"), Answer(reset=True)],
                         ids=["throttled", "503", "reset"])
def test_secretsmanager_makes_one_request_per_call(sm: SecretsManagerVault,
                                                   server: FailingServer, answer: Answer) -> None:
    """botocore retries nothing behind the engine's back: the engine's retries have a deadline
    and check the lease before each attempt (issue 10), an SDK's own would do neither."""
    server.answer = answer
    with pytest.raises(TransientError):
        sm.read("agents/outage/openai", "API_KEY")
    assert server.requests == 1


def test_kv_makes_one_request_per_call(kv: HashiCorpVault, server: FailingServer) -> None:
    server.answer = vault_json(503, "Vault is sealed")
    with pytest.raises(TransientError):
        kv.read("agents/outage/openai", "API_KEY")
    assert server.requests == 1
