"""The rotation protocol in process, against real OpenBao and the fake OpenAI API over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from rotator.config import load_policies
from rotator.engine import Engine, RotationRequest
from rotator.metrics import Metrics
from rotator.runtime import Runtime
from rotator.state.store import StateStore
from rotator.testing.agent import SampleAgent
from rotator.testing.openbao import OpenBaoDevServer
from tests.support import Fleet, make_fleet


@contextmanager
def engine_for(fleet: Fleet, runtime_cls: type[Runtime] = Runtime,
               monkeypatch: Any = None) -> Iterator[Engine]:
    policies = load_policies(fleet.config)
    store = StateStore(policies.settings.state_url)
    runtime = runtime_cls(policies)
    engine = Engine(policies, runtime, store)
    engine.sync_credentials()
    try:
        yield engine
    finally:
        engine.close()
        runtime.close()
        store.close()


@pytest.fixture(autouse=True)
def _vault_token(openbao, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)


def rotate(engine: Engine, name: str, **kw: Any):
    return engine.rotate(RotationRequest(credential=name, trigger="manual", **kw))


def test_rotation_adopts_legacy_key_stores_new_one_and_revokes_old(tmp_path, openbao,
                                                                   fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    with engine_for(fleet) as engine:
        result = rotate(engine, cred["name"])
        assert result.outcome == "success", result.message
        rotation = engine.store.rotation(result.rotation_id)
        assert rotation.old_key_id == fleet.legacy_keys[cred["name"]], "identified by redaction"
        state = engine.store.credential(cred["name"])
        assert state.current_key_id == rotation.new_key_id
        assert state.last_outcome == "success" and state.next_due_at > state.last_rotated_at
        steps = [s.step for s in engine.store.steps(rotation.id)]
        assert steps == ["prepare", "create", "verify", "store", "health", "grace", "revoke"]
    assert not fake_openai.is_valid(legacy)
    fleet.assert_settled()
    meta = openbao.client().secrets.kv.v2.read_secret_metadata(
        path=cred["path"], mount_point="secret")["data"]["custom_metadata"]
    assert meta["OPENAI_API_KEY.key_id"] == rotation.new_key_id
    assert meta["OPENAI_API_KEY.rotation_id"] == rotation.id


def test_second_rotation_uses_recorded_key_id(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    name = fleet.credentials[0]["name"]
    with engine_for(fleet) as engine:
        first = rotate(engine, name)
        lists_before = fake_openai.request_count("GET", "/api_keys")
        second = rotate(engine, name)
        assert second.ok
        assert engine.store.rotation(second.rotation_id).old_key_id == \
            engine.store.rotation(first.rotation_id).new_key_id
        assert fake_openai.request_count("GET", "/api_keys") == lists_before, \
            "a key rotator wrote is known by its metadata: no identify call"
    fleet.assert_settled()


def test_unidentifiable_key_still_rotates_and_says_what_to_revoke(tmp_path, openbao,
                                                                   fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, seed=False)
    cred = fleet.credentials[0]
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=cred["path"], secret={"OPENAI_API_KEY": "sk-proj-from-some-other-place-0000",
                                   "OTHER": "keep-me"}, mount_point="secret")
    with engine_for(fleet) as engine:
        result = rotate(engine, cred["name"])
    assert result.outcome == "success"
    assert result.manual_revoke and "revoke it by hand" in result.manual_revoke
    assert "sk-proj-from-some-other-place" not in result.manual_revoke
    fleet.assert_settled()


def test_first_rotation_provisions_a_missing_field(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, seed=False)
    with engine_for(fleet) as engine:
        assert rotate(engine, fleet.credentials[0]["name"]).ok
    fleet.assert_settled()


def test_health_check_failure_rolls_back(tmp_path, openbao, fake_openai):
    agent_box: dict[str, SampleAgent] = {}
    fleet = make_fleet(tmp_path, openbao, fake_openai, seed=True,
                       health={"type": "http", "url": "http://127.0.0.1:9/placeholder",
                               "attempts": 3, "delay": "1s", "timeout": "2s"})
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    agent = SampleAgent(vault_url=openbao.url, vault_token=openbao.root_token,
                        path=cred["path"], field=cred["field"],
                        provider_base_url=fake_openai.base_url, period=0.1)
    agent.start()
    agent_box["a"] = agent
    try:
        fleet.config.write_text(fleet.config.read_text().replace(
            "http://127.0.0.1:9/placeholder", agent.health_url))
        agent.fail_health(True)
        with engine_for(fleet) as engine:
            result = rotate(engine, cred["name"])
            assert result.outcome == "rolled_back", result.message
            assert "health check" in result.message
            rotation = engine.store.rotation(result.rotation_id)
            assert rotation.status == "rolled_back"
            assert engine.store.credential(cred["name"]).last_outcome == "rolled_back"
        assert fleet.vault_value(cred) == legacy, "the old key is current again"
        assert fake_openai.is_valid(legacy), "and it still works"
        live = fleet.live_keys(cred)
        assert [k["id"] for k in live] == [fleet.legacy_keys[cred["name"]]], "new key revoked"
        assert agent.rejections == 0
    finally:
        agent.stop()


def test_transient_provider_errors_are_retried(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    fake_openai.inject_fault(500, count=2, path_contains="/service_accounts/", method="POST")
    fake_openai.inject_fault(429, count=1, path_contains="/api_keys/", method="DELETE",
                             retry_after=0.2)
    with engine_for(fleet) as engine:
        metrics = Metrics(engine.store, lambda: engine.policies)
        engine.call_observers.append(metrics.on_call)
        result = rotate(engine, fleet.credentials[0]["name"])
    assert result.ok, result.message
    assert fake_openai.request_count("POST", "/service_accounts/") == 3
    assert fake_openai.request_count("DELETE", "/api_keys/") == 2
    fleet.assert_settled()

    def count(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    provider = "openai-test"
    assert count("rotator_provider_requests_total", provider=provider, operation="create",
                 status="transient_error") == 2
    assert count("rotator_provider_requests_total", provider=provider, operation="create",
                 status="ok") == 1
    assert count("rotator_retries_total", kind="provider", plugin=provider,
                 operation="create") == 2
    assert count("rotator_retries_total", kind="provider", plugin=provider,
                 operation="revoke") == 1


def test_permanent_provider_error_fails_cleanly_and_keeps_old_key(tmp_path, openbao,
                                                                  fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    fleet.config.write_text(fleet.config.read_text().replace(
        cred["service_account_id"], "svc_acct_does_not_exist"))
    with engine_for(fleet) as engine:
        result = rotate(engine, cred["name"])
        assert result.outcome == "failed"
        assert engine.store.rotation(result.rotation_id).status == "failed"
    assert fleet.vault_value(cred) == legacy and fake_openai.is_valid(legacy)


def test_vault_down_before_rotation_fails_cleanly(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    fleet.config.write_text(fleet.config.read_text().replace(openbao.url, "http://127.0.0.1:9"))
    fleet.config.write_text(fleet.config.read_text().replace('retry_deadline = "20s"',
                                                             'retry_deadline = "2s"'))
    with engine_for(fleet) as engine:
        result = rotate(engine, fleet.credentials[0]["name"])
    assert result.outcome == "failed"
    assert fake_openai.request_count("POST") == 0, "nothing created when the vault is down"


def test_vault_dying_mid_rotation_leaves_no_orphan_key(tmp_path, openbao, fake_openai,
                                                       monkeypatch):
    """A second OpenBao dies right after the key is created: the key must be revoked."""
    own = OpenBaoDevServer().start()
    try:
        monkeypatch.setenv("VAULT_TOKEN", own.root_token)
        fleet = make_fleet(tmp_path, own, fake_openai, settings={"retry_deadline": "2s"})
        cred = fleet.credentials[0]
        legacy = fleet.vault_value(cred)

        class DyingRuntime(Runtime):
            def vault(self, name: str) -> Any:
                vault = super().vault(name)
                real_stage = vault.stage

                def stage(*args: Any) -> None:
                    own.stop()
                    real_stage(*args)

                vault.stage = stage  # type: ignore[method-assign]
                return vault

        policies = load_policies(fleet.config)
        store = StateStore(policies.settings.state_url)
        runtime = DyingRuntime(policies)
        engine = Engine(policies, runtime, store)
        engine.sync_credentials()
        result = rotate(engine, cred["name"])
        engine.close()
        runtime.close()
        assert result.outcome == "failed", result.message
        assert fleet.live_keys(cred) == [k for k in fleet.live_keys(cred)
                                         if k["id"] == fleet.legacy_keys[cred["name"]]]
        assert len(fleet.live_keys(cred)) == 1, "the new key was revoked"
        assert fake_openai.is_valid(legacy)
        assert store.rotation(result.rotation_id).status == "failed"
        store.close()
    finally:
        own.stop()


def test_one_rotation_per_credential_at_a_time(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    name = fleet.credentials[0]["name"]
    fake_openai.set_latency(0.3)
    results = []
    with engine_for(fleet) as one, engine_for(fleet) as two:
        barrier = threading.Barrier(2)

        def go(engine: Engine) -> None:
            barrier.wait()
            results.append(rotate(engine, name))

        threads = [threading.Thread(target=go, args=(e,)) for e in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rotations = one.store.rotations(name)
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["skipped", "success"], [r.message for r in results]
    assert len(rotations) == 1
    fleet.assert_settled()


def test_revoke_first_kills_old_key_before_creating(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h")
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    with engine_for(fleet) as engine:
        result = rotate(engine, cred["name"], revoke_mode="first")
        assert result.ok, result.message
        steps = [s.step for s in engine.store.steps(result.rotation_id)]
        assert steps[:3] == ["prepare", "revoke_first", "create"]
        assert not engine.store.pending_revocations()
    assert not fake_openai.is_valid(legacy)
    fleet.assert_settled()


def test_revoke_first_still_kills_old_key_when_create_fails(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, settings={"retry_deadline": "1s"})
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    fake_openai.inject_fault(500, count=1000, path_contains="/service_accounts/", method="POST")
    with engine_for(fleet) as engine:
        result = rotate(engine, cred["name"], revoke_mode="first")
        state = engine.store.credential(cred["name"])
    assert result.outcome == "failed"
    assert not fake_openai.is_valid(legacy)
    assert "NO working key" in result.message and "already revoked" in result.message
    assert state.current_key_id is None and state.due_reason == "retry_backoff"


def test_revoke_immediately_also_kills_keys_still_in_grace(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h")
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    with engine_for(fleet) as engine:
        first = rotate(engine, cred["name"])
        assert first.ok and first.revoke_at is not None
        assert fake_openai.is_valid(legacy), "still in its grace period"
        middle = fleet.vault_value(cred)
        second = rotate(engine, cred["name"], revoke_mode="immediately")
        assert second.ok
        assert engine.store.rotation(first.rotation_id).status == "succeeded"
        assert not engine.store.pending_revocations()
    assert not fake_openai.is_valid(legacy) and not fake_openai.is_valid(middle)
    fleet.assert_settled()


def test_provider_failing_past_the_deadline_fails_cleanly(tmp_path, openbao, fake_openai):
    """A provider that keeps failing transiently fails the step at the deadline, cleanly."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, settings={"retry_deadline": "1s"})
    cred = fleet.credentials[0]
    fake_openai.inject_fault(503, count=1000, path_contains="/service_accounts/", method="POST")
    with engine_for(fleet) as engine:
        result = rotate(engine, cred["name"])
        assert result.outcome == "failed"
        assert engine.store.rotation(result.rotation_id).status == "failed"
    fake_openai.reset_faults()
    assert len(fleet.live_keys(cred)) == 1


