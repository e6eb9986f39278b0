"""Consumer health checks and ``on_rotate`` hooks: how rotator knows an agent survived a rotation.

The engine stores the new key, tells the consumer to reload (a hook), then asks whether it still
works (a check). Only a healthy answer lets the old key go; anything else makes the engine roll
back. So the two halves fail differently on purpose:

- :func:`run_hook` *raises*: a hook that cannot be delivered is an error the engine retries
  (:class:`~rotator.errors.TransientError`) or gives up on
  (:class:`~rotator.errors.PermanentError`).
- :func:`run_health_check` *never raises* for a failing consumer: it returns a
  :class:`HealthResult` saying what the last attempt saw, and the engine decides on rollback.

Hooks and checks receive the credential name, agent, rotation id and key id only, never a secret:
the environment given to commands is also stripped of any variable holding a value the process
knows to be secret (see :mod:`rotator.redaction`), so a hook cannot leak the daemon's own keys.

This module does not import :mod:`rotator.config`: it accepts any object with the attributes of
the config models (:class:`HealthCheckSpec`, :class:`HookSpec`), which keeps it testable alone.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import httpx

from rotator import redaction
from rotator.errors import PermanentError, TransientError
from rotator.plugin_support import retry_after

__all__ = [
    "CheckContext",
    "HealthCheckSpec",
    "HealthResult",
    "HookSpec",
    "run_health_check",
    "run_hook",
]

STDERR_TAIL = 500
"""Characters of a failed hook's stderr kept in the error: enough to see why, not a log dump."""
EXCERPT = 200
"""Characters of a response body or check output kept in a :class:`HealthResult` message."""
_KILL_WAIT = 5.0


class HealthCheckSpec(Protocol):
    """What :func:`run_health_check` reads from ``[credentials.health_check]``."""

    @property
    def type(self) -> str: ...  # "http" | "command" | "none"
    @property
    def url(self) -> str | None: ...
    @property
    def expect_status(self) -> int: ...
    @property
    def expect_json(self) -> Mapping[str, str] | None: ...
    @property
    def run(self) -> Sequence[str] | None: ...
    @property
    def timeout(self) -> timedelta: ...
    @property
    def attempts(self) -> int: ...
    @property
    def delay(self) -> timedelta: ...


class HookSpec(Protocol):
    """What :func:`run_hook` reads from ``[credentials.on_rotate]``."""

    @property
    def type(self) -> str: ...  # "command" | "http"
    @property
    def run(self) -> Sequence[str] | None: ...
    @property
    def url(self) -> str | None: ...
    @property
    def method(self) -> str: ...
    @property
    def timeout(self) -> timedelta: ...


@dataclass(frozen=True)
class CheckContext:
    """Everything a hook or check may know about the rotation: identifiers, never secrets."""

    credential: str
    agent: str
    rotation_id: str
    key_id: str | None

    def env(self) -> dict[str, str]:
        """The ``ROTATOR_*`` variables a command hook or check receives."""
        return {
            "ROTATOR_CREDENTIAL": self.credential,
            "ROTATOR_AGENT": self.agent,
            "ROTATOR_ROTATION_ID": self.rotation_id,
            "ROTATOR_KEY_ID": self.key_id or "",
        }

    def body(self) -> dict[str, str | None]:
        """The JSON body an HTTP hook receives."""
        return {
            "credential": self.credential,
            "agent": self.agent,
            "rotation_id": self.rotation_id,
            "key_id": self.key_id,
        }


@dataclass(frozen=True)
class HealthResult:
    """The outcome of a health check: ``message`` says what the last attempt saw."""

    ok: bool
    attempts: int
    message: str


# -- hooks ---------------------------------------------------------------------------------------


def run_hook(hook: HookSpec, ctx: CheckContext, *,
             transport: httpx.BaseTransport | None = None) -> None:
    """Tell the consumer to reload its key; return only once it acknowledged.

    Raises :class:`TransientError` for what a retry may fix (an HTTP 5xx or 429, a timeout or a
    refused connection) and :class:`PermanentError` for the rest: a command that exits non-zero
    or times out (re-running a reload that just failed rarely helps, and it may not be safe),
    an HTTP 4xx, or a hook the policy file describes incompletely.
    """
    if hook.type == "command":
        _run_command_hook(hook, ctx)
    elif hook.type == "http":
        _run_http_hook(hook, ctx, transport)
    else:
        raise PermanentError(f"{ctx.credential}: on_rotate type {hook.type!r} is not one of "
                             "command, http")


def _run_command_hook(hook: HookSpec, ctx: CheckContext) -> None:
    argv = list(hook.run or [])
    if not argv:
        raise PermanentError(f"{ctx.credential}: on_rotate of type command needs `run`")
    shown = _shell_line(argv)
    seconds = _seconds(hook.timeout)
    outcome = _run_command(argv, ctx, seconds)
    if outcome.error is not None:
        raise PermanentError(f"{ctx.credential}: on_rotate command `{shown}` {outcome.error}")
    tail = _tail_suffix(outcome.output, STDERR_TAIL, label=outcome.stream)
    if outcome.timed_out:
        raise PermanentError(
            f"{ctx.credential}: on_rotate command `{shown}` timed out after {seconds:g}s and was "
            f"killed{tail}")
    if outcome.returncode != 0:
        raise PermanentError(
            f"{ctx.credential}: on_rotate command `{shown}` exited with code "
            f"{outcome.returncode}{tail}")


