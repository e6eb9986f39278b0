"""The state store: schema, file permissions, leases, claims and the audit chain's append,
the concurrency-sensitive parts on both SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from rotator.errors import PermanentError
from rotator.state import schema
from rotator.state.models import Base, Rotation
from rotator.state.store import StateStore, lock_owner_id

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path, monkeypatch) -> str:
    """A new, upgraded state store on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        from tests.support import postgres_state_url

        cluster = request.getfixturevalue("postgres_cluster")
        monkeypatch.setenv("PGPASSWORD", cluster.password.reveal())
        url = postgres_state_url(cluster)
    StateStore(url, migrate=True).close()
    return url


def _migrated(path) -> Any:
    """An empty SQLite database brought to head by running every migration through alembic
    (what an existing store goes through, and PostgreSQL always)."""
    from alembic import command

    engine = schema.make_engine(f"sqlite:///{path}")
    cfg = schema.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return engine


def _shape(engine: Any) -> dict[str, Any]:
    """Tables with their columns, indexes and primary keys; the audit head; the stamp."""
    found = inspect(engine)
    with engine.connect() as conn:
        head = conn.execute(text("SELECT one, id, hash, prev_hash FROM audit_head")).all()
        stamp = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    return {"tables": {table: (
        sorted((c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)),
        sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
               for i in found.get_indexes(table)),
        found.get_pk_constraint(table)["constrained_columns"])
        for table in found.get_table_names()}, "head": head, "stamp": stamp}


def test_migrations_create_exactly_the_models(tmp_path):
    engine = _migrated(tmp_path / "state.db")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], "a model changed without a migration"


def test_a_new_sqlite_store_is_created_as_the_migrations_would(tmp_path):
    """A brand-new SQLite store is created at head without alembic (a tenth of a second on
    a user's first command): the same tables, columns, indexes, audit head and stamp."""
    migrated = _migrated(tmp_path / "migrated.db")
    store = StateStore(f"sqlite:///{tmp_path / 'new.db'}")
    assert _shape(store.engine) == _shape(migrated)
    assert schema.current_revision(store.engine) == schema.HEAD
    assert not schema.create_at_head(store.engine), "an existing store is never re-created"
    store.close()
    migrated.dispose()


def test_head_constant_matches_the_migrations():
    assert schema.head_revision() == schema.HEAD


def test_state_file_is_owner_only(tmp_path):
    path = tmp_path / "sub" / "state.db"
    StateStore(f"sqlite:///{path}").close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    store.close()
    with pytest.raises(PermanentError, match="newer rotator"):
        StateStore(url)


def test_lease_is_exclusive_until_it_expires(store_url):
    store = StateStore(store_url)
    ttl = timedelta(seconds=30)
    assert store.try_lock("cred", "host:1:a", ttl, NOW) is None
    assert store.try_lock("cred", "host:1:a", ttl, NOW) is None, "the holder renews"
    assert store.try_lock("cred", "other:2:b", ttl, NOW + timedelta(seconds=10)) == "host:1:a"
    assert store.try_lock("cred", "other:2:b", ttl, NOW + timedelta(seconds=31)) is None
    assert store.renew_locks(["cred"], "host:1:a", ttl, NOW) == {"cred"}, "lost to b"
    store.unlock("cred", "host:1:a")  # not the holder: no effect
    assert store.lock_holder("cred", NOW + timedelta(seconds=32)) == "other:2:b"
    store.unlock("cred", "other:2:b")
    assert store.lock_holder("cred", NOW) is None
    store.close()