def test_threads_of_one_process_never_share_a_credential(tmp_path, openbao, fake_openai):
    """The store's lease is per process; the engine must still keep its own threads apart
    (the daemon's revocation tick once finished a rotation a worker was finishing too)."""
    fleet = make_fleet(tmp_path, openbao, fake_openai)
    name = fleet.credentials[0]["name"]
    fake_openai.set_latency(0.3)
    results = []
    with engine_for(fleet) as engine:
        barrier = threading.Barrier(2)

        def go() -> None:
            barrier.wait()
            results.append(rotate(engine, name))

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        finished = [e for e in engine.store.steps(results[0].rotation_id or
                                                  results[1].rotation_id)]
    assert sorted(r.outcome for r in results) == ["skipped", "success"]
    assert sum(1 for s in finished if s.step == "revoke") == 1


def test_revocation_of_a_key_whose_vault_version_was_pruned(tmp_path, openbao, fake_openai):
    """KV v2 keeps a limited number of versions: a revocation must not wait forever for a
    version that is gone; the key is revoked all the same."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h")
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    kv = openbao.client().secrets.kv.v2
    with engine_for(fleet) as engine:
        assert rotate(engine, cred["name"]).ok
        kv.update_metadata(path=cred["path"], max_versions=1, mount_point="secret")
        kv.patch(path=cred["path"], secret={"OTHER": "keep-me"}, mount_point="secret")
        assert rotate(engine, cred["name"], revoke_mode="immediately").ok
        assert not engine.store.pending_revocations()
    assert not fake_openai.is_valid(legacy)
