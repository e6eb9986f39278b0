"""Schema upgrades on SQLite and PostgreSQL: from the previous releases' levels to head with every
row kept, `rotator db upgrade` and `rotator db current`, and what `rotator run` says about a
schema it will not run on."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import Engine, text

from rotator.audit import AuditLog, event_hash
from rotator.errors import PermanentError
from rotator.state import schema
from rotator.state.store import StateStore
from tests.support import make_fleet, postgres_state_url

T0 = datetime(2026, 11, 1, 12, 0)  # naive UTC, as the store keeps it


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path, monkeypatch) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    cluster = request.getfixturevalue("postgres_cluster")
    monkeypatch.setenv("PGPASSWORD", cluster.password.reveal())
    return postgres_state_url(cluster)


def _at_revision(url: str, revision: str) -> Engine:
    """A database as the release whose newest migration is ``revision`` left it."""
    engine = schema.make_engine(url)
    cfg = schema.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return engine


def _seed_0001(engine: Engine) -> None:
    """A rotated credential, a rotation stopped half-way, its steps, a pending revocation and a
    lease: what a crash of the 0001 release leaves behind."""
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO credentials VALUES ('agent-0/openai', 'agent-0', 'openai-test', :t, :t,"
            " 'r1', 'success', NULL, 'key_1', :t, 'interval', 0)"), {"t": T0})
        for rid, status, step in (("r1", "succeeded", "done"), ("r2", "running", "verify")):
            conn.execute(text(
                "INSERT INTO rotations (id, credential, agent, provider, trigger, revoke_mode,"
                " status, step, old_key_id, new_key_id, started_at) VALUES (:id, "
                "'agent-0/openai', 'agent-0', 'openai-test', 'schedule', 'grace', :status, "
                ":step, 'key_0', 'key_1', :t)"), {"id": rid, "status": status, "step": step,
                                                   "t": T0})
            conn.execute(text(
                "INSERT INTO rotation_steps (rotation_id, step, status, started_at) VALUES "
                "(:id, 'create', 'succeeded', :t)"), {"id": rid, "t": T0})
        conn.execute(text(
            "INSERT INTO revocations (rotation_id, credential, key_id, not_before, status, "
            "attempts) VALUES ('r1', 'agent-0/openai', 'key_0', :t, 'pending', 0)"), {"t": T0})
        conn.execute(text("INSERT INTO locks VALUES ('agent-0/openai', 'h:1:x', :t, :t)"),
                     {"t": T0})


def _seed_0002_audit(engine: Engine, n: int = 3) -> None:
    with engine.begin() as conn:
        prev = ""
        for i in range(1, n + 1):
            row = {"id": i, "at": datetime(2026, 11, 1, 12, i, tzinfo=UTC), "kind": "manual",
                   "credential": "agent-0/openai", "rotation_id": None, "actor": "ops",
                   "reason": "before the upgrade ✓", "detail": "{}", "prev_hash": prev}
            row["hash"] = prev = event_hash(row)
            conn.execute(text(
                "INSERT INTO audit_events VALUES (:id, :at, :kind, :credential, :rotation_id, "
                ":actor, :reason, :detail, :prev_hash, :hash)"),
                {**row, "at": row["at"].replace(tzinfo=None)})


def _assert_0001_rows_kept(store: StateStore) -> None:
    state = store.credential("agent-0/openai")
    assert (state.current_key_id, state.last_rotation_id) == ("key_1", "r1")
    assert state.next_due_at == T0.replace(tzinfo=UTC)
    assert [r.id for r in store.unfinished_rotations()] == ["r2"]
    assert store.rotation("r2").step == "verify"
    assert [s.step for s in store.steps("r2")] == ["create"]
    assert [r.key_id for r in store.pending_revocations()] == ["key_0"]
    assert store.lock_holder("agent-0/openai", T0.replace(tzinfo=UTC)) == "h:1:x"


@pytest.mark.parametrize("previous", ["0001", "0002"])
def test_upgrade_from_a_previous_release_keeps_every_row(state_url, previous):
    engine = _at_revision(state_url, previous)
    _seed_0001(engine)
    if previous == "0002":
        _seed_0002_audit(engine)
    assert schema.status(engine).state == "behind"
    assert schema.upgrade(engine, state_url) == (previous, schema.HEAD)
    assert schema.upgrade(engine, state_url) == (schema.HEAD, schema.HEAD), "idempotent"
    engine.dispose()

    store = StateStore(state_url, migrate=False)
    try:
        _assert_0001_rows_kept(store)
        audit = AuditLog(store)
        new_id = audit.record("manual", actor="ops", reason="after the upgrade",
                              detail={"note": "the chain goes on"})
        assert new_id == (4 if previous == "0002" else 1)
        result = audit.verify()
        assert result.ok and result.checked == new_id, result.problem
    finally:
        store.close()


def test_sqlite_upgrades_itself_and_postgresql_says_what_to_run(state_url):
    _seed_0001(_at_revision(state_url, "0001"))
    if state_url.startswith("sqlite"):
        store = StateStore(state_url)  # the zero-set-up default: upgraded on open
        try:
            assert store.schema_status().state == "current"
            _assert_0001_rows_kept(store)
        finally:
            store.close()
    else:
        with pytest.raises(PermanentError, match=r"0001.*run `rotator db upgrade`"):
            StateStore(state_url)


def test_db_commands_and_run_on_an_old_schema(tmp_path, openbao, fake_openai, state_url):
    """`db current` says an upgrade is needed (exit 1); `run` refuses PostgreSQL (exit 2,
    naming the command) and upgrades SQLite itself; `db upgrade` brings it to head."""
    _at_revision(state_url, "0001").dispose()
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, settings={"state_url": state_url})
    current = fleet.cli("db", "current", "--json")
    assert current.returncode == 1, current.stderr
    assert json.loads(current.stdout) == {
        "state_url": state_url, "revision": "0001", "head": schema.HEAD, "status": "behind"}
    if not state_url.startswith("sqlite"):
        run = fleet.cli("run", timeout=60)
        assert run.returncode == 2
        assert "schema revision '0001'" in run.stderr and "`rotator db upgrade`" in run.stderr
        assert "Traceback" not in run.stderr
    upgrade = fleet.cli("db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"upgraded from 0001 to {schema.HEAD}" in upgrade.stdout
    assert "already at" in fleet.cli("db", "upgrade").stdout
    assert fleet.cli("db", "current").returncode == 0


def test_a_newer_schema_is_refused_and_left_alone(tmp_path, openbao, fake_openai, state_url):
    engine = _at_revision(state_url, "head")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, settings={"state_url": state_url})
    for args in (("run",), ("db", "upgrade"), ("rotate-now", "--all", "--yes")):
        result = fleet.cli(*args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert "newer rotator" in result.stderr and "upgrade rotator" in result.stderr
    current = fleet.cli("db", "current", "--json")
    assert current.returncode == 2 and json.loads(current.stdout)["status"] == "newer"
    assert schema.current_revision(engine) == "9999"
    engine.dispose()


def test_postgresql_without_a_schema_is_refused_until_db_upgrade(tmp_path, openbao,
                                                                 fake_openai, postgres_cluster,
                                                                 monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres_cluster.password.reveal())
    url = postgres_state_url(postgres_cluster)
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, settings={"state_url": url})
    run = fleet.cli("run", timeout=60)
    assert run.returncode == 2 and "no rotator schema yet" in run.stderr
    assert "`rotator db upgrade`" in run.stderr
    # Several upgrades at once (an init container per replica): one migrates, the others wait.
    procs = [subprocess.Popen([sys.executable, "-m", "rotator.cli", "db", "upgrade"],
                              env=fleet.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=tmp_path) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outputs]
    assert sum(b"upgraded from nothing" in out for out, _ in outputs) == 1
    assert fleet.cli("db", "current").returncode == 0


def test_an_unreachable_store_is_one_line_and_never_shows_a_password(tmp_path, openbao,
                                                                     fake_openai):
    """The policy file refuses a password in state_url (without echoing it); a store that
    cannot be reached is one line naming it; and a URL given in process with a password is
    shown with the password hidden."""
    secret = "pw-that-must-not-show-1234"
    url = "postgresql+psycopg://rotator@127.0.0.1:1/rotator"
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1,
                       settings={"state_url": url, "store_wait_at_start": "3s"})
    for args in (("run",), ("db", "upgrade"), ("db", "current"), ("status",)):
        result = fleet.cli(*args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert f"cannot open the state store {url}" in result.stderr
        assert "Traceback" not in result.stderr
        if args == ("run",):  # away, not wrong: the daemon waited for it first
            assert "waiting for it" in result.stderr
    fleet.config.write_text(fleet.config.read_text().replace("rotator@", f"rotator:{secret}@"))
    refused = fleet.cli("db", "upgrade")
    assert refused.returncode == 2 and "a password never goes in the policy file" \
        in refused.stderr and "PGPASSWORD" in refused.stderr
    assert secret not in refused.stdout + refused.stderr
    with pytest.raises(PermanentError) as caught:
        StateStore(url.replace("rotator@", f"rotator:{secret}@"))
    assert "postgresql+psycopg://rotator:***@127.0.0.1:1/rotator" in str(caught.value)
    assert secret not in str(caught.value)
