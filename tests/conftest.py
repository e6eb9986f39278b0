"""Shared fixtures: real servers on free loopback ports, stopped by pid; and the leak scan.

Every secret value the fake providers ever issued is collected; when the session ends, every
file the tests wrote (command output, daemon logs, state databases, audit exports) is searched
for them, and the run fails if any appears.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator.testing.fake_openai import FakeOpenAIServer
from rotator.testing.openbao import OpenBaoDevServer
from tests.support import ISSUED_SECRETS, serve_fake

pytest_plugins = ["tests.fixtures.aws", "tests.fixtures.postgres", "tests.fixtures.stripe",
                  "tests.fixtures.http_fakes", "tests.fixtures.vaults"]


@pytest.fixture(scope="session", autouse=True)
def _log_everything_to_a_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """In-process log records go to a file too, so the leak scan searches them."""
    handler = logging.FileHandler(tmp_path_factory.mktemp("logs") / "in-process.log")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way must not leave a `rotator run` behind."""
    from tests import support

    yield
    while support.STARTED:
        proc = support.STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoDevServer]:
    """One real OpenBao dev server for the whole session (tests use distinct paths)."""
    with OpenBaoDevServer() as server:
        yield server


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """A fresh stateful fake of the OpenAI Admin API per test."""
    yield from serve_fake(FakeOpenAIServer())


HASHES_FILE = "issued-secret-hashes.txt"
_PREFIX = 3
"""Leading characters of each secret kept (hex) to find where to hash: not enough to guess."""


def _session_root(config: pytest.Config) -> Path:
    """The directory every xdist worker's tmp_path lives under (the controller's basetemp)."""
    base = Path(config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    return base.parent if hasattr(config, "workerinput") else base


def _record_issued(config: pytest.Config) -> None:
    """Write length and SHA-256 of each issued secret (never the value) for the leak scan."""
    if not ISSUED_SECRETS:
        return
    with (_session_root(config) / HASHES_FILE).open("a") as fh:
        for secret in ISSUED_SECRETS:
            fh.write(f"{len(secret)} {hashlib.sha256(secret.encode()).hexdigest()} "
                     f"{secret[:_PREFIX].encode().hex()}\n")


def _leaks(root: Path) -> tuple[int, list[str]]:
    hashes_path = root / HASHES_FILE
    if not hashes_path.exists():
        return 0, []
    wanted: dict[int, set[str]] = {}
    prefixes: set[bytes] = set()
    for line in hashes_path.read_text().splitlines():
        length, digest, prefix = line.split()
        wanted.setdefault(int(length), set()).add(digest)
        prefixes.add(bytes.fromhex(prefix))
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.name == HASHES_FILE:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if _contains_secret(data, prefixes, wanted):
            found.append(f"{path}: contains a secret value issued by a test service")
    return sum(len(v) for v in wanted.values()), found


def _contains_secret(data: bytes, prefixes: set[bytes], wanted: dict[int, set[str]]) -> bool:
    """Hash the bytes at every place a known secret's first characters occur."""
    for prefix in prefixes:
        pos = data.find(prefix)
        while pos != -1:
            if any(hashlib.sha256(data[pos:pos + n]).hexdigest() in digests
                   for n, digests in wanted.items()):
                return True
            pos = data.find(prefix, pos + 1)
    return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not hasattr(config, "_tmp_path_factory"):
        return
    _record_issued(config)
    if hasattr(config, "workerinput"):
        return  # the controller scans once every worker is done
    root = _session_root(config)
    searched, leaks = _leaks(root)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"leak scan: {searched} issued secret(s) searched for in every "
                            f"file under {root}: {len(leaks)} leak(s)")
        for leak in leaks:
            reporter.write_line(f"LEAK {leak}", red=True)
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
