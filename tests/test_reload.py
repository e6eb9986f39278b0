"""Reloading the policy file under rotations leaks nothing: each reload builds a new generation
(policies and the plugins built from them), rotations keep the one they started with, and the
old generation's plugins are closed once its last rotation ends."""

from __future__ import annotations

import os
import threading
import time

import pytest

from rotator.config import load_policies
from rotator.scheduling import Daemon
from tests.support import make_fleet, wait_for

RELOADS = 50


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settle(daemon: Daemon) -> None:
    daemon.tick()
    daemon.wait_idle(60)
    time.sleep(0.3)


@pytest.fixture(autouse=True)
def _vault_token(openbao, monkeypatch):
    """A token that expires (as production tokens do), so each vault plugin keeps it alive
    from a timer: what a reload must not multiply."""
    created = openbao.client().auth.token.create(policies=["root"], ttl="1h", renewable=True)
    monkeypatch.setenv("VAULT_TOKEN", created["auth"]["client_token"])


def test_fifty_reloads_under_rotations_leak_no_thread_connection_or_fd(tmp_path, openbao,
                                                                       fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=4, interval="1s", grace="0s",
                       settings={"max_concurrent_rotations": 4})
    daemon = Daemon(fleet.config, load_policies(fleet.config))
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: daemon.metrics_url is not None, timeout=30, what="the daemon to run")
        wait_for(lambda: sum(r.outcome == "success" for r in daemon.store.rotations()) >= 4,
                 timeout=60, what="rotations")
        _settle(daemon)
        threads, fds = threading.active_count(), _fds()
        for i in range(RELOADS):
            assert daemon.reload(), f"reload {i} rejected"
            time.sleep(0.05)  # rotations keep starting and finishing between reloads
        rotated = sum(r.outcome == "success" for r in daemon.store.rotations(limit=10_000))
        _settle(daemon)
        after_threads, after_fds = threading.active_count(), _fds()
    finally:
        daemon.stop("test over")
        runner.join(60)
    assert rotated > 4, "rotations ran during the reloads"
    assert after_threads <= threads + 2, f"threads {threads} -> {after_threads}"
    assert after_fds <= fds + 8, f"file descriptors (sockets included) {fds} -> {after_fds}"
    fleet.assert_settled()


class _CountingRuntime:
    """Stands in for a Runtime: counts ``close`` calls."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_a_retired_generation_closes_when_its_last_rotation_ends():
    from rotator.generation import Generation

    runtime = _CountingRuntime()
    generation = Generation(object(), runtime)  # type: ignore[arg-type]
    generation.enter()
    generation.enter()
    generation.retire()
    generation.leave()
    assert runtime.closed == 0, "closed under a rotation still using it"
    generation.leave()
    assert runtime.closed == 1 and generation.closed
    idle = _CountingRuntime()
    Generation(object(), idle).retire()  # type: ignore[arg-type]
    assert idle.closed == 1, "a generation nothing uses closes at once"


def test_a_rotation_keeps_its_generation_across_a_reload(tmp_path, openbao, fake_openai):
    from rotator.engine import Engine
    from rotator.runtime import Runtime
    from rotator.state.store import StateStore

    fleet = make_fleet(tmp_path, openbao, fake_openai)
    policies = load_policies(fleet.config)
    store = StateStore(policies.settings.state_url)
    first, second = Runtime(policies), Runtime(policies)
    engine = Engine(policies, first, store)
    seen: list[object] = []
    try:
        with engine._pinned():  # what rotate() holds for a rotation's whole run
            engine.use(policies, second)
            seen.append(engine.runtime)
            other = threading.Thread(target=lambda: seen.append(engine.runtime))
            other.start()
            other.join()
        assert seen == [first, second], "this rotation keeps its runtime; new work gets the new"
        assert engine.runtime is second
    finally:
        engine.close()
        second.close()
        store.close()


def test_the_daemon_and_a_command_build_the_same_app(tmp_path, openbao, fake_openai):
    """One wiring for both: the daemon's store, engine, audit trail and notifier are its
    App's, and a command's context is an App's too."""
    from rotator.app import App
    from rotator.service import open_context

    fleet = make_fleet(tmp_path, openbao, fake_openai)
    policies = load_policies(fleet.config)
    daemon = Daemon(fleet.config, policies)
    try:
        assert isinstance(daemon.app, App)
        assert (daemon.store, daemon.engine, daemon.audit, daemon.notifier) == (
            daemon.app.store, daemon.app.engine, daemon.app.audit, daemon.app.notifier)
    finally:
        daemon.stop("test over")
        daemon._shutdown()
    with open_context(policies) as ctx:
        assert ctx.engine.owner.split(":")[2].startswith("cmd-"), "a command's leases say so"
