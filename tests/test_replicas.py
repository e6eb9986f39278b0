"""Several `rotator run` replicas on one PostgreSQL state store, the one-daemon rule on SQLite,
and the /healthz and /readyz probes.

Replicas run as real processes against the real OpenBao and the fake OpenAI server; the state
database is a fresh PostgreSQL database per test, reached with ``PGPASSWORD`` (no password in
the policy file, as operators should do it).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotator.probes import ReadinessProbe
from rotator.state.store import COMMAND_TAG, StateStore, lock_owner_id
from rotator.testing.agent import SampleAgent
from rotator.testing.postgres import PostgresCluster
from tests.support import (
    Fleet,
    free_port,
    get_json,
    log_lines,
    make_fleet,
    pid_namespaces_work,
    postgres_state_url,
    remember_issued,
    start_daemon_elsewhere,
    stop_daemon,
    wait_for,
)

FINISHED = ("succeeded", "failed", "rolled_back")


@pytest.fixture
def pg_url(postgres_cluster, monkeypatch) -> str:
    monkeypatch.setenv("PGPASSWORD", postgres_cluster.password.reveal())
    return postgres_state_url(postgres_cluster)


def _creates(fleet: Fleet) -> int:
    return fleet.fake.request_count("POST", "/api_keys")


def _revokes(fleet: Fleet) -> int:
    return fleet.fake.request_count("DELETE", "/api_keys/")


def _successes(store: StateStore, name: str) -> int:
    return sum(1 for r in store.rotations(name, limit=1000) if r.outcome == "success")


def _quiet(store: StateStore) -> bool:
    return (not store.unfinished_rotations() and not store.pending_revocations()
            and not store.rotations_in_grace())


def _wait_quiet(store: StateStore) -> None:
    """Until nothing runs or waits for its revocation for two seconds in a row (a rotation
    claimed an instant before the policy reload may start right after a quiet look)."""
    while True:
        wait_for(lambda: _quiet(store), timeout=60, what="the last rotations to finish")
        seen = len(store.rotations(limit=10_000))
        time.sleep(2)
        if _quiet(store) and len(store.rotations(limit=10_000)) == seen:
            return


def _agents(fleet: Fleet, creds: list[dict], period: float) -> list[SampleAgent]:
    agents = [SampleAgent(vault_url=fleet.bao.url, vault_token=fleet.bao.root_token,
                          path=c["path"], field=c["field"], provider_base_url=fleet.fake.base_url,
                          period=period) for c in creds]
    for agent in agents:
        agent.start()
    return agents


def _held_by(store: StateStore, pid: int) -> list[str]:
    """Ids of the unfinished rotations whose lease process ``pid`` holds."""
    now = datetime.now(UTC)
    return [r.id for r in store.unfinished_rotations()
            if (store.lock_holder(r.credential, now) or "").split(":")[1:2] == [str(pid)]]


def _touched_by(path: Path) -> set[str]:
    """Rotation ids a replica's log says it started, resumed, or revoked an old key of (the
    revoke after a grace finishes a rotation another replica started)."""
    return {m.group(1) for line in log_lines(path)
            if (m := re.search(r"(?:resuming rotation|rotation) (\S+) (?:started|at step|revoked)",
                               line["message"]))}


def _finished_by(path: Path) -> list[str]:
    """Rotation ids a replica's log says it finished with success."""
    return [m.group(1) for line in log_lines(path)
            if (m := re.search(r"rotation (\S+) finished: success", line["message"]))]


