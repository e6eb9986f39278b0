"""`rotator run` as operators run it: a subprocess, signals, reloads, and agents probing it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rotator.state.store import StateStore
from rotator.testing.agent import SampleAgent
from tests.support import debian_tool, free_port, make_fleet, stop_daemon, wait_for


def _wait_quiet(store: StateStore) -> None:
    """Wait until no rotation runs or waits for its revocation, and none started for a few
    seconds (one may have started just before a reload took effect)."""
    while True:
        wait_for(lambda: not store.unfinished_rotations() and not store.pending_revocations()
                 and not store.rotations_in_grace(), timeout=60, what="quiet")
        seen = len(store.rotations(limit=10_000))
        time.sleep(3)
        if len(store.rotations(limit=10_000)) == seen and not store.unfinished_rotations():
            return


def _successes(store: StateStore, name: str) -> int:
    return sum(1 for r in store.rotations(name, limit=1000) if r.outcome == "success")


@pytest.mark.slow
def test_agents_never_see_a_rejected_key_during_many_rotations(tmp_path, openbao, fake_openai):
    """The no-outage invariant, probed: each agent reads the vault and calls the provider in a
    loop while the daemon rotates every credential every few seconds."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=6, interval="2s", grace="1s",
                       settings={"max_concurrent_rotations": 3})
    agents = [SampleAgent(vault_url=openbao.url, vault_token=openbao.root_token,
                          path=c["path"], field=c["field"], provider_base_url=fake_openai.base_url,
                          period=0.02) for c in fleet.credentials]
    for agent in agents:
        agent.start()
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: all(_successes(store, c["name"]) >= 4 for c in fleet.credentials),
                 timeout=120, what="four rotations of every credential")
        # Stop scheduling by reloading a policy with a long interval, then let grace end.
        fleet.config.write_text(fleet.config.read_text().replace('"2s"', '"30d"'))
        _wait_quiet(store)
    finally:
        code = stop_daemon(daemon)
        for agent in agents:
            agent.stop()
    assert code == 0
    total = sum(_successes(store, c["name"]) for c in fleet.credentials)
    store.close()
    assert total >= 24
    assert sum(a.successes for a in agents) > 100
    assert [a.rejections for a in agents] == [0] * len(agents), "an agent read a dead key"
    fleet.assert_settled()


@pytest.mark.slow
def test_reload_with_invalid_file_keeps_running_policies(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: _successes(store, "agent-0/openai") == 1, what="first rotation")
        good = fleet.config.read_text()
        fleet.config.write_text(good.replace('interval = "30d"', 'interval = "30x"'))
        daemon.send_signal(signal.SIGHUP)
        errlog = sorted((tmp_path / "out").glob("*-run.stderr"))[-1]
        # The refusal and its problems are separate log lines: wait for the problem's.
        wait_for(lambda: "is not a duration" in errlog.read_text(), what="reload refusal")
        assert "policy reload rejected" in errlog.read_text() and "30x" in errlog.read_text()
        assert daemon.poll() is None, "an invalid reload must not stop the daemon"
        fleet.config.write_text(good.replace("agent-0", "agent-zero", 1))
        wait_for(lambda: "policies reloaded" in errlog.read_text(), what="good reload")
    finally:
        assert stop_daemon(daemon) == 0
        store.close()


