"""Builds a small fleet on the real OpenBao and the fake OpenAI server, and drives the CLI.

Every command's stdout and stderr go to files under the test's tmp_path, so the end-of-session
leak scan (conftest.py) searches them for secret values along with the state databases.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import tomli_w

from rotator.testing.fake_openai import FakeOpenAIServer
from rotator.testing.openbao import OpenBaoDevServer
from rotator.testing.server_process import free_port as free_port  # re-exported for tests

ROTATOR = [sys.executable, "-m", "rotator.cli"]
ISSUED_SECRETS: set[str] = set()
"""Every secret value a test service issued (fake providers, moto, PostgreSQL passwords); the
end-of-session leak scan (conftest.py) searches every file the tests wrote for them."""
STARTED: list[subprocess.Popen[bytes]] = []
"""Every daemon a test started; conftest kills those still running when the test ends."""


def remember_issued(values: Iterable[str]) -> None:
    """Add secret values a test service issued to the leak scan (call it in fixture teardown)."""
    ISSUED_SECRETS.update(v for v in values if v and len(v) >= 8)


class IssuingFake(Protocol):
    """An in-process fake of a service that issues secrets (``FakeOpenAIServer`` and kin)."""

    def start(self) -> object: ...
    def stop(self) -> None: ...
    def issued_values(self) -> Iterable[str]: ...


FakeT = TypeVar("FakeT", bound=IssuingFake)


def serve_fake(fake: FakeT) -> Iterator[FakeT]:
    """The body of a fake's fixture (``yield from serve_fake(...)``): start it, yield it, then
    hand every value it issued to the leak scan and stop it."""
    fake.start()
    try:
        yield fake
    finally:
        remember_issued(fake.issued_values())
        fake.stop()


class Runner:
    """Runs ``rotator`` commands and daemons for a test, keeping their output on disk.

    Subclasses have ``tmp`` and ``config`` and say which environment the daemon needs.
    """

    tmp: Path
    config: Path
    _runs: int

    def daemon_env(self) -> dict[str, str]:
        return {}

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
        env.update(self.daemon_env())
        env.update(ROTATOR_CONFIG=str(self.config), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def _outputs(self, label: str) -> tuple[Path, Path]:
        self._runs += 1
        base = self.tmp / "out"
        base.mkdir(exist_ok=True)
        stem = base / f"{self._runs:03d}-{label}"
        return stem.with_suffix(".stdout"), stem.with_suffix(".stderr")

    def cli(self, *args: str, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``rotator ARGS`` to completion; output is kept on disk and returned."""
        out, err = self._outputs(args[0] if args else "rotator")
        with out.open("w") as fo, err.open("w") as fe:
            proc = subprocess.run([*ROTATOR, *args], env=self.env(**env), stdout=fo, stderr=fe,
                                  stdin=subprocess.DEVNULL, timeout=timeout, cwd=self.tmp)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                           err.read_text())

    def start_daemon(self, **env: str) -> subprocess.Popen[bytes]:
        out, err = self._outputs("run")
        proc = subprocess.Popen([*ROTATOR, "run"], env=self.env(**env),
                                stdout=out.open("w"), stderr=err.open("w"),
                                stdin=subprocess.DEVNULL, cwd=self.tmp)
        STARTED.append(proc)
        return proc


@dataclass
class Fleet(Runner):
    tmp: Path
    bao: OpenBaoDevServer
    fake: FakeOpenAIServer
    project: str
    prefix: str
    config: Path
    credentials: list[dict[str, Any]] = field(default_factory=list)
    legacy_keys: dict[str, str] = field(default_factory=dict)
    """credential -> key id of the key seeded before rotator ran (adopted)."""
    _runs: int = 0

    @property
    def state_db(self) -> Path:
        return self.tmp / "state.db"

    def daemon_env(self) -> dict[str, str]:
        return {"VAULT_TOKEN": self.bao.root_token}

    def vault_secret(self, cred: dict[str, Any]) -> dict[str, Any]:
        client = self.bao.client()
        data = client.secrets.kv.v2.read_secret_version(path=cred["path"], mount_point="secret",
                                                        raise_on_deleted_version=True)
        return data["data"]["data"]

    def vault_value(self, cred: dict[str, Any]) -> str:
        return self.vault_secret(cred)[cred["field"]]

    def live_keys(self, cred: dict[str, Any]) -> list[dict[str, Any]]:
        return [k for k in self.fake.live_keys(self.project)
                if k["service_account_id"] == cred["service_account_id"]]

    def assert_settled(self) -> None:
        """The invariants after every rotation finished: the vault holds a key the provider
        accepts, it is the only live key of that agent, and other fields were kept."""
        for cred in self.credentials:
            secret = self.vault_secret(cred)
            assert self.fake.is_valid(secret[cred["field"]]), f"{cred['name']}: vault key rejected"
            assert secret.get("OTHER") == "keep-me", f"{cred['name']}: other field lost"
            live = self.live_keys(cred)
            assert len(live) == 1, f"{cred['name']}: live keys {[k['id'] for k in live]}"


