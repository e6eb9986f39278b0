"""A test server run as a subprocess: free loopback port, private directory and log, stop by pid.

OpenBao (:mod:`rotator.testing.openbao`), moto (:mod:`rotator.testing.moto_server`) and
PostgreSQL (:mod:`rotator.testing.postgres`) differ only in the command they run, how to tell
that they answer and what they need before the first start. The rest lives here once, so all
three keep the same rules: listen on 127.0.0.1 only; retry on another free port when the one
picked was taken meanwhile; fail with what went wrong and the tail of the server's log, secret
values removed; stop by pid (never by name), also at interpreter exit; remove every file.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self

from rotator.errors import PermanentError

__all__ = ["HOST", "ServerProcess", "clean_env", "free_port", "http_answer"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
"""The only address a test server listens on."""
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 20

_running: set[ServerProcess] = set()
_running_lock = threading.Lock()


def free_port() -> int:
    """A port nothing listens on right now (another process may still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env(drop_prefixes: tuple[str, ...], **extra: str) -> dict[str, str]:
    """This process's environment without the variables that could steer the server, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(extra)
    return env


def http_answer(url: str, headers: Mapping[str, str] | None = None, *,
                cafile: str | None = None) -> tuple[int, bytes] | None:
    """One GET of ``url``: its status and body whatever the status, or None if nothing answers.
    ``cafile``: the CA to trust for an https URL (a dev server's own)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=1, context=context) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except (OSError, ValueError):
        return None


@atexit.register
def _stop_all() -> None:
    """Stop servers a crashed test run or demo forgot, so none outlives the interpreter."""
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


class ServerProcess:
    """Base of the subprocess servers: ``start()``, ``stop()``, ``running``, ``port``, ``pid``.

    A subclass names itself in the class attributes and implements :meth:`_command` (run with
    ``self.port`` set) and :meth:`_probe`; it may override :meth:`_prepare` (once per start, in
    the fresh private directory), :meth:`_env`, :meth:`_popen_extra` and
    :meth:`_secret_values`. ``start()`` returns once :meth:`_probe` succeeds and raises
    ``error`` with the log's tail otherwise; ``stop()`` is idempotent and also runs at
    interpreter exit. Use as a context manager, or start and stop from a fixture.
    """

    label: ClassVar[str]
    """Names the server in messages, e.g. ``"the moto server"``."""
    slug: ClassVar[str]
    """Names the private directory (``rotator-<slug>-*``) and the log (``<slug>.log``)."""
    error: ClassVar[type[PermanentError]]
    """What ``start()`` raises."""
    port_taken: ClassVar[str]
    """Text in the log when the port was taken: then ``start()`` tries another one."""
    start_timeout: ClassVar[float] = 30.0
    stop_grace: ClassVar[float] = 5.0
    stop_signals: ClassVar[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGKILL)
    """Sent in turn, ``stop_grace`` seconds apart, until the process exits."""
    secret_line_markers: ClassVar[tuple[str, ...]] = ()
    """Log lines holding any of these are left out of error messages altogether."""

    def __init__(self, port: int | None = None) -> None:
        self._requested_port = port
        self.port: int = port or 0
        self.pid: int | None = None
        self._tmpdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0
        self._lock = threading.Lock()

    # -- what a subclass says -------------------------------------------------------------------

    def _prepare(self) -> None:
        """Work done once per start before the first spawn (find binaries, initdb...)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return clean_env(())

    def _popen_extra(self) -> dict[str, Any]:
        """More ``subprocess.Popen`` arguments (such as ``user``)."""
        return {}

    def _probe(self) -> bool:
        """One attempt: does the server answer, and is it this one?"""
        raise NotImplementedError

    def _secret_values(self) -> list[str]:
        """Values to replace with ``[REDACTED]`` wherever they stand in the log's tail."""
        return []

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        assert self._tmpdir is not None, f"{self.label} is not started"
        return Path(self._tmpdir, f"{self.slug}.log")

    def start(self) -> Self:
        """Start the server and wait until it answers; a running server is left alone."""
        with self._lock:
            if self.running:
                return self
            try:
                self._terminate()  # what a server that died by itself left behind
                self._tmpdir = tempfile.mkdtemp(prefix=f"rotator-{self.slug}-")
                self._prepare()
                self._start_on_a_free_port()
            except BaseException:
                self._terminate()  # a failure, or Ctrl-C while waiting: leave nothing behind
                raise
        with _running_lock:
            _running.add(self)
        log.debug("%s: pid %s listening on %s:%s", type(self).__name__, self.pid, HOST,
                  self.port)
        return self

    def _start_on_a_free_port(self) -> None:
        attempts = 1 if self._requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self._requested_port or free_port()
            try:
                self._spawn()
                self._wait_ready()
                return
            except self.error as exc:
                if self._proc is None:
                    raise  # it never ran: there is no log to show
                tail = self._log_tail()
                self._kill()
                if attempt < attempts and self.port_taken in tail:
                    log.debug("port %d was taken, retrying on another", self.port)
                    continue
                raise self._with_log(exc, tail) from None

    def _spawn(self) -> None:
        assert self._tmpdir is not None
        command = self._command()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed by _kill)
        self._log_start = self._log.seek(0, os.SEEK_END)
        try:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                env=self._env(), cwd=self._tmpdir,
                # Its own session: a Ctrl-C meant for the caller reaches only the caller, which
                # then stops the server cleanly.
                start_new_session=True, **self._popen_extra(),
            )
        except OSError as exc:
            raise self.error(f"could not run {command[0]}: {exc.strerror or exc}") from exc
        self.pid = self._proc.pid

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self.error(f"{self.label} exited with status {code} at start")
            if self._probe():
                return
            if time.monotonic() > deadline:
                raise self.error(f"{self.label} on {HOST}:{self.port} did not answer within "
                                 f"{self.start_timeout:.0f}s")
            time.sleep(0.05)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server by pid, stay down ``downtime`` seconds, start it again on the same
        port with the same files: what clients see of a database or vault restart."""
        with self._lock:
            assert self._tmpdir is not None, f"{self.label} is not started"
            self._kill()
            time.sleep(downtime)
            try:
                self._spawn()
                self._wait_ready()
            except self.error as exc:
                tail = self._log_tail()
                self._kill()
                raise self._with_log(exc, tail) from None

    def _with_log(self, exc: Exception, tail: str) -> Exception:
        """``exc`` again, followed by the end of the server's log (secrets removed)."""
        return self.error(f"{exc}\n--- last lines of {self.label}'s log ---\n{tail}")

    def stop(self) -> None:
        """Stop the server by pid (``stop_signals`` in turn) and remove its files."""
        with self._lock:
            self._terminate()
        with _running_lock:
            _running.discard(self)

    def _kill(self) -> None:
        """Stop the process, keep the private directory (a retry on another port reuses it)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig in self.stop_signals:
                proc.send_signal(sig)  # by pid; nothing is sent once the process is reaped
                try:
                    proc.wait(timeout=self.stop_grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                log.warning("%s (pid %d) did not exit on %s", self.label, proc.pid,
                            ", ".join(sig.name for sig in self.stop_signals))
        if self._log is not None:
            self._log.close()
            self._log = None
        self.pid = None

    def _terminate(self) -> None:
        self._kill()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _log_tail(self) -> str:
        """The end of what this attempt logged, without secret lines and values."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_start)
                text = fh.read().decode(errors="replace")
        except (OSError, AssertionError):
            return "(no log)"
        values = [value for value in self._secret_values() if value]
        lines = []
        for line in text.splitlines():
            if any(marker in line for marker in self.secret_line_markers):
                continue
            for value in values:
                line = line.replace(value, "[REDACTED]")
            lines.append(line)
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
