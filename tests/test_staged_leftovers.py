"""`rotator check --online` reports keys staged in the vault that no rotation will promote or
remove (a worker lost its lease mid-step, a clean-up could not reach the vault); a key staged by
a rotation still running is not one of them. No value is ever shown."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from rotator.interfaces import Secret
from rotator.state.models import Rotation
from rotator.state.store import StateStore
from tests.support import make_fleet, remember_issued


def test_check_online_reports_staged_copies_of_rotations_not_running(tmp_path, openbao,
                                                                      fake_openai, make_vault):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
    clean = fleet.cli("check", "--online")
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr

    cred, other = fleet.credentials
    store = StateStore(f"sqlite:///{fleet.state_db}")
    store.start_rotation(Rotation(
        id="r20261205000000-running", credential=other["name"], agent=other["agent"],
        provider=other["provider"], trigger="manual", revoke_mode="grace", status="running",
        step="verify", started_at=datetime.now(UTC)), 1)
    store.close()
    values = [f"sk-proj-staged-{secrets.token_urlsafe(24)}" for _ in range(2)]
    remember_issued(values)
    vault = make_vault()
    vault.stage(cred["path"], cred["field"], Secret(values[0]), "r20261205000000-stale-e2")
    vault.stage(other["path"], other["field"], Secret(values[1]), "r20261205000000-running")

    checked = fleet.cli("check", "--online")
    assert checked.returncode == 0, checked.stderr
    warnings = [line for line in checked.stderr.splitlines() if ": warning: " in line]
    assert len(warnings) == 1, checked.stderr
    assert (f"credentials {cred['name']!r}: vault 'main' still holds a key staged for "
            f"{cred['path']} by rotation r20261205000000-stale-e2, which is not running"
            in warnings[0])
    assert not any(value in checked.stdout + checked.stderr for value in values)

    vault.discard_staged(cred["path"], "r20261205000000-stale-e2")
    assert "warning" not in fleet.cli("check", "--online").stderr
