"""DriverSQL: the hot statements on the driver's cursor behave like SQLAlchemy's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from rotator.state.driver_sql import DriverSQL, _pyformat, from_db_time
from rotator.state.store import StateStore


def test_errors_are_sqlalchemys_and_times_round_trip(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    driver = DriverSQL("sqlite")
    when = datetime(2026, 12, 5, 18, 0, 0, 123456, tzinfo=UTC)
    with store.engine.begin() as conn:
        driver.write(conn, "INSERT INTO locks (name, owner, acquired_at, expires_at, epoch) "
                     "VALUES (:n, :o, :t, :t, 1)", {"n": "x", "o": "me", "t": when})
        with pytest.raises(IntegrityError):
            driver.write(conn, "INSERT INTO locks (name, owner, acquired_at, expires_at, epoch) "
                         "VALUES (:n, :o, :t, :t, 1)", {"n": "x", "o": "me", "t": when})
    with store.engine.connect() as conn:
        with pytest.raises(OperationalError):
            driver.rows(conn, "SELECT nothing FROM nowhere")
        stored = driver.one(conn, "SELECT expires_at FROM locks WHERE name = :n", {"n": "x"})
        assert from_db_time(stored) == when
        # The store's own (SQLAlchemy) reading of the same row agrees.
        assert driver.one(conn, "SELECT 1 FROM locks WHERE expires_at >= :t",
                          {"t": when - timedelta(microseconds=1)}) == 1
    assert store.lock_holder("x", when - timedelta(seconds=1)) == "me"
    with pytest.raises(ValueError, match="naive"):
        driver.bind(datetime(2026, 1, 1))
    store.close()


def test_postgres_parameters_keep_casts_and_percent_signs():
    assert _pyformat("SELECT :a::text, '5%' WHERE x = :b") == \
        "SELECT %(a)s::text, '5%%' WHERE x = %(b)s"