@pytest.mark.slow
def test_three_replicas_rotate_each_due_credential_exactly_once(tmp_path, openbao, fake_openai,
                                                                pg_url):
    """50 credentials due at once, then every few seconds: three replicas share the work, no
    rotation runs twice or is lost, and agents never read a key the provider refuses; one
    replica is killed (kill -9) with rotations in flight in the second round and replaced, as
    an orchestrator would: the others finish what it left, and no key it created survives."""
    interval = 3
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=50, interval=f"{interval}s",
                       grace="1s", settings={"state_url": pg_url, "lock_ttl": "10s",
                                             "max_concurrent_rotations": 8})
    assert fleet.cli("db", "upgrade").returncode == 0
    agents = _agents(fleet, fleet.credentials[::10], period=0.05)
    daemons = [fleet.start_daemon() for _ in range(3)]
    store = StateStore(pg_url)
    try:
        wait_for(lambda: all(_successes(store, c["name"]) >= 1 for c in fleet.credentials),
                 timeout=60, what="the first round")
        victim = daemons.pop(0)
        wait_for(lambda: _held_by(store, victim.pid), timeout=30, interval=0.01,
                 what="the victim to hold a rotation in flight")
        victim.kill()
        assert victim.wait(10) == -signal.SIGKILL
        # What it left unfinished: every rotation it started or resumed and did not finish
        # (it kept starting rotations between the look above and the kill).
        victim_log = sorted((tmp_path / "out").glob("*-run.stderr"))[0]
        in_flight = _touched_by(victim_log) - set(_finished_by(victim_log))
        assert in_flight
        daemons.append(fleet.start_daemon())
        wait_for(lambda: all(_successes(store, c["name"]) >= 3 for c in fleet.credentials),
                 timeout=90, what="three rounds of rotations")
        # Stop scheduling (every replica reloads the file), then let the last grace end.
        fleet.config.write_text(fleet.config.read_text().replace(f'"{interval}s"', '"30d"'))
        logs = sorted((tmp_path / "out").glob("*-run.stderr"))[1:]  # not the victim's
        wait_for(lambda: all("policies reloaded" in p.read_text() for p in logs),
                 what="every replica to reload")
        _wait_quiet(store)

    finally:
        codes = [stop_daemon(d) for d in daemons]
        for agent in agents:
            agent.stop()
    assert codes == [0, 0, 0]
    rotations = store.rotations(limit=10_000)
    assert all(r.status == "succeeded" for r in rotations), \
        [(r.credential, r.status, r.error) for r in rotations if r.status != "succeeded"]
    by_credential: dict[str, list] = {}
    for r in rotations:
        by_credential.setdefault(r.credential, []).append(r)
    assert set(by_credential) == {c["name"] for c in fleet.credentials}, "a credential was lost"
    for name, rots in by_credential.items():
        starts = sorted(r.started_at for r in rots)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
        assert len(starts) >= 3 and min(gaps) >= interval, \
            f"{name} rotated twice for one due time: starts {starts}"
    # One key created per rotation; the only extra creates are keys the victim had made but
    # not yet recorded when it died. Every old key and every such extra key was revoked (one
    # live key per credential at the end: assert_settled below); a DELETE can be sent twice
    # when the victim died between sending it and recording it.
    creates = _creates(fleet)
    assert len(rotations) <= creates <= len(rotations) + len(in_flight), \
        (creates, len(rotations), len(in_flight))
    assert _revokes(fleet) >= creates
    # The work was shared: each replica finished some, and together each rotation once. The
    # rotations the victim held were resumed (same ids, no second rotation) by the others.
    logs = sorted((tmp_path / "out").glob("*-run.stderr"))
    finished = [_finished_by(path) for path in logs]
    assert all(finished[:3]), f"a replica did no work: {[len(f) for f in finished]}"
    logged = [rid for ids in finished for rid in ids]
    assert len(logged) == len(set(logged)), "a rotation was finished twice"
    # The victim may die between recording a rotation's end and logging it (kill -9).
    unlogged = {r.id for r in rotations} - set(logged)
    assert unlogged <= in_flight, f"rotations finished without a log line: {unlogged}"
    assert in_flight <= {r.id for r in rotations}, "a rotation the victim left was lost"
    assert [a.rejections for a in agents] == [0] * len(agents), "an agent read a dead key"
    assert sum(a.successes for a in agents) > 100
    assert fleet.cli("audit", "verify").returncode == 0, "the audit chain forked"
    fleet.assert_settled()


