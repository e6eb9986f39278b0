"""moto in server mode on a free loopback port, for the AWS plugins' tests and the demo.

The AWS provider and vault are tested over real HTTP through the real ``boto3``: the server is
``python -m moto.server`` in a subprocess of its own, stopped by pid (never by name; see
:mod:`rotator.testing.server_process`), so a daemon started by a test reaches the same IAM, STS
and Secrets Manager as the test itself.

:meth:`MotoServer.enable_auth` makes moto check every request's SigV4 signature against the
IAM access keys it holds (``/moto-api/reset-auth``). Without it moto accepts any key pair, so
nothing could tell a wrong secret access key from the right one. Even with it, moto accepts an
*inactive* access key and never checks a key's status: callers that judge whether a key works
must also read its status from IAM.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from dataclasses import dataclass
from typing import Any

from rotator.aws import quiet_sdk_loggers
from rotator.errors import PermanentError
from rotator.testing.server_process import HOST, ServerProcess, clean_env, http_answer

__all__ = ["KeyPair", "MotoServer", "MotoServerError"]

START_TIMEOUT = 30.0
STOP_GRACE = 5.0
REGION = "us-east-1"
ADMIN_USER = "rotator-moto-admin"
_ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})


class MotoServerError(PermanentError):
    """The moto server could not be started or configured; the message says why."""


@dataclass(frozen=True)
class KeyPair:
    """An IAM access key: the admin's from :meth:`MotoServer.enable_auth`, or any other."""

    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return f"KeyPair(access_key_id={self.access_key_id!r}, secret_access_key=***)"


class MotoServer(ServerProcess):
    """``python -m moto.server`` on 127.0.0.1; in memory, every AWS service on one port.

    ``start()`` returns once the server answers; ``stop()`` is idempotent and also runs at
    interpreter exit. Use as a context manager, or start/stop from a session fixture.
    """

    label = "the moto server"
    slug = "moto"
    error = MotoServerError
    port_taken = "in use"
    start_timeout = START_TIMEOUT
    stop_grace = STOP_GRACE

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.admin: KeyPair | None = None
        self._session: Any = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}" if self.port else ""

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        # The server needs no AWS settings of ours; a stray AWS_* variable must not steer it.
        return clean_env(("AWS_",))

    def _probe(self) -> bool:
        # A GET of reset-auth is moto-specific (it answers 400 "Need to POST") and changes nothing.
        answer = http_answer(f"{self.url}/moto-api/reset-auth")
        return answer is not None and (answer[0] < 400 or b"moto" in answer[1].lower())

    def _secret_values(self) -> list[str]:
        return [self.admin.secret_access_key] if self.admin else []

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
