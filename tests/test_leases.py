"""Leases in one process: acquisition against the heartbeat, and the fence's local checks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from rotator.state.leases import LeaseLost, Leases
from rotator.state.store import LockTaken, StateStore

TTL = timedelta(seconds=0.6)  # the heartbeat renews every 0.2 s


class RenewalDuringTake(StateStore):
    """A store whose ``take_lock`` commits only after a heartbeat renewal ran meanwhile: the
    moment at which the old ``acquire`` had already marked the name as held."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.renewed = threading.Event()
        self.renewals: list[set[str]] = []
        self.hold_takes = False

    def take_lock(self, name: str, owner: str, ttl: timedelta, now: datetime) -> LockTaken:
        if self.hold_takes:
            self.renewed.clear()
            assert self.renewed.wait(10), "no heartbeat renewal while the lease was taken"
        return super().take_lock(name, owner, ttl, now)

    def renew_locks(self, names: Sequence[str], owner: str, ttl: timedelta,
                    now: datetime) -> set[str]:
        lost = super().renew_locks(names, owner, ttl, now)
        self.renewals.append(set(names))
        self.renewed.set()
        return lost


def test_a_heartbeat_during_acquire_does_not_call_the_lease_lost(tmp_path, caplog):
    store = RenewalDuringTake(f"sqlite:///{tmp_path / 'state.db'}")
    leases = Leases(store, "host:1:a", TTL, lambda: datetime.now(UTC))
    try:
        assert leases.acquire("other") is None  # a held lease: the heartbeat runs
        store.hold_takes = True
        caplog.set_level(logging.ERROR, logger="rotator.leases")
        assert leases.acquire("cred") is None
        assert any("other" in names for names in store.renewals), "the heartbeat ran"
        assert "cred" not in leases.lost, "a lease being taken was called lost"
        assert leases.usable("cred") and leases.epoch("cred") == 1
        assert not [r for r in caplog.records if "lost the lease" in r.getMessage()]
    finally:
        leases.close()
        store.close()


def test_the_fence_fails_once_the_lease_runs_out_on_either_clock(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    now = [datetime.now(UTC)]
    leases = Leases(store, "host:1:a", timedelta(seconds=30), lambda: now[0])
    try:
        assert leases.acquire("cred") is None
        epoch = leases.epoch("cred")
        assert epoch is not None
        leases.check("cred", epoch)
        leases.confirm("cred", epoch)
        with pytest.raises(LeaseLost, match="epoch"):
            leases.check("cred", epoch + 1)  # a later acquisition's epoch is not ours
        now[0] += timedelta(seconds=29)  # within the TTL, but inside the safety margin
        with pytest.raises(LeaseLost, match="ran out"):
            leases.check("cred", epoch)
    finally:
        leases.close()
        store.close()


def test_the_store_fence_catches_a_takeover_the_local_clock_cannot_see(tmp_path):
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    start = datetime.now(UTC)
    mine = Leases(store, "host:1:a", timedelta(seconds=30), lambda: start)
    theirs = Leases(store, "host:2:b", timedelta(seconds=30),
                    lambda: start + timedelta(seconds=31))  # a replica whose clock is fast
    try:
        assert mine.acquire("cred") is None
        epoch = mine.epoch("cred")
        assert epoch is not None
        assert theirs.acquire("cred") is None
        assert theirs.epoch("cred") == epoch + 1
        mine.check("cred", epoch)  # our clock says the lease is still ours...
        with pytest.raises(LeaseLost, match="no longer shows it held"):
            mine.confirm("cred", epoch)  # ...the store says it is not
        with pytest.raises(LeaseLost):
            mine.check("cred", epoch)  # and from now on neither does the local check
    finally:
        mine.close()
        theirs.close()
        store.close()