@pytest.mark.slow
def test_a_replica_killed_mid_rotation_is_taken_over_after_its_lease(tmp_path, openbao,
                                                                     fake_openai, pg_url):
    """kill -9 of a replica in the middle of its rotations: once its leases expire the other
    replicas resume each rotation from its last step (same rotation ids, no second rotation),
    no created key is left behind, and agents never see a rejected key."""
    ttl = 4
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=12, interval="1h", grace="1s",
                       settings={"state_url": pg_url, "lock_ttl": f"{ttl}s",
                                 "max_concurrent_rotations": 6})
    assert fleet.cli("db", "upgrade").returncode == 0
    fake_openai.set_latency(0.3)
    agents = _agents(fleet, fleet.credentials, period=0.1)
    store = StateStore(pg_url)
    elsewhere = pid_namespaces_work()
    crash = {"ROTATOR_CRASHPOINT": "after:verify"}
    victim = start_daemon_elsewhere(fleet, **crash) if elsewhere else fleet.start_daemon(**crash)
    others: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: store.unfinished_rotations(), what="the victim to start rotating")
        others = [fleet.start_daemon() for _ in range(2)]
        code = victim.wait(60)
        died = time.monotonic()
        assert code in (-signal.SIGKILL, 128 + signal.SIGKILL), "the victim should die at the " \
            "crashpoint"
        # It died at the first rotation to reach the crashpoint: none of its rotations ended.
        victim_log = sorted((tmp_path / "out").glob("*-run.stderr"))[0]
        orphans = {m.group(1) for line in log_lines(victim_log)
                   if (m := re.search(r"rotation (\S+) started", line["message"]))}
        assert orphans, "the victim left no rotation behind"
        if elsewhere:
            # Its leases are still live for a while: nobody touches its rotations.
            steps = {rid: store.rotation(rid).step for rid in orphans}
            time.sleep(ttl / 2)
            if time.monotonic() - died < ttl * 2 / 3:
                assert {rid: store.rotation(rid).step for rid in orphans} == steps, \
                    "a rotation was taken over before its lease expired"
        fake_openai.set_latency(0.05)
        wait_for(lambda: len({r.credential for r in store.rotations(limit=100)
                              if r.outcome == "success"}) == len(fleet.credentials)
                 and _quiet(store), timeout=60, what="every rotation to finish")
    finally:
        codes = [stop_daemon(d) for d in others]
        for agent in agents:
            agent.stop()
    assert codes == [0, 0]
    rotations = store.rotations(limit=100)
    store.close()
    assert sorted(r.credential for r in rotations) == sorted(c["name"] for c in
                                                             fleet.credentials), \
        "a credential rotated twice, or a rotation was lost"
    assert all(r.outcome == "success" for r in rotations)
    assert set(orphans) <= {r.id for r in rotations}, "orphaned rotations resumed, not redone"
    logs = sorted((tmp_path / "out").glob("*-run.stderr"))[1:]
    resumed = {rid for path in logs for line in log_lines(path)
               if (m := re.search(r"resuming rotation (\S+)", line["message"]))
               for rid in [m.group(1)]}
    assert set(orphans) <= resumed, "another replica resumed each orphaned rotation"
    assert [a.rejections for a in agents] == [0] * len(agents), "an agent read a dead key"
    fleet.assert_settled()  # one live key each: nothing the victim created is left over


@pytest.mark.slow
def test_replicas_ride_out_a_state_store_restart(tmp_path, openbao, fake_openai, monkeypatch):
    """PostgreSQL goes away for a few seconds under two busy replicas (a restart, a failover):
    the replicas stay up, and once it is back every rotation they had in flight finishes and
    rotations go on; agents never see a rejected key."""
    cluster = PostgresCluster().start()
    try:
        monkeypatch.setenv("PGPASSWORD", cluster.password.reveal())
        remember_issued([cluster.password.reveal()])
        url = postgres_state_url(cluster)
        fleet = make_fleet(tmp_path, openbao, fake_openai, n=10, interval="2s", grace="1s",
                           settings={"state_url": url, "lock_ttl": "6s",
                                     "max_concurrent_rotations": 4})
        assert fleet.cli("db", "upgrade").returncode == 0
        fake_openai.set_latency(0.1)
        agents = _agents(fleet, fleet.credentials, period=0.1)
        daemons = [fleet.start_daemon() for _ in range(2)]
        store = StateStore(url)
        try:
            wait_for(lambda: all(_successes(store, c["name"]) >= 1 for c in fleet.credentials),
                     timeout=60, what="the first round")
            wait_for(lambda: store.unfinished_rotations(), timeout=20, interval=0.01,
                     what="rotations in flight")
            before = {c["name"]: _successes(store, c["name"]) for c in fleet.credentials}
            cluster.restart(downtime=4)
            assert [d.poll() for d in daemons] == [None, None], "a replica died with the store"
            # A rotation the outage failed waits out its 1-minute retry backoff first.
            wait_for(lambda: all(_successes(store, c["name"]) >= before[c["name"]] + 2
                                 for c in fleet.credentials), timeout=150,
                     what="two more rotations of every credential after the restart")
            fleet.config.write_text(fleet.config.read_text().replace('"2s"', '"30d"'))
            _wait_quiet(store)
            rotations = store.rotations(limit=10_000)
        finally:
            codes = [stop_daemon(d) for d in daemons]
            for agent in agents:
                agent.stop()
            store.close()
        assert codes == [0, 0]
        assert all(r.status == "succeeded" for r in rotations), \
            [(r.credential, r.status, r.error) for r in rotations if r.status != "succeeded"]
        assert [a.rejections for a in agents] == [0] * len(agents), "an agent read a dead key"
        # The outage is reported in a line, once per replica, with the recovery; no traceback.
        lines = [line for path in sorted((tmp_path / "out").glob("*-run.stderr"))
                 for line in log_lines(path)]
        assert not [line["message"] for line in lines if "exception" in line], \
            "a state store outage is not a crash"
        down = [line for line in lines if line["message"].startswith("state store unavailable")]
        back = [line for line in lines if line["message"].startswith("state store reachable")]
        assert 1 <= len(down) <= 2 and len(back) == len(down)
        fleet.assert_settled()
    finally:
        cluster.stop()