def _run_http_hook(hook: HookSpec, ctx: CheckContext,
                   transport: httpx.BaseTransport | None) -> None:
    if not hook.url:
        raise PermanentError(f"{ctx.credential}: on_rotate of type http needs `url`")
    method = (hook.method or "POST").upper()
    seconds = _seconds(hook.timeout)
    where = f"{method} {_safe_url(hook.url)}"
    try:
        with httpx.Client(transport=transport, timeout=seconds) as client:
            response = client.request(method, hook.url, json=ctx.body())
    except httpx.TimeoutException as exc:
        raise TransientError(
            f"{ctx.credential}: on_rotate {where} timed out after {seconds:g}s") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise PermanentError(f"{ctx.credential}: on_rotate url is not usable: {exc}") from exc
    except httpx.TransportError as exc:
        raise TransientError(
            f"{ctx.credential}: on_rotate {where} failed: {type(exc).__name__}: {exc}") from exc
    if response.is_success:
        return
    message = (f"{ctx.credential}: on_rotate {where} answered {response.status_code}"
               f"{_tail_suffix(response.text, EXCERPT, head=True, label='body')}")
    if response.status_code >= 500 or response.status_code == 429:
        raise TransientError(message, retry_after=retry_after(response.headers))
    raise PermanentError(message)


# -- health checks -------------------------------------------------------------------------------


def run_health_check(check: HealthCheckSpec | None, ctx: CheckContext, *,
                     sleep: Callable[[float], None] = time.sleep,
                     transport: httpx.BaseTransport | None = None) -> HealthResult:
    """Ask the consumer whether it works, up to ``check.attempts`` times, ``check.delay`` apart.

    A consumer often needs a moment to pick up a new key, hence the attempts; the first healthy
    answer wins. Each attempt is bounded by ``check.timeout``. Never raises because the consumer
    is unhealthy or unreachable: the result carries what the last attempt saw (status code, a
    body excerpt, an exit code) so the engine can roll back and say why. A check the policy file
    describes incompletely also comes back not ok (with ``attempts == 0``), never as healthy.
    """
    if check is None or check.type == "none":
        return HealthResult(ok=True, attempts=0, message="no health check configured")
    attempt_once: Callable[[], tuple[bool, str]]
    client: httpx.Client | None = None
    if check.type == "http":
        if not check.url:
            return HealthResult(False, 0, "health_check of type http needs `url`")
        client = httpx.Client(transport=transport, timeout=_seconds(check.timeout))
        http_client = client

        def attempt_once() -> tuple[bool, str]:
            return _http_attempt(http_client, check, ctx)
    elif check.type == "command":
        argv = list(check.run or [])
        if not argv:
            return HealthResult(False, 0, "health_check of type command needs `run`")

        def attempt_once() -> tuple[bool, str]:
            return _command_attempt(argv, check, ctx)
    else:
        return HealthResult(False, 0, f"health_check type {check.type!r} is not one of "
                                      "http, command, none")

    total = max(1, int(check.attempts))
    delay = _seconds(check.delay)
    try:
        for attempt in range(1, total + 1):
            ok, message = attempt_once()
            if ok:
                return HealthResult(True, attempt, message)
            if attempt < total:
                sleep(delay)
        return HealthResult(False, total, message)
    finally:
        if client is not None:
            client.close()


def _http_attempt(client: httpx.Client, check: HealthCheckSpec,
                  ctx: CheckContext) -> tuple[bool, str]:
    url = check.url or ""
    where = f"GET {_safe_url(url)}"
    try:
        response = client.get(url)
    except httpx.TimeoutException:
        return False, f"{where} timed out after {_seconds(check.timeout):g}s"
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return False, f"{where} failed: {type(exc).__name__}: {_excerpt(str(exc))}"
    body = _tail_suffix(response.text, EXCERPT, head=True, label="body")
    if response.status_code != check.expect_status:
        return False, (f"{where} answered {response.status_code}, expected "
                       f"{check.expect_status}{body}")
    if check.expect_json:
        try:
            document = response.json()
        except ValueError:
            return False, f"{where} answered {response.status_code} but not with JSON{body}"
        for path, template in check.expect_json.items():
            expected = _substitute(template, ctx)
            if expected is None:
                return False, (f"expect_json {path!r} refers to {{key_id}} but this rotation "
                               "has no key id to compare with")
            found, value = _lookup(document, path)
            if not found:
                return False, f"{where}: JSON field {path!r} is missing{body}"
            if _as_text(value) != expected:
                return False, (f"{where}: JSON field {path!r} is {_excerpt(_as_text(value))!r},"
                               f" expected {expected!r}")
    return True, f"{where} answered {response.status_code}"