def make_fleet(tmp: Path, bao: OpenBaoDevServer, fake: FakeOpenAIServer, n: int = 1, *,
               grace: str = "0s", interval: str = "30d", health: dict[str, Any] | None = None,
               settings: dict[str, Any] | None = None, seed: bool = True,
               extra: Callable[[dict[str, Any]], None] | None = None) -> Fleet:
    """``n`` credentials, each with its own service account and (if ``seed``) a legacy key
    already in the vault, and a policy file at ``tmp/rotation-policies.toml``."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    project = fake.add_project()
    client = bao.client()
    client.secrets.kv.v2.create_or_update_secret(path=f"{prefix}/openai-admin",
                                                 secret={"key": fake.admin_key},
                                                 mount_point="secret")
    fleet = Fleet(tmp=tmp, bao=bao, fake=fake, project=project, prefix=prefix,
                  config=tmp / "rotation-policies.toml")
    creds = []
    for i in range(n):
        account = fake.add_service_account(project, name=f"agent-{i}")
        cred = {
            "name": f"agent-{i}/openai", "agent": f"agent-{i}", "provider": "openai-test",
            "vault": "main", "path": f"{prefix}/agents/agent-{i}", "field": "OPENAI_API_KEY",
            "interval": interval, "grace": grace,
            "params": {"service_account_id": account},
            "health_check": health or {"type": "none"},
        }
        fleet.credentials.append({**cred, "service_account_id": account})
        if seed:
            key_id, value = fake.seed_key(project, account, name="legacy")
            fleet.legacy_keys[cred["name"]] = key_id
            client.secrets.kv.v2.create_or_update_secret(
                path=cred["path"], secret={"OPENAI_API_KEY": value, "OTHER": "keep-me"},
                mount_point="secret")
        else:
            client.secrets.kv.v2.create_or_update_secret(
                path=cred["path"], secret={"OTHER": "keep-me"}, mount_point="secret")
        creds.append(cred)
    doc: dict[str, Any] = {
        "rotator": {"state_url": f"sqlite:///{fleet.state_db}", "jitter": "0s",
                    "poll_interval": "1s", "lock_ttl": "30s", "retry_deadline": "20s",
                    "metrics_address": "127.0.0.1:0", **(settings or {})},
        "vaults": {"main": {"type": "vault", "url": bao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {"openai-test": {
            "type": "openai", "project_id": project, "base_url": fake.base_url,
            "admin_key": {"vault": "main", "path": f"{prefix}/openai-admin", "field": "key"}}},
        "credentials": creds,
    }
    if extra is not None:
        extra(doc)
    fleet.config.write_text(tomli_w.dumps(doc))
    return fleet


def debian_tool(name: str, package: str = "prometheus") -> str:
    """Path of a tool from a Debian package .ci/run installs (prometheus, promtool,
    systemd-analyze): in CI a missing one fails the test; elsewhere it is skipped, saying what
    to install."""
    found = shutil.which(name)
    if found is None and os.environ.get("CI"):
        pytest.fail(f"{name} not found: .ci/run installs Debian's {package} package")
    if found is None:
        pytest.skip(f"{name} not found: apt-get install {package} to run this test")
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition",
             interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("daemon did not stop within 30s of SIGTERM") from None


def postgres_state_url(cluster: Any) -> str:
    """A fresh database on ``cluster`` (a ``PostgresCluster``) for one test's state store, as a
    ``state_url`` without a password: policy files are searched by the leak scan, and operators
    should not put one there either. Give the password to rotator as ``PGPASSWORD`` (libpq
    reads it), e.g. with ``monkeypatch.setenv``; ``Runner.env`` passes it on."""
    from psycopg import sql

    name = f"state_{uuid.uuid4().hex[:12]}"
    with cluster.connect_admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"postgresql+psycopg://{cluster.superuser}@{cluster.host}:{cluster.port}/{name}"


def get_json(url: str, timeout: float = 5) -> tuple[int, Any]:
    """``GET url``: its status and JSON body, whatever the status (503 included)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def pid_namespaces_work() -> bool:
    """Whether ``unshare --pid`` works here (root, or a kernel allowing user namespaces)."""
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_daemon_elsewhere(runner: Runner, **env: str) -> subprocess.Popen[bytes]:
    """``runner.start_daemon()`` in a PID namespace of its own (see ``pid_namespaces_work``):
    to other processes on this machine it then looks like a daemon on another machine, whose
    leases only expiry frees. ``sh`` stays PID 1 there, so the daemon's own SIGKILL (a
    crashpoint) is not ignored as init's would be; a SIGKILL then exits 137."""
    out, err = runner._outputs("run")
    argv = ["unshare", "--pid", "--fork", "sh", "-c", '"$@"', "sh", *ROTATOR, "run"]
    proc = subprocess.Popen(argv, env=runner.env(**env), stdout=out.open("w"),
                            stderr=err.open("w"), stdin=subprocess.DEVNULL, cwd=runner.tmp)
    STARTED.append(proc)
    return proc


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines a daemon wrote to ``path`` (other lines skipped)."""
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def daemon_log_lines(runner_tmp: Path) -> list[dict[str, Any]]:
    """The JSON log lines of every daemon a ``Runner`` started under ``runner_tmp``."""
    return [line for path in sorted((runner_tmp / "out").glob("*-run.stderr"))
            for line in log_lines(path)]


def staged_copies(bao: OpenBaoDevServer, path: str) -> list[str]:
    """Every secret under ``path`` of the KV v2 mount ``secret``, recursively (a staging
    folder: ``rotator/pending/...``)."""
    import hvac.exceptions

    try:
        keys = bao.client().secrets.kv.v2.list_secrets(path=path, mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return []
    found: list[str] = []
    for key in keys["data"]["keys"]:
        found += (staged_copies(bao, f"{path}/{key.rstrip('/')}") if key.endswith("/")
                  else [f"{path}/{key}"])
    return found


def fail_transiently(target: Any, method: str, times: int = 1,
                     message: str = "{name} is not serving right now") -> list[int]:
    """Make ``target.method`` raise ``TransientError`` on its first ``times`` calls, then work.
    It stays a bound method named ``method`` of the plugin, so the engine treats it as the
    plugin's call (fencing, outage log). ``message`` may name the plugin as ``{name}``.
    Returns a one-item list counting the failures."""
    import types

    from rotator.errors import TransientError

    original = getattr(target, method)
    failed = [0]

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failed[0] < times:
            failed[0] += 1
            raise TransientError(message.format(name=repr(self.name)))
        return original(*args, **kwargs)

    flaky.__name__ = method
    setattr(target, method, types.MethodType(flaky, target))
    return failed


# An agent: calls the provider with the key from its environment every 0.1 s and records each
# answer (and which key, by digest) in a JSON-lines file; a signal is recorded too, and SIGTERM
# makes it exit 3.
ENV_AGENT = r'''
import hashlib, json, os, signal, sys, time, urllib.request, urllib.error
log = open(sys.argv[1], "a", buffering=1)
key = os.environ["OPENAI_API_KEY"]
digest = hashlib.sha256(key.encode()).hexdigest()
signal.signal(signal.SIGHUP, lambda *_: log.write(json.dumps({"signal": "HUP"}) + "\n"))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
log.write(json.dumps({"started": digest}) + "\n")
while True:
    request = urllib.request.Request(sys.argv[2] + "/models",
                                     headers={"Authorization": "Bearer " + key})
    try:
        urllib.request.urlopen(request, timeout=5).read()
        ok = True
    except urllib.error.HTTPError as exc:
        ok = exc.code != 401
    log.write(json.dumps({"ok": ok, "key": digest}) + "\n")
    time.sleep(0.1)
'''


@contextmanager
def fleet_engine(fleet: Fleet, **engine_options: Any) -> Iterator[tuple[Any, Any]]:
    """The fleet's policies as an in-process ``(engine, runtime)``, credentials synced; the
    engine, its plugins and its store are closed when the block ends."""
    from rotator.config import load_policies
    from rotator.engine import Engine
    from rotator.runtime import Runtime
    from rotator.state.store import StateStore

    policies = load_policies(fleet.config)
    store = StateStore(policies.settings.state_url)
    runtime = Runtime(policies)
    engine = Engine(policies, runtime, store, **engine_options)
    engine.sync_credentials()
    try:
        yield engine, runtime
    finally:
        engine.close()
        runtime.close()
        store.close()