def test_status_names_the_replica_holding_each_rotation(tmp_path, openbao, fake_openai):
    """With replicas, `rotator status` says which one (host and pid: the pod's name on
    Kubernetes) holds a credential, and when it is a command such as rotate-now."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=3)
    assert fleet.cli("db", "upgrade").returncode == 0
    store = StateStore(f"sqlite:///{fleet.state_db}")
    now = datetime.now(UTC)
    try:
        for name, tag in (("agent-0/openai", "a1b2"), ("agent-1/openai", f"{COMMAND_TAG}c3")):
            assert store.try_lock(name, lock_owner_id(tag), timedelta(minutes=5), now) is None
        status = fleet.cli("status", "--json")
        table = fleet.cli("status")
    finally:
        store.close()
    assert status.returncode == 0, status.stderr
    on = {row["credential"]: row["rotating_on"] for row in json.loads(status.stdout)}
    me = f"{socket.gethostname()} pid {os.getpid()}"
    assert on == {"agent-0/openai": me, "agent-1/openai": f"a command on {me}",
                  "agent-2/openai": None}
    assert f"pid {os.getpid()}" in table.stdout


@pytest.mark.slow
def test_a_second_daemon_on_sqlite_is_refused(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    first = fleet.start_daemon()
    try:
        log = sorted((tmp_path / "out").glob("*-run.stderr"))[-1]
        wait_for(lambda: "rotator ready" in log.read_text(), what="the first daemon")
        second = fleet.cli("run", timeout=60)
        assert second.returncode == 2
        assert "another `rotator run`" in second.stderr and "PostgreSQL" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None
        # rotate-now still works beside the running daemon.
        now = fleet.cli("rotate-now", "--all", "--yes", "--reason", "beside the daemon")
        assert now.returncode == 0, now.stdout + now.stderr
    finally:
        assert stop_daemon(first) == 0
    again = fleet.start_daemon()  # the lock went with the first daemon
    try:
        log = sorted((tmp_path / "out").glob("*-run.stderr"))[-1]
        wait_for(lambda: "rotator ready" in log.read_text(), what="a new daemon")
    finally:
        assert stop_daemon(again) == 0
    fleet.assert_settled()


@pytest.mark.slow
def test_healthz_and_readyz(tmp_path, openbao, fake_openai):
    """/healthz is 200 while the daemon ticks; /readyz is 503 naming the vault it cannot reach,
    and 200 once the policy file no longer names that vault."""
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"

    def with_dead_vault(doc):
        doc["vaults"]["backup"] = {"type": "vault", "url": dead, "token_env": "VAULT_TOKEN",
                                   "timeout": 1}

    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, extra=with_dead_vault,
                       settings={"metrics_address": f"127.0.0.1:{port}"})
    base = f"http://127.0.0.1:{port}"
    daemon = fleet.start_daemon()
    try:
        status, body = wait_for(lambda: _try_get(f"{base}/readyz"), what="/readyz")
        assert status == 503 and body["status"] == "fail"
        assert body["checks"]["state_store"] == "ok" and body["checks"]["vaults.main"] == "ok"
        assert body["checks"]["vaults.backup"] != "ok" and "backup" in \
            body["checks"]["vaults.backup"]
        assert get_json(f"{base}/healthz") == (200, {"status": "ok",
                                                     "checks": {"scheduler": "ok"}})
        page = _get_text(f"{base}/metrics")
        assert 'rotator_ready{check="vaults.backup"} 0.0' in page
        assert 'rotator_ready{check="vaults.main"} 1.0' in page
        assert 'rotator_ready{check="state_store"} 1.0' in page
        text = fleet.config.read_text()
        fleet.config.write_text(text[:text.index("[vaults.backup]")]
                                + text[text.index("[providers"):])
        wait_for(lambda: get_json(f"{base}/readyz")[0] == 200, what="ready once reloaded")
        page = _get_text(f"{base}/metrics")
        assert "vaults.backup" not in page and 'rotator_ready{check="vaults.main"} 1.0' in page
    finally:
        assert stop_daemon(daemon) == 0
    log = sorted((tmp_path / "out").glob("*-run.stderr"))[-1]
    assert [line["message"] for line in log_lines(log) if "exception" in line] == [], \
        "a dead vault is reported, not a crash; and a scrape never fails"


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _try_get(url: str):
    try:
        return get_json(url)
    except OSError:
        return None


def test_readiness_answers_in_time_when_a_check_hangs():
    release = threading.Event()
    calls = []

    def hangs() -> None:
        calls.append(1)
        release.wait(10)

    def fails() -> None:
        raise RuntimeError("vault sealed")

    probe = ReadinessProbe(lambda: {"store": lambda: None, "slow": hangs, "bad": fails},
                           timeout=0.2, cache=0)
    try:
        started = time.monotonic()
        result = probe()
        assert time.monotonic() - started < 2
        assert not result.ok
        assert result.checks["store"] == "ok" and result.checks["bad"] == "vault sealed"
        assert result.checks["slow"].startswith("no answer after")
        probe()
        assert len(calls) == 1, "a hanging check is not started again while it hangs"
    finally:
        release.set()
        probe.close()


def test_lease_expiry_is_measured_in_ttl(tmp_path):
    """The heartbeat's view: a lease whose renewals stop is unusable before it can expire."""
    from rotator.state.leases import Leases

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    leases = Leases(store, "host:1:a", timedelta(seconds=2), lambda: datetime.now(UTC))
    try:
        assert leases.acquire("cred") is None
        assert leases.usable("cred")
        leases._stop.set()  # renewals stop (as when the store is unreachable)
        wait_for(lambda: not leases.usable("cred"), timeout=3, interval=0.05,
                 what="the lease to become unusable")
        assert store.lock_holder("cred", datetime.now(UTC)) == "host:1:a", \
            "unusable locally before the store lets anyone else take it"
    finally:
        leases.close()
        store.close()