def _command_attempt(argv: list[str], check: HealthCheckSpec,
                     ctx: CheckContext) -> tuple[bool, str]:
    shown = _shell_line(argv)
    seconds = _seconds(check.timeout)
    outcome = _run_command(argv, ctx, seconds)
    if outcome.error is not None:
        return False, f"`{shown}` {outcome.error}"
    tail = _tail_suffix(outcome.output, EXCERPT, label=outcome.stream)
    if outcome.timed_out:
        return False, f"`{shown}` timed out after {seconds:g}s{tail}"
    if outcome.returncode != 0:
        return False, f"`{shown}` exited with code {outcome.returncode}{tail}"
    return True, f"`{shown}` exited with code 0"


# -- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CommandOutcome:
    returncode: int | None
    output: str
    stream: str = "stderr"
    timed_out: bool = False
    error: str | None = None


_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_KEY|CREDENTIAL",
                          re.IGNORECASE)
"""Variables a hook never inherits by their name alone: secrets rotator never reads itself but a
library does (``PGPASSWORD`` for the state store, ``AWS_SECRET_ACCESS_KEY`` for boto3), and
systemd's ``CREDENTIALS_DIRECTORY``."""


def _command_env(ctx: CheckContext) -> dict[str, str]:
    """The daemon's environment plus ``ROTATOR_*``, less anything that holds a secret.

    A hook needs PATH, HOME, locale and friends to run ``systemctl`` or ``kubectl``; it must not
    inherit, say, the provider admin key the daemon read from ``OPENAI_ADMIN_KEY`` (a value
    rotator knows is a secret) or the state store's ``PGPASSWORD`` (a name that says it is one).
    """
    env = {k: v for k, v in os.environ.items()
           if redaction.scrub(v) == v and not _SECRET_NAME.search(k)}
    env.update(ctx.env())
    return env


def _run_command(argv: list[str], ctx: CheckContext, seconds: float) -> _CommandOutcome:
    """Run ``argv`` without a shell; on timeout kill its whole process group, not just it.

    Killing only the direct child would leave a grandchild holding the output pipe open, and
    reading it would then block past the timeout.
    """
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_command_env(ctx), start_new_session=True)
    except OSError as exc:
        return _CommandOutcome(None, "", error=f"could not be started: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired:
            out, err = b"", b""
        return _output(proc.returncode, out, err, timed_out=True)
    return _output(proc.returncode, out, err)


def _output(returncode: int | None, out: bytes | None, err: bytes | None, *,
            timed_out: bool = False) -> _CommandOutcome:
    """stderr says why a command failed; stdout stands in for tools that only print there."""
    if text := _decode(err):
        return _CommandOutcome(returncode, text, "stderr", timed_out)
    return _CommandOutcome(returncode, _decode(out), "stdout", timed_out)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace").strip()


def _tail_suffix(text: str, limit: int, *, head: bool = False, label: str = "output") -> str:
    """``": <label>: <excerpt>"`` or nothing; errors keep the end of stderr, bodies the start."""
    text = redaction.scrub(" ".join(text.split()))
    if not text:
        return ""
    if len(text) > limit:
        text = text[:limit] + "…" if head else "…" + text[-limit:]
    return f"; {label}: {text}"


def _excerpt(text: str, limit: int = EXCERPT) -> str:
    text = redaction.scrub(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "…"


def _shell_line(argv: list[str]) -> str:
    return _excerpt(shlex.join(argv))


def _safe_url(url: str) -> str:
    """``url`` without a password in its userinfo, so an error message cannot carry it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return _excerpt(url)
    if parsed.password:
        parsed = parsed.copy_with(password="****")
    return _excerpt(str(parsed))


def _seconds(value: timedelta | float | int) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _substitute(template: str, ctx: CheckContext) -> str | None:
    """``template`` with ``{key_id}``, ``{credential}``, ``{agent}``, ``{rotation_id}`` filled.

    Plain replacement rather than ``str.format`` so other braces in an expected value stay as
    they are. None when the template needs a key id the rotation does not have.
    """
    if "{key_id}" in template and ctx.key_id is None:
        return None
    values = {"key_id": ctx.key_id or "", "credential": ctx.credential, "agent": ctx.agent,
              "rotation_id": ctx.rotation_id}
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def _lookup(document: Any, path: str) -> tuple[bool, Any]:
    """Follow a dotted ``path`` (``auth.key_id``; digits index lists) into parsed JSON.

    A key containing a dot literally is found before the path is split, so ``{"a.b": 1}``
    matches ``a.b`` too.
    """
    if isinstance(document, dict) and path in document:
        return True, document[path]
    current = document
    for part in path.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return False, None
    return True, current


def _as_text(value: Any) -> str:
    """How a JSON value compares with an expected string: strings as is, others as JSON.

    So ``expect_json = { ok = "true", count = "3" }`` matches ``{"ok": true, "count": 3}``.
    """
    return value if isinstance(value, str) else json.dumps(value)
