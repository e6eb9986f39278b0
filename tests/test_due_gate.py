"""The due gate end to end: every reason code it can give shows, the same, in ``status
--json``, ``plan --json`` and ``/metrics``; and the scheduler obeys it.

Each credential of one fleet is put, by real rotations where one is quick to make (a crash
for ``rotating``, a grace period for ``in_grace``, a failing scheduled rotation for
``retry_backoff``) and by moving its last rotation back in time otherwise, into one state.
"""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from rotator import policy
from rotator.state.store import StateStore
from tests.support import free_port, make_fleet, stop_daemon, wait_for

# credential index -> the reason the gate must give for it
EXPECTED = {
    0: "never_rotated", 1: "not_due", 2: "manual_only", 3: "outside_window",
    4: "schedule_reached", 5: "interval_elapsed", 6: "in_grace", 7: "rotating",
}


def _closed_window() -> str:
    """A one-minute daily window twelve hours from now: closed for the whole test."""
    hour = (datetime.now(UTC).hour + 12) % 24
    return f"daily {hour:02d}:00-{hour:02d}:01 UTC"


def _shape(doc: dict[str, Any]) -> None:
    creds = doc["credentials"]
    del creds[2]["interval"]
    creds[2]["manual_only"] = True
    creds[3]["window"] = _closed_window()
    del creds[4]["interval"]
    creds[4]["schedule"] = "0 3 * * *"
    creds[6]["grace"] = "1h"


def _name(i: int) -> str:
    return f"agent-{i}/openai"


def _metric_reasons(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        m = re.match(r'rotator_credential_due_reason\{.*credential="([^"]+)".*'
                     r'reason="([a-z_]+)"\} 1$', line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


@pytest.mark.slow
def test_every_reason_shows_in_status_plan_and_metrics(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=8, extra=_shape)
    for i in (1, 4, 5, 6):
        done = fleet.cli("rotate-now", _name(i), "--yes")
        assert done.returncode == 0, done.stderr
    # A command killed after its create: the rotation stays unfinished under its lease.
    crashed = fleet.cli("rotate-now", _name(7), "--yes", ROTATOR_CRASHPOINT="after:create")
    assert crashed.returncode != 0
    # Time passing: the last rotations of 4 (daily cron), 5 and 6 (30d) were long ago; 6's
    # old key is still in its grace, which holds the next rotation back.
    store = StateStore(f"sqlite:///{fleet.state_db}")
    now = datetime.now(UTC)
    store.update_credential(_name(4), last_rotated_at=now - timedelta(days=3))
    for i in (5, 6):
        store.update_credential(_name(i), last_rotated_at=now - timedelta(days=31))

    status = json.loads(fleet.cli("status", "--json").stdout)
    assert {r["credential"]: r["due_reason"] for r in status} == \
        {_name(i): reason for i, reason in EXPECTED.items()}
    by_name = {r["credential"]: r for r in status}
    assert by_name[_name(2)]["next_due_at"] is None
    assert "window" in by_name[_name(3)]["due_message"]
    assert by_name[_name(6)]["next_due_at"] > now.isoformat()[:19]
    assert "grace" in by_name[_name(6)]["due_message"]

    plan_all = json.loads(fleet.cli("plan", "--all", "--json").stdout)
    assert {r["credential"]: r["reason"] for r in plan_all} == \
        {_name(i): reason for i, reason in EXPECTED.items()}
    assert plan_all[-1]["credential"] == _name(2), "never-due credentials are listed last"
    due_now = {r["credential"] for r in plan_all if r["due_now"]}
    assert due_now == {_name(0), _name(4), _name(5)}
    # Without --all: what rotates within a day (no manual-only, not the one due in 30 days).
    plan_day = json.loads(fleet.cli("plan", "--within", "1d", "--json").stdout)
    assert {r["credential"] for r in plan_day} == \
        {_name(i) for i in (0, 3, 4, 5, 6, 7)}
    human = fleet.cli("plan", "--all")
    assert human.returncode == 0 and "in_grace" in human.stdout

    # /metrics of a daemon asks the same gate. Its first tick rotates what is due (0, 4, 5)
    # and resumes 7 once the crashed command's lease ends; the others keep their reason.
    port = free_port()
    text = fleet.config.read_text().replace('metrics_address = "127.0.0.1:0"',
                                            f'metrics_address = "127.0.0.1:{port}"')
    fleet.config.write_text(text)
    daemon = fleet.start_daemon()
    try:
        def scrape() -> dict[str, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return _metric_reasons(r.read().decode())
            except OSError:  # not serving yet
                return {}

        reasons = wait_for(lambda: (m := scrape()) and len(m) == 8 and m, what="metrics")
        for i in (1, 2, 3, 6):
            assert reasons[_name(i)] == EXPECTED[i], reasons
        # The scheduler obeyed the gate: what was due got rotated, the rest did not.
        wait_for(lambda: all(scrape()[_name(i)] == "not_due" for i in (0, 4, 5)),
                 what="the due credentials to rotate")
        after = scrape()
        for i in (1, 2, 3, 6):
            assert after[_name(i)] == EXPECTED[i], after
    finally:
        assert stop_daemon(daemon) == 0
    assert set(reasons.values()) <= set(policy.REASONS)
    assert len(store.rotations(_name(6))) == 1, "a rotation started while the old key was live"
    store.close()


@pytest.mark.slow
def test_a_failed_scheduled_rotation_shows_retry_backoff(tmp_path, openbao, fake_openai):
    def broken(doc: dict[str, Any]) -> None:
        doc["credentials"][0]["params"]["service_account_id"] = "svc_acct_gone"

    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, extra=broken,
                       settings={"retry_deadline": "1s"})
    store = StateStore(f"sqlite:///{fleet.state_db}")
    daemon = fleet.start_daemon()
    try:
        wait_for(lambda: (s := store.credential(_name(0))) is not None and s.failures >= 1,
                 what="the scheduled rotation to fail")
    finally:
        assert stop_daemon(daemon) == 0
    status = json.loads(fleet.cli("status", "--json").stdout)
    assert status[0]["due_reason"] == "retry_backoff", status
    assert "failed" in status[0]["due_message"]
    plan = json.loads(fleet.cli("plan", "--within", "1d", "--json").stdout)
    assert [(r["credential"], r["reason"], r["due_now"]) for r in plan] == \
        [(_name(0), "retry_backoff", False)]
    assert status[0]["next_due_at"] == plan[0]["due_at"]
    store.close()