def test_lease_of_a_dead_local_process_is_taken_at_once(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead_owner = lock_owner_id("x").replace(f":{os.getpid()}:", f":{child.pid}:")
    ttl = timedelta(minutes=5)
    assert store.try_lock("cred", dead_owner, ttl, NOW) is None
    live_owner = lock_owner_id("y")
    assert store.try_lock("cred", live_owner, ttl, NOW) is None, "dead holder's lease taken"
    assert store.try_lock("cred", lock_owner_id("z").replace(f":{os.getpid()}:", ":1:"), ttl,
                          NOW) == live_owner, "a live holder (pid 1 exists) keeps it"
    store.close()


def test_two_processes_migrating_a_new_file_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    code = f"from rotator.state.store import StateStore; StateStore({url!r}).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]


def test_a_stale_worker_cannot_move_a_rotation_it_lost(tmp_path):
    from rotator.state.models import Rotation
    from rotator.state.store import StaleRotation

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    rotation = Rotation(id="r1", credential="c", agent="a", provider="p", trigger="manual",
                        revoke_mode="grace", status="running", step="create", started_at=NOW)
    row = store.start_rotation(rotation, 1)
    nxt = store.step_transition("r1", row, "succeeded", NOW, None, "verify",
                                expect_step="create", new_key_id="k1")
    assert nxt is not None
    with pytest.raises(StaleRotation):  # a worker that still thinks it is at create
        store.step_transition("r1", row, "succeeded", NOW, None, "verify",
                              expect_step="create", new_key_id="k2")
    assert store.rotation("r1").new_key_id == "k1"
    store.close()


def _due(store: StateStore, n: int) -> list[str]:
    names = [f"agent-{i:02d}/openai" for i in range(n)]
    store.sync_credentials([(name, "a", "p") for name in names], NOW,
                           lambda _row: (NOW - timedelta(minutes=1), "interval"))
    return names


def test_claims_are_disjoint_across_concurrent_replicas(store_url):
    """Four "replicas" (each its own store and connection pool) claim due work at once, five at
    a time: every due credential goes to exactly one of them."""
    setup = StateStore(store_url)
    names = _due(setup, 40)
    setup.close()
    stores = [StateStore(store_url) for _ in range(4)]
    claimed: dict[int, list[str]] = {i: [] for i in range(4)}
    start = threading.Barrier(4)

    def replica(i: int) -> None:
        start.wait()
        while batch := stores[i].claim_due(NOW, names, 5, f"h:{i}:x", TTL):
            claimed[i] += batch

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [name for batch in claimed.values() for name in batch]
    assert sorted(every) == names, "a credential claimed twice, or left out"
    assert stores[0].claim_due(NOW, names, 5, "h:9:x", TTL) == {}, "all leased now"
    again = stores[0].claim_due(NOW + TTL + timedelta(seconds=1), names, 50, "h:9:x", TTL)
    assert list(again) == names, "expired leases can be claimed again"
    assert set(again.values()) == {2}, "a second acquisition has the next epoch"
    for store in stores:
        store.close()


def test_claim_takes_only_due_and_unleased_credentials(store_url):
    store = StateStore(store_url)
    names = _due(store, 3)
    store.update_credential(names[2], next_due_at=NOW + timedelta(hours=1))
    assert store.try_lock(names[0], "other:1:x", TTL, NOW) is None
    assert store.claim_due(NOW, names, 10, "h:1:x", TTL) == {names[1]: 1}
    assert store.live_leases(NOW) == {names[0], names[1]}
    assert store.earliest_due(names, unleased_at=NOW) == NOW + timedelta(hours=1)
    assert store.earliest_due(names) == NOW - timedelta(minutes=1)
    store.close()


def test_a_released_lease_is_not_revived_by_a_late_renewal(store_url):
    """The heartbeat copies the names it renews, then renews them: a lease released in
    between must stay released, or it blocks every other worker for a whole ttl."""
    store = StateStore(store_url)
    assert store.try_lock("cred", "h:1:a", TTL, NOW) is None
    store.unlock("cred", "h:1:a")
    assert store.renew_locks(["cred"], "h:1:a", TTL, NOW) == {"cred"}
    assert store.try_lock("cred", "h:2:b", TTL, NOW) is None
    store.close()


def test_syncs_from_replicas_starting_together(store_url):
    """Replicas starting at once add the same new credentials without tripping on each other."""
    stores = [StateStore(store_url) for _ in range(3)]
    creds = [(f"agent-{i}/openai", "a", "p") for i in range(30)]
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def sync(store: StateStore) -> None:
        start.wait()
        try:
            store.sync_credentials(creds, NOW, lambda _row: (NOW, "new"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(stores[0].credentials()) == 30
    for store in stores:
        store.close()


def test_audit_chain_stays_one_line_under_concurrent_appenders(store_url):
    """Threads of several processes' worth of stores append at once: ids run 1..N with no gap
    and every event chains onto the one before it."""
    from rotator.audit import AuditLog

    stores = [StateStore(store_url) for _ in range(4)]
    start = threading.Barrier(8)

    def append(store: StateStore, t: int) -> None:
        start.wait()
        for i in range(15):
            AuditLog(store).record("manual", actor=f"t{t}", reason=f"événement {i} ✓",
                                   detail={"i": i, "note": 'quotes " and \\ and \u2028'})

    threads = [threading.Thread(target=append, args=(stores[t % 4], t)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    result = AuditLog(stores[0]).verify()
    assert result.ok and result.checked == 120, result.problem
    for store in stores:
        store.close()


def test_hash_parts_rebuild_event_hash():
    """The PostgreSQL append hashes on the server from these parts; they must give exactly
    the hash `audit verify` computes, whatever the text holds."""
    import hashlib

    from rotator.state.audit_hash import event_hash, hash_parts

    row = {"id": 0, "at": NOW, "kind": "step", "credential": 'a/"id":1', "rotation_id": None,
           "actor": "ops\x00id\x00", "reason": "ünïcode ✓ \n", "detail": '{"id":7}',
           "prev_hash": "ab" * 32}
    before, after = hash_parts(row)
    for event_id in (1, 42, 123456):
        expected = event_hash({**row, "id": event_id})
        text_ = row["prev_hash"] + before + str(event_id) + after
        assert hashlib.sha256(text_.encode()).hexdigest() == expected


def test_schema_state_is_reported_with_what_to_run(tmp_path):
    from rotator.state import schema

    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = schema.make_engine(url)
    assert schema.status(engine).state == "empty"
    with pytest.raises(PermanentError, match=r"no rotator schema yet.*rotator db upgrade"):
        schema.require_head(engine, url)
    assert schema.upgrade(engine, url) == (None, schema.HEAD)
    schema.require_head(engine, url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    assert schema.status(engine).state == "behind"
    with pytest.raises(PermanentError, match=re.escape("needs '0006': run `rotator db upgrade`")):
        schema.require_head(engine, url)
    engine.dispose()


def test_every_acquisition_has_a_greater_epoch_and_only_its_owner_holds_it(store_url):
    store = StateStore(store_url)
    ttl = timedelta(seconds=30)
    first = store.take_lock("cred", "h:1:a", ttl, NOW)
    assert first.epoch == 1 and first.holder is None
    assert store.holds_lock("cred", "h:1:a", 1, NOW + timedelta(seconds=29))
    assert store.take_lock("cred", "h:2:b", ttl, NOW).holder == "h:1:a"
    assert store.renew_locks(["cred"], "h:1:a", ttl, NOW + timedelta(seconds=20)) == set()
    assert store.holds_lock("cred", "h:1:a", 1, NOW + timedelta(seconds=49)), "renewed"
    assert store.renew_locks(["cred"], "h:1:a", ttl, NOW + timedelta(seconds=20)) == set()
    taken = store.take_lock("cred", "h:2:b", ttl, NOW + timedelta(seconds=51))
    assert taken.epoch == 2, "a takeover after expiry is a new, greater epoch"
    later = NOW + timedelta(seconds=52)
    assert not store.holds_lock("cred", "h:1:a", 1, later), "the old owner is fenced off"
    assert store.holds_lock("cred", "h:2:b", 2, later)
    store.unlock("cred", "h:2:b")
    assert not store.holds_lock("cred", "h:2:b", 2, later), "released"
    assert store.take_lock("cred", "h:2:b", ttl, later).epoch == 3, "re-taking is new too"
    store.close()


def test_a_rotation_records_the_epochs_it_was_driven_under(store_url):
    store = StateStore(store_url)
    rotation = Rotation(id="r1", credential="c", agent="a", provider="p", trigger="manual",
                        revoke_mode="grace", status="running", step="create", started_at=NOW)
    store.start_rotation(rotation, 4)
    assert store.join_rotation("r1", 7) == [4, 7]
    assert store.join_rotation("r1", 7) == [4, 7], "idempotent"
    legacy = Rotation(id="r0", credential="c", agent="a", provider="p", trigger="manual",
                      revoke_mode="grace", status="running", step="create", started_at=NOW)
    with store._tx() as conn:  # a rotation started by a release without epochs
        conn.execute(Rotation.__table__.insert().values(
            **{c.name: getattr(legacy, c.name) for c in Rotation.__table__.columns}))
    assert store.join_rotation("r0", 9) == [0, 9], "its first owner's keys carry the bare id"
    assert store.rotation_epochs("r0") == [0, 9]
    store.close()
