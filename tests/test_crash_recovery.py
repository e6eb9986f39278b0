"""kill -9 the daemon right after each step of the protocol, restart it, check the invariants.

The daemon runs in a subprocess with ``ROTATOR_CRASHPOINT`` naming the point where it SIGKILLs
itself: ``effect:STEP`` is after the step's side effects but before the state store records
them, ``after:STEP`` is right after the record, and ``created:create`` is the nastiest: the
provider has made the key and nothing else knows about it yet.
"""

from __future__ import annotations

import re
import signal

import pytest

from rotator.state.store import StateStore
from tests.support import make_fleet, stop_daemon, wait_for

CRASHPOINTS = [
    "after:prepare",
    "created:create",
    "effect:create",
    "after:create",
    "effect:verify",
    "after:verify",
    "effect:store",
    "after:store",
    "effect:health",
    "after:health",
    "effect:grace",
    "after:grace",
    "effect:revoke",
    "after:revoke",
]


def _finished(store: StateStore) -> bool:
    rotations = store.rotations()
    return bool(rotations) and all(r.status in ("succeeded", "failed", "rolled_back")
                                   for r in rotations) and not store.pending_revocations()


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASHPOINTS)
def test_kill_after_step_then_restart_finishes_cleanly(tmp_path, openbao, fake_openai, point):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, grace="0s")
    cred = fleet.credentials[0]
    legacy_value = fleet.vault_value(cred)

    crashed = fleet.start_daemon(ROTATOR_CRASHPOINT=point)
    assert crashed.wait(60) == -signal.SIGKILL, "the daemon should have died at the crashpoint"

    # Whatever state the crash left, the vault still serves a key the provider accepts.
    assert fake_openai.is_valid(fleet.vault_value(cred))

    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: _finished(store), timeout=60, what=f"recovery from {point}")
    finally:
        assert stop_daemon(daemon) == 0
    rotations = store.rotations()
    store.close()
    assert len(rotations) == 1, [(r.id, r.status) for r in rotations]
    rotation = rotations[0]
    assert rotation.status == "succeeded" and rotation.outcome == "success", rotation.error
    fleet.assert_settled()
    new_value = fleet.vault_value(cred)
    assert new_value != legacy_value
    assert not fake_openai.is_valid(legacy_value), "the adopted legacy key must be revoked"
    names = {k["name"] for k in fleet.live_keys(cred)}
    assert len(names) == 1 and re.fullmatch(rf"rotator-{rotation.id}-e[0-9]+", names.pop()), \
        "one live key, named after the rotation and the lease epoch that created it"


@pytest.mark.slow
def test_kill_during_grace_keeps_the_revocation(tmp_path, openbao, fake_openai):
    """The grace period is durable: a daemon killed while waiting still revokes on restart."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, grace="3s")
    cred = fleet.credentials[0]
    legacy_value = fleet.vault_value(cred)
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    wait_for(lambda: store.pending_revocations(), timeout=60, what="grace to start")
    daemon.kill()
    daemon.wait()
    assert fake_openai.is_valid(legacy_value), "the old key stays valid during the grace"
    daemon = fleet.start_daemon()
    try:
        wait_for(lambda: _finished(store), timeout=60, what="revocation after restart")
    finally:
        stop_daemon(daemon)
    store.close()
    assert not fake_openai.is_valid(legacy_value)
    fleet.assert_settled()
