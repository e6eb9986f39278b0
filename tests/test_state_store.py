"""The state store: schema, file permissions, leases."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from rotator.errors import PermanentError
from rotator.state import schema
from rotator.state.models import Base
from rotator.state.store import StateStore, lock_owner_id

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_migrations_create_exactly_the_models(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    store.close()
    assert diff == [], "a model changed without a migration"


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


def test_lease_is_exclusive_until_it_expires(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
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
    row = store.start_rotation(rotation)
    nxt = store.step_transition("r1", row, "succeeded", NOW, None, "verify",
                                expect_step="create", new_key_id="k1")
    assert nxt is not None
    with pytest.raises(StaleRotation):  # a worker that still thinks it is at create
        store.step_transition("r1", row, "succeeded", NOW, None, "verify",
                              expect_step="create", new_key_id="k2")
    assert store.rotation("r1").new_key_id == "k1"
    store.close()
