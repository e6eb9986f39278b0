"""moto in server mode on a free loopback port, for the AWS plugins' tests and the demo.

The AWS provider and vault are tested over real HTTP through the real ``boto3``: the server is
``python -m moto.server`` in a subprocess of its own, stopped by pid (never by name), so a
daemon started by a test reaches the same IAM, STS and Secrets Manager as the test itself.

:meth:`MotoServer.enable_auth` makes moto check every request's SigV4 signature against the
IAM access keys it holds (``/moto-api/reset-auth``). Without it moto accepts any key pair, so
nothing could tell a wrong secret access key from the right one. Even with it, moto accepts an
*inactive* access key and never checks a key's status: callers that judge whether a key works
must also read its status from IAM.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from rotator.aws import quiet_sdk_loggers
from rotator.errors import PermanentError

__all__ = ["KeyPair", "MotoServer", "MotoServerError"]

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_GRACE = 5.0
REGION = "us-east-1"
ADMIN_USER = "rotator-moto-admin"
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})

_running: set[MotoServer] = set()
_running_lock = threading.Lock()


class MotoServerError(PermanentError):
    """The moto server could not be started or configured; the message says why."""


@dataclass(frozen=True)
class KeyPair:
    """An IAM access key: the admin's from :meth:`MotoServer.enable_auth`, or any other."""

    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return f"KeyPair(access_key_id={self.access_key_id!r}, secret_access_key=***)"


@atexit.register
def _stop_all() -> None:
    """Stop servers a crashed test run forgot, so none outlives the interpreter."""
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; in memory, every AWS service on one port.

    ``start()`` returns once the server answers; ``stop()`` is idempotent and also runs at
    interpreter exit. Use as a context manager, or start/stop from a session fixture.
    """

    def __init__(self, port: int | None = None) -> None:
        self._requested_port = port
        self.port: int = port or 0
        self.url: str = ""
        self.pid: int | None = None
        self.admin: KeyPair | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._session: Any = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> MotoServer:
        """Start the server and wait until it answers; a running server is left alone."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self
            attempts = 1 if self._requested_port else _PORT_ATTEMPTS
            for attempt in range(1, attempts + 1):
                self.port = self._requested_port or _free_port()
                self.url = f"http://127.0.0.1:{self.port}"
                try:
                    self._spawn()
                    self._wait_ready()
                except MotoServerError as exc:
                    tail = self._log_tail()
                    self._terminate()
                    if attempt < attempts and "in use" in tail:
                        continue
                    raise MotoServerError(f"{exc}\n--- last lines of the moto log ---\n{tail}"
                                          ) from None
                except BaseException:
                    self._terminate()
                    raise
                break
            with _running_lock:
                _running.add(self)
            log.debug("moto server pid %s listening on %s", self.pid, self.url)
            return self

    def _spawn(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="rotator-moto-")
        # The server needs no AWS settings of ours; a stray AWS_* variable must not steer it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._log = open(os.path.join(self._tmpdir, "moto.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=self._tmpdir, start_new_session=True,
        )
        self.pid = self._proc.pid

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        # A GET of reset-auth is moto-specific (it answers 400 "Need to POST") and changes nothing.
        probe = f"{self.url}/moto-api/reset-auth"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise MotoServerError(f"the moto server exited with status {code} at start")
            try:
                with urllib.request.urlopen(probe, timeout=1):
                    return
            except urllib.error.HTTPError as exc:
                with exc:
                    if b"moto" in exc.read().lower():
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise MotoServerError(
                    f"the moto server at {self.url} did not answer within {START_TIMEOUT:.0f}s")
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
        if self._tmpdir is None:
            return "(no log)"
        if self._log is not None:
            self._log.flush()
        try:
            text = Path(self._tmpdir, "moto.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:]) or "(empty log)"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MotoServer(url={self.url!r}, pid={self.pid})"

    # -- moto's control API ---------------------------------------------------------------------

    def _post(self, path: str, body: bytes = b"") -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def enable_auth(self) -> KeyPair:
        """Create an IAM user allowed everything, then make moto authenticate every request.

        Returns (and keeps in ``self.admin``) that user's access key: from now on every client
        must sign with it, or with another key moto issued.
        """
        import boto3

        quiet_sdk_loggers()  # botocore logs response bodies, admin secret included, at DEBUG
        self._post("/moto-api/reset-auth", b"inf")
        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION,
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        try:
            iam.create_user(UserName=ADMIN_USER)
            iam.put_user_policy(UserName=ADMIN_USER, PolicyName="everything",
                                PolicyDocument=_ALLOW_ALL)
            key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
        finally:
            iam.close()
        self.admin = KeyPair(key["AccessKeyId"], key["SecretAccessKey"])
        self._post("/moto-api/reset-auth", b"0")
        return self.admin

    def reset(self) -> None:
        """Forget every resource (users, keys, secrets); authentication is switched off."""
        self._post("/moto-api/reset-auth", b"inf")
        self._post("/moto-api/reset")
        self.admin = None

    def model_data(self) -> dict[str, Any]:
        """moto's dump of every model instance it has made (``/moto-api/data.json``)."""
        with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=30) as resp:
            return dict(json.load(resp))

    def issued_secret_keys(self) -> set[str]:
        """Every IAM secret access key this server ever issued, deleted ones included (for the
        test session's leak scan: daemons in subprocesses create keys the tests never see)."""
        keys = self.model_data().get("iam", {}).get("AccessKey", [])
        return {str(k["secret_access_key"]) for k in keys if k.get("secret_access_key")}

    def client(self, service: str, credentials: KeyPair | None = None) -> Any:
        """A boto3 client for ``service`` on this server, signed with the admin key (or
        ``credentials``), without retries so a test sees each answer as moto gave it.

        Safe from any thread (tests probe the vault while a daemon rotates): clients come from
        one boto3 session of this server's, under a lock, since making clients is not
        thread-safe in boto3 while using them is.
        """
        import boto3
        from botocore.config import Config

        quiet_sdk_loggers()
        creds = credentials or self.admin
        if creds is None:
            raise MotoServerError("call enable_auth() first: moto has no admin key yet")
        with self._lock:
            if self._session is None:
                self._session = boto3.session.Session()
            return self._session.client(
                service, endpoint_url=self.url, region_name=REGION,
                aws_access_key_id=creds.access_key_id,
                aws_secret_access_key=creds.secret_access_key,
                config=Config(retries={"max_attempts": 1, "mode": "standard"}))
