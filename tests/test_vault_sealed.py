"""A real OpenBao (integrated storage, not dev mode) restarted under rotations comes back
sealed, as every Vault does; rotations wait for the unseal instead of failing, the outage is one
log line and its recovery another, and no agent ever reads a dead key."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rotator.state.store import StateStore
from rotator.testing.agent import SampleAgent
from rotator.testing.openbao import OpenBaoServer
from tests.support import daemon_log_lines, make_fleet, stop_daemon, wait_for

SEALED_FOR = 5.0


@pytest.fixture
def bao(monkeypatch) -> Iterator[OpenBaoServer]:
    server = OpenBaoServer().start()
    monkeypatch.setenv("VAULT_TOKEN", server.root_token)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_rotations_wait_out_a_sealed_restart(tmp_path, bao, fake_openai):
    fleet = make_fleet(tmp_path, bao, fake_openai, n=6, interval="2s", grace="1s",
                       settings={"retry_deadline": "60s", "max_concurrent_rotations": 6})
    fake_openai.set_latency(0.05)
    agents = [SampleAgent(vault_url=bao.url, vault_token=bao.root_token, path=c["path"],
                          field=c["field"], provider_base_url=fake_openai.base_url, period=0.1)
              for c in fleet.credentials]
    for agent in agents:
        agent.start()
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        def successes() -> int:
            return sum(r.outcome == "success" for r in store.rotations(limit=10_000))

        wait_for(lambda: successes() >= len(fleet.credentials), timeout=60,
                 what="the first round of rotations")
        wait_for(lambda: store.unfinished_rotations(), timeout=20, interval=0.01,
                 what="rotations in flight")
        before = successes()
        bao.restart(downtime=0.5, sealed=True)
        assert bao.sealed
        time.sleep(SEALED_FOR)
        bao.unseal()
        assert daemon.poll() is None, "the daemon died with the vault"
        wait_for(lambda: successes() >= before + 2 * len(fleet.credentials), timeout=90,
                 what="two more rounds after the unseal")
        fleet.config.write_text(fleet.config.read_text().replace('"2s"', '"30d"'))
        wait_for(lambda: not store.unfinished_rotations() and not store.pending_revocations(),
                 timeout=60, what="the last rotations to finish")
        rotations = store.rotations(limit=10_000)
    finally:
        code = stop_daemon(daemon)
        for agent in agents:
            agent.stop()
        store.close()
    assert code == 0
    assert all(r.status == "succeeded" for r in rotations), \
        [(r.credential, r.status, r.error) for r in rotations if r.status != "succeeded"]
    assert [a.rejections for a in agents] == [0] * len(agents), "an agent read a dead key"
    fleet.assert_settled()
    lines = daemon_log_lines(tmp_path)
    assert not [line["message"] for line in lines if "exception" in line], \
        "a sealed vault is not a crash"
    down = [line for line in lines if line.get("logger") == "rotator.outages"
            and "is not serving" in line["message"]]
    back = [line for line in lines if line.get("logger") == "rotator.outages"
            and "is serving again" in line["message"]]
    assert len(down) == 1 and "vault 'main' is not serving" in down[0]["message"], down
    assert len(back) == 1 and back[0]["message"].startswith("vault 'main' is serving again"), back
