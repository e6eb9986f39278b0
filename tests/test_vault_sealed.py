"""A real OpenBao (integrated storage, not dev mode) restarted under rotations comes back
sealed, as every Vault does; rotations wait for the unseal instead of failing, the outage is one
log line and its recovery another, and no agent ever reads a dead key. ``OpenBaoServer`` itself
(restart sealed or not, seal, unseal, fresh storage after stop) and ``check --online`` on a
sealed vault are tested here too."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator.errors import PermanentError, TransientError
from rotator.interfaces import Secret
from rotator.state.store import StateStore
from rotator.testing.agent import SampleAgent
from rotator.testing.openbao import OpenBaoServer
from rotator.vaults.hashicorp_vault import HashiCorpVault, HashiCorpVaultSettings
from tests.support import daemon_log_lines, make_fleet, remember_issued, stop_daemon, wait_for

SEALED_FOR = 5.0


@pytest.fixture
def bao(monkeypatch) -> Iterator[OpenBaoServer]:
    server = OpenBaoServer().start()
    monkeypatch.setenv("VAULT_TOKEN", server.root_token)
    try:
        yield server
    finally:
        server.stop()


def test_openbao_server_restarts_sealed_keeps_its_data_and_never_shows_its_keys(
        bao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the restart tests rely on: same URL and storage after a restart, sealed until
    unsealed (every vault operation then transient, saying to unseal), and the root token and
    unseal key in no file of the server's directory."""
    monkeypatch.setenv("ROTATOR_TEST_SEALED_TOKEN", bao.root_token)
    vault = HashiCorpVault("bao", HashiCorpVaultSettings(url=bao.url,
                                                         token_env="ROTATOR_TEST_SEALED_TOKEN"))
    value = f"sk-sealed-{uuid.uuid4().hex}"
    remember_issued([value])
    url, path = bao.url, f"agents/{uuid.uuid4().hex[:8]}"
    try:
        vault.health()
        vault.stage(path, "K", Secret(value), "r-1")
        vault.promote(path, "K", "r-1", {"key_id": "k1"})
        assert not bao.sealed

        bao.restart(sealed=True, down_for=0.2)
        assert bao.url == url and bao.sealed
        for name, call in {"health": vault.health, "read": lambda: vault.read(path, "K"),
                           "stage": lambda: vault.stage(path, "K", Secret(value), "r-2"),
                           "staged_copies": vault.staged_copies}.items():
            with pytest.raises(TransientError, match="is sealed") as caught:
                call()
            assert "unseal it (bao/vault operator unseal)" in str(caught.value), name
            assert not isinstance(caught.value, PermanentError)
            assert value not in str(caught.value) and bao.root_token not in str(caught.value)

        bao.unseal()
        assert not bao.sealed and vault.read(path, "K").secret == Secret(value)
        bao.restart()  # unsealed again by default
        assert not bao.sealed and vault.read(path, "K").secret == Secret(value)
        bao.seal()
        assert bao.sealed
        bao.unseal()
        vault.health()
    finally:
        vault.close()
    tmpdir = bao._tmpdir
    assert tmpdir is not None
    for file in Path(tmpdir).rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert bao.root_token.encode() not in data and \
                bao._unseal_key.encode() not in data, f"{file} holds a key"
    assert bao.client().secrets.kv.v2.read_secret_version(
        path, mount_point="secret", raise_on_deleted_version=True)["data"]["data"]["K"] == value


def test_openbao_server_after_stop_starts_on_fresh_storage() -> None:
    server = OpenBaoServer().start()
    try:
        first = server.root_token
        server.client().secrets.kv.v2.create_or_update_secret("kept", {"a": "b"},
                                                              mount_point="secret")
        server.stop()
        server.start()
        assert server.root_token and server.root_token != first
        assert not server.sealed
        assert "kept" not in server.client().secrets.kv.v2.list_secrets(
            "", mount_point="secret")["data"]["keys"]
    finally:
        server.stop()


def test_check_online_fails_on_a_sealed_vault_saying_unseal_it(tmp_path, bao: OpenBaoServer,
                                                               fake_openai) -> None:
    """Sealed is transient for rotations, and still a failed check: exit 2 with the message."""
    fleet = make_fleet(tmp_path, bao, fake_openai, n=1)
    assert fleet.cli("check", "--online").returncode == 0
    bao.seal()
    checked = fleet.cli("check", "--online")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert (f"vaults.main: vault 'main' at {bao.url} is sealed: unseal it (bao/vault operator "
            "unseal)") in checked.stderr
    assert "Traceback" not in checked.stderr and "staged copies" not in checked.stderr
    bao.unseal()


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
        bao.restart(sealed=True, down_for=0.5)
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
    assert len(down) == 1, [line["message"] for line in down]
    assert down[0]["level"] == "error" and re.fullmatch(
        r"vault 'main' is not serving: .+; rotations wait and retry", down[0]["message"]), down
    assert len(back) == 1, [line["message"] for line in back]
    recovered = re.fullmatch(r"vault 'main' is serving again after (\d+)s", back[0]["message"])
    assert back[0]["level"] == "warning" and recovered, back
    assert int(recovered.group(1)) >= SEALED_FOR - 1, "the outage lasted as long as the seal"