def test_daemon_refuses_to_start_on_invalid_file(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    fleet.config.write_text(fleet.config.read_text() + "\n[bogus]\nx = 1\n")
    result = fleet.cli("run", timeout=60)
    assert result.returncode == 2
    assert "bogus" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_stops_after_the_step_in_flight(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    fake_openai.set_latency(1.5)
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    wait_for(lambda: store.unfinished_rotations(), what="a rotation to start")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    unfinished = store.unfinished_rotations()
    fake_openai.set_latency(0)
    # Whatever step it stopped after, a restart finishes the same rotation.
    daemon = fleet.start_daemon()
    try:
        wait_for(lambda: _successes(store, "agent-0/openai") == 1, what="resumed rotation")
    finally:
        stop_daemon(daemon)
    rotations = store.rotations()
    store.close()
    assert len(rotations) == 1
    if unfinished:
        assert rotations[0].id == unfinished[0].id
    fleet.assert_settled()


def _max_overlap(rotations) -> int:
    """The most rotations in flight at one instant, from their recorded start and end."""
    events = sorted([(r.started_at, 1) for r in rotations] +
                    [(r.finished_at, -1) for r in rotations])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


@pytest.mark.slow
def test_rotate_now_while_the_daemon_runs_never_overlaps(tmp_path, openbao, fake_openai):
    """SPEC: rotate-now works with a daemon on the same store and never runs a credential's
    rotation twice at once."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=3, interval="2s", grace="0s")
    fake_openai.set_latency(0.1)
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: all(_successes(store, c["name"]) >= 1 for c in fleet.credentials),
                 what="the daemon's first rotations")
        for _ in range(2):
            result = fleet.cli("rotate-now", "--all", "--yes", "--reason", "overlap test")
            assert result.returncode == 0, result.stdout + result.stderr
        fleet.config.write_text(fleet.config.read_text().replace('"2s"', '"30d"'))
        _wait_quiet(store)
    finally:
        assert stop_daemon(daemon) == 0
    for cred in fleet.credentials:
        rotations = [r for r in store.rotations(cred["name"], limit=1000)
                     if r.finished_at is not None]
        assert sum(r.trigger == "manual" for r in rotations) == 2
        assert _max_overlap(rotations) == 1, f"{cred['name']} rotated twice at once"
    store.close()
    fleet.assert_settled()


@pytest.mark.slow
def test_max_concurrent_rotations_is_respected(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=6,
                       settings={"max_concurrent_rotations": 2})
    fake_openai.set_latency(0.2)
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: all(_successes(store, c["name"]) == 1 for c in fleet.credentials),
                 timeout=90, what="one rotation each")
    finally:
        stop_daemon(daemon)
    rotations = store.rotations(limit=100)
    store.close()
    assert len(rotations) == 6
    assert _max_overlap(rotations) == 2
    log = sorted((tmp_path / "out").glob("*-run.stderr"))[-1].read_text()
    assert log.count("finished: success") == 6, "each rotation finishes exactly once"
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    steps = [x for x in lines if x.get("step") == "create" and x.get("status") == "succeeded"]
    assert len(steps) == 6, "one structured log line per step"
    assert set(steps[0]) >= {"time", "level", "credential", "agent", "provider",
                             "rotation_id", "step", "duration_seconds"}


def test_window_holds_a_due_rotation_until_it_opens(tmp_path, openbao, fake_openai,
                                                    monkeypatch):
    """The daemon's tick, driven by an injected clock: a credential due on a Saturday with a
    Mon-Fri window waits for Monday 09:00, then rotates."""
    from datetime import UTC, datetime

    from rotator.config import load_policies
    from rotator.scheduling import Daemon

    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)

    def windowed(doc):
        doc["credentials"][0]["window"] = "Mon-Fri 09:00-17:00 UTC"

    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, extra=windowed)
    now = [datetime(2026, 11, 28, 12, 0, tzinfo=UTC)]  # a Saturday
    daemon = Daemon(fleet.config, load_policies(fleet.config), clock=lambda: now[0])
    try:
        daemon.engine.sync_credentials()
        daemon.tick()
        daemon.wait_idle(60)
        state = daemon.store.credential("agent-0/openai")
        assert state.last_rotated_at is None, "no rotation outside the window"
        assert state.next_due_at == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
        assert fake_openai.request_count("POST") == 0

        now[0] = datetime(2026, 11, 30, 9, 5, tzinfo=UTC)  # Monday, inside the window
        daemon.tick()
        daemon.wait_idle(60)
        state = daemon.store.credential("agent-0/openai")
        assert state.last_rotated_at == now[0]
        assert state.next_due_at > now[0]
    finally:
        daemon.stop("test over")
        daemon._shutdown()
    fleet.assert_settled()


@pytest.mark.slow
def test_metrics_are_served_and_rebuilt_from_the_store(tmp_path, openbao, fake_openai):
    """SPEC's metrics on /metrics: counters from the rotation just done, and the state gauges
    right from the first scrape of a restarted daemon (read from the store, not from memory)."""
    import urllib.request

    port = free_port()
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2,
                       settings={"metrics_address": f"127.0.0.1:{port}"})
    store = StateStore(f"sqlite:///{fleet.state_db}")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        (tmp_path / "out" / f"metrics-{time.monotonic_ns()}.txt").write_text(text)
        return text

    daemon = fleet.start_daemon()
    try:
        wait_for(lambda: all(_successes(store, c["name"]) == 1 for c in fleet.credentials),
                 what="rotations")
        text = wait_for(lambda: (t := scrape()) and "rotator_rotations_total{" in t and t,
                        what="metrics")
    finally:
        stop_daemon(daemon)
    assert ('rotator_rotations_total{credential="agent-0/openai",outcome="success",'
            'provider="openai-test",trigger="schedule"} 1.0') in text
    assert 'rotator_rotation_step_duration_seconds_count{provider="openai-test",step="create"}' \
        in text
    assert 'rotator_build_info{version="' in text
    assert "rotator_rotations_in_progress 0.0" in text
    # Each rotation: one create at the provider, one promote in the vault.
    assert ('rotator_provider_requests_total{operation="create",provider="openai-test",'
            'status="ok"} 2.0') in text
    assert ('rotator_vault_requests_total{operation="promote",status="ok",vault="main"} 2.0'
            in text)
    lint = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    daemon = fleet.start_daemon()
    try:
        text = wait_for(lambda: _try(scrape), what="metrics after restart")
    finally:
        stop_daemon(daemon)
        store.close()
    assert 'rotator_credential_last_rotation_timestamp_seconds{agent="agent-1"' in text
    assert 'rotator_credential_next_rotation_timestamp_seconds{agent="agent-1"' in text
    assert "rotator_old_keys_awaiting_revocation 0.0" in text


def promtool() -> str:
    return debian_tool("promtool")


def test_alert_rules_pass_promtool():
    rules = Path(__file__).parent.parent / "deploy" / "prometheus" / "rotator-alerts.yml"
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = rules.read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout
    assert text.count("runbook_url: \"README.md#runbook-alerts\"") == len(alerts)
    readme = (rules.parent.parent.parent / "README.md").read_text()
    runbook = readme[readme.index("## Runbook: alerts"):]
    assert [name for name in alerts if f"- **{name}**" not in runbook] == [], \
        "every alert has its entry in the README's runbook"


def _try(fn):
    try:
        return fn()
    except OSError:
        return None


def test_a_store_lost_while_starting_up_is_waited_for(tmp_path, openbao, fake_openai):
    """The store answers when the daemon opens it, then drops (PostgreSQL restarting right
    then): starting up waits and retries instead of ending the daemon; an error that is not
    the store being away still ends it."""
    import threading

    from sqlalchemy.exc import OperationalError

    from rotator.config import load_policies
    from rotator.scheduling import Daemon

    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    daemon = Daemon(fleet.config, load_policies(fleet.config))
    real, calls = daemon.engine.sync_credentials, []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("SELECT", {}, Exception("connection refused"))
        real()

    daemon.engine.sync_credentials = flaky  # type: ignore[method-assign]
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(lambda: daemon.metrics_url is not None, timeout=30,
                 what="the daemon serving after the store came back")
        assert len(calls) == 3
    finally:
        daemon.stop("test over")
        runner.join(30)
    assert not runner.is_alive()

    broken = Daemon(fleet.config, load_policies(fleet.config))

    def bug() -> None:
        raise ValueError("not the store")

    broken.engine.sync_credentials = bug  # type: ignore[method-assign]
    with pytest.raises(ValueError):
        broken.run()
    broken._shutdown()
