"""The audit trail: a hash chain that `rotator audit verify` checks, exported as JSON lines."""

from __future__ import annotations

import getpass
import json
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomli_w

from rotator.audit import AuditLog
from rotator.config import load_policies
from rotator.state.store import StateStore
from tests.support import Fleet, make_fleet

COLUMNS = ("at", "kind", "credential", "rotation_id", "actor", "reason", "detail", "prev_hash",
           "hash")


@pytest.fixture
def rotated(tmp_path, openbao, fake_openai) -> Fleet:
    """Two credentials rotated once through the CLI: a trail of a dozen or so events."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    result = fleet.cli("rotate-now", "--all", "--reason", "key seen in a CI log", "--yes")
    assert result.returncode == 0, result.stderr
    return fleet


def _copy(fleet: Fleet, name: str) -> tuple[Path, Path]:
    """A copy of the state database and a policy file pointing at it."""
    db = fleet.tmp / f"{name}.db"
    src = sqlite3.connect(fleet.state_db)
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    dst.close()
    import tomllib

    doc = tomllib.loads(fleet.config.read_text())
    doc["rotator"]["state_url"] = f"sqlite:///{db}"
    config = fleet.tmp / f"{name}.toml"
    config.write_text(tomli_w.dumps(doc))
    return db, config


def _rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT id, {', '.join(COLUMNS)} FROM audit_events "
                            "ORDER BY id").fetchall()
    finally:
        conn.close()


def _tamper(db: Path, *statements: tuple[str, tuple]) -> None:
    conn = sqlite3.connect(db)
    with conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


def test_untouched_trail_verifies(rotated):
    result = rotated.cli("audit", "verify")
    assert result.returncode == 0, result.stderr
    count = len(_rows(rotated.state_db))
    assert count >= 2 * (1 + 1)  # per credential: a manual event, steps, a rotation event
    assert result.stdout.strip() == f"audit trail OK: {count} events"
    as_json = json.loads(rotated.cli("audit", "verify", "--json").stdout)
    assert as_json == {"ok": True, "checked": count, "first_bad_id": None, "problem": None}


def test_manual_event_names_the_os_user_and_reason(rotated):
    events = [e for e in map(json.loads, rotated.cli("audit", "export").stdout.splitlines())]
    manual = [e for e in events if e["kind"] == "manual"]
    assert sorted(e["credential"] for e in manual) == ["agent-0/openai", "agent-1/openai"]
    for event in manual:
        assert event["actor"] == getpass.getuser()
        assert event["reason"] == "key seen in a CI log"
        assert event["detail"]["command"] == "rotate-now"
    # The manual events come before anything of the rotations they asked for.
    first_other = min(e["id"] for e in events if e["kind"] != "manual")
    assert max(e["id"] for e in manual) < first_other
    rotations = [e for e in events if e["kind"] == "rotation"]
    assert len(rotations) == 2
    for event in rotations:
        assert event["actor"] == getpass.getuser()
        assert event["detail"]["outcome"] == "success"
        assert event["detail"]["old_key_id"] == rotated.legacy_keys[event["credential"]]
        assert event["detail"]["new_key_id"].startswith("key_")
        assert event["reason"] == "key seen in a CI log"
    steps = {e["detail"]["step"] for e in events if e["kind"] == "step"}
    assert {"create", "verify", "store"} <= steps


def test_an_edited_row_is_named(rotated):
    db, config = _copy(rotated, "edited")
    _tamper(db, ("UPDATE audit_events SET detail = ? WHERE id = 3", ('{"step":"nothing"}',)))
    result = rotated.cli("audit", "verify", "-c", str(config))
    assert result.returncode == 1
    assert "event 3" in result.stdout and "edited" in result.stdout


def test_an_edited_row_with_its_hash_recomputed_breaks_the_next_link(rotated):
    from rotator.audit import event_hash

    db, config = _copy(rotated, "rehashed")
    row = dict(zip(("id", *COLUMNS), _rows(db)[2], strict=True))
    row["actor"] = "someone-else"
    row["at"] = datetime.fromisoformat(row["at"]).replace(tzinfo=UTC)
    _tamper(db, ("UPDATE audit_events SET actor = ?, hash = ? WHERE id = 3",
                 (row["actor"], event_hash(row))))
    result = rotated.cli("audit", "verify", "-c", str(config))
    assert result.returncode == 1
    assert "event 4" in result.stdout and "prev_hash" in result.stdout


def test_a_deleted_row_is_named(rotated):
    db, config = _copy(rotated, "deleted")
    _tamper(db, ("DELETE FROM audit_events WHERE id = 3", ()))
    result = rotated.cli("audit", "verify", "-c", str(config))
    assert result.returncode == 1
    assert "event 4" in result.stdout and "event 3 missing" in result.stdout

    db, config = _copy(rotated, "deleted-first")
    _tamper(db, ("DELETE FROM audit_events WHERE id = 1", ()))
    result = rotated.cli("audit", "verify", "-c", str(config))
    assert result.returncode == 1 and "event 2" in result.stdout


def test_swapped_rows_are_named(rotated):
    db, config = _copy(rotated, "swapped")
    rows = {r[0]: r[1:] for r in _rows(db)}
    sets = ", ".join(f"{c} = ?" for c in COLUMNS)
    _tamper(db, (f"UPDATE audit_events SET {sets} WHERE id = 2", rows[5]),
            (f"UPDATE audit_events SET {sets} WHERE id = 5", rows[2]))
    result = rotated.cli("audit", "verify", "-c", str(config))
    assert result.returncode == 1
    assert "event 2" in result.stdout and "reordered" in result.stdout


def test_export_round_trips(rotated):
    out = rotated.tmp / "audit.jsonl"
    result = rotated.cli("audit", "export", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    rows = _rows(rotated.state_db)
    assert len(exported) == len(rows)
    for event, row in zip(exported, rows, strict=True):
        db = dict(zip(("id", *COLUMNS), row, strict=True))
        assert event["at"].endswith("Z")
        assert datetime.fromisoformat(event["at"]) == \
            datetime.fromisoformat(db["at"]).replace(tzinfo=UTC)
        assert event["detail"] == json.loads(db["detail"])
        for key in ("id", "kind", "credential", "rotation_id", "actor", "reason", "prev_hash",
                    "hash"):
            assert event[key] == db[key], key
    # stdout by default, and the filters
    assert rotated.cli("audit", "export").stdout == out.read_text()
    only = [json.loads(x) for x in
            rotated.cli("audit", "export", "--credential", "agent-1/openai").stdout.splitlines()]
    assert only and {e["credential"] for e in only} == {"agent-1/openai"}
    assert rotated.cli("audit", "export", "--since", "2999-01-01T00:00:00Z").stdout == ""
    assert len(rotated.cli("audit", "export", "--since", "1h").stdout.splitlines()) == len(rows)
    bad = rotated.cli("audit", "export", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_concurrent_writers_form_one_chain(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    log = AuditLog(store)

    def write(n: int) -> None:
        for i in range(25):
            log.record("manual", credential=f"c{n}", actor="test", detail={"i": i})

    code = ("from rotator.audit import AuditLog; from rotator.state.store import StateStore\n"
            f"log = AuditLog(StateStore({url!r}))\n"
            "for i in range(25): log.record('reload', actor='proc', detail={'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(60) for p in procs] == [0, 0]
    result = log.verify()
    store.close()
    assert result.ok, result
    assert result.checked == 6 * 25


def test_daemon_records_rotations_and_reloads(tmp_path, openbao, fake_openai, monkeypatch):
    from rotator.scheduling import Daemon

    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    daemon = Daemon(fleet.config, load_policies(fleet.config))
    try:
        daemon.engine.sync_credentials()
        daemon.tick()
        daemon.wait_idle(60)
        good = fleet.config.read_text()
        fleet.config.write_text(good + "\n[rotator.nonsense\n")
        assert daemon.reload() is False
        fleet.config.write_text(good)
        assert daemon.reload() is True
        daemon.wait_idle(60)
        events = list(daemon.audit.export())
        assert daemon.audit.verify().ok
    finally:
        daemon.stop("test over")
        daemon._shutdown()
    rotations = [e for e in events if e["kind"] == "rotation"]
    assert len(rotations) == 1 and rotations[0]["actor"] == "daemon"
    assert rotations[0]["detail"]["trigger"] == "schedule"
    reloads = [e["detail"]["outcome"] for e in events if e["kind"] == "reload"]
    assert reloads == ["rejected", "applied"]
    assert all(e["actor"] == "daemon" for e in events)


@pytest.mark.slow
def test_a_step_and_its_audit_event_commit_together(tmp_path, openbao, fake_openai):
    """kill -9 right after the create step is recorded: its audit event is there too (it
    commits in the step's own transaction), once, and the trail still verifies."""
    import signal

    from tests.support import stop_daemon, wait_for

    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    crashed = fleet.start_daemon(ROTATOR_CRASHPOINT="after:create")
    assert crashed.wait(60) == -signal.SIGKILL
    store = StateStore(f"sqlite:///{fleet.state_db}")
    audit = AuditLog(store)

    def steps(name: str) -> list[dict]:
        return [e for e in audit.export() if e["kind"] == "step"
                and e["detail"]["step"] == name and e["detail"]["status"] == "succeeded"]

    created = steps("create")
    assert len(created) == 1 and created[0]["detail"]["new_key_id"], created
    daemon = fleet.start_daemon()
    try:
        wait_for(lambda: steps("revoke"), what="the rotation to finish")
    finally:
        stop_daemon(daemon)
    assert len(steps("create")) == 1
    assert audit.verify().ok
    store.close()