@pytest.mark.slow
def test_a_replica_started_while_postgres_is_down_waits_for_it(
        tmp_path, openbao, fake_openai, monkeypatch):
    """A replica an orchestrator starts during a PostgreSQL restart waits for the database
    (saying so) and then runs, instead of exiting into a restart loop; a wrong database (one
    that does not exist) still fails at once."""
    cluster = PostgresCluster().start()
    try:
        monkeypatch.setenv("PGPASSWORD", cluster.password.reveal())
        remember_issued([cluster.password.reveal()])
        url = postgres_state_url(cluster)
        fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, settings={"state_url": url})
        assert fleet.cli("db", "upgrade").returncode == 0
        down = threading.Thread(target=cluster.restart, kwargs={"downtime": 5})
        down.start()
        time.sleep(1)
        daemon = fleet.start_daemon()
        try:
            err = next((tmp_path / "out").glob("*-run.stderr"))
            wait_for(lambda: "waiting for it" in err.read_text(), timeout=15,
                     what="the replica saying it waits for the store")
            assert daemon.poll() is None, "the replica exited while the database was down"
            down.join()
            wait_for(lambda: "rotator ready" in err.read_text(), timeout=30,
                     what="the replica running once the database is back")
        finally:
            stop_daemon(daemon)
        (tmp_path / "wrong").mkdir()
        wrong = make_fleet(tmp_path / "wrong", openbao, fake_openai, n=1,
                           settings={"state_url": url.rsplit("/", 1)[0] + "/no_such_db"})
        started = time.monotonic()
        result = wrong.cli("run", timeout=60)
        assert result.returncode == 2 and "cannot open the state store" in result.stderr
        assert time.monotonic() - started < 20, "a database that does not exist is not waited for"
    finally:
        cluster.stop()
