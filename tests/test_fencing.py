"""Fencing: a worker that lost a credential's lease while it waited (a backoff sleep, a pause
past its lease) never again calls the provider or writes the vault for that rotation, and
nothing it does can touch a key a newer owner made.

Engines A and B share one state store, a short lease and an injected clock. One of A's plugin
calls fails once with a transient error; A's backoff sleep then lets its lease expire (or, in
the "skewed" variant, B's clock runs ahead of A's, as on a replica whose clock is fast), and B
takes the rotation over and finishes it while A sleeps. When A's sleep returns, the vault's
current key must be alive at the provider and be the agent's only live key.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.config import load_policies
from rotator.engine import Engine, RotationRequest, RotationResult
from rotator.runtime import Runtime
from rotator.state.store import StateStore
from tests.support import Fleet, fail_transiently, make_fleet, staged_copies

TTL = timedelta(seconds=10)


@dataclass
class Clock:
    """An engine's clock: shared time plus this engine's own offset (a fast clock)."""

    shared: list[datetime]
    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return self.shared[0] + self.offset


@dataclass
class Pair:
    fleet: Fleet
    a: Engine
    b: Engine
    a_clock: Clock
    b_clock: Clock
    failures: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.fleet.credentials[0]["name"]


@contextmanager
def two_engines(fleet: Fleet, sleep: Callable[[float], None]) -> Iterator[Pair]:
    shared = [datetime.now(UTC)]
    clocks = (Clock(shared), Clock(shared))
    with ExitStack() as stack:
        engines = []
        for clock, engine_sleep in zip(clocks, (sleep, None), strict=True):
            policies = load_policies(fleet.config)
            store = StateStore(policies.settings.state_url)
            stack.callback(store.close)
            runtime = Runtime(policies)
            stack.callback(runtime.close)
            engine = Engine(policies, runtime, store, clock=clock,
                            sleep=engine_sleep or (lambda s: None))
            stack.callback(engine.close)
            engines.append(engine)
        engines[0].sync_credentials()
        yield Pair(fleet, engines[0], engines[1], *clocks)


def take_over(pair: Pair) -> None:
    """B, finding the rotation's lease expired, finishes whatever A left."""
    b = pair.b
    b.resume(pair.name)
    b.revoke_due(pair.name)


# (plugin, method, health check, how A's rotation is asked for)
CASES = {
    "create": ("provider", "create", None, {}),
    "verify": ("provider", "verify", None, {}),
    "stage": ("vault", "stage", None, {}),
    "promote": ("vault", "promote", None, {}),
    "revoke": ("provider", "revoke", None, {"revoke_mode": "immediately"}),
    "health": (None, None, "flaky", {}),
    "restore": ("vault", "restore", "failing", {}),
    # Paused right after entering the grace period, before the old key's revocation.
    "grace": (None, "after:grace", None, {"revoke_mode": "immediately"}),
}


def _health(kind: str | None, tmp: Path) -> dict[str, Any] | None:
    if kind == "flaky":  # unhealthy once, then healthy: the engine sleeps between attempts
        flag = tmp / "healthy-now"
        return {"type": "command", "attempts": 3, "delay": "1s", "timeout": "5s",
                "run": ["sh", "-c", f"test -e {flag} || {{ touch {flag}; exit 1; }}"]}
    if kind == "failing":  # unhealthy: the rotation rolls back (and restores the old key)
        return {"type": "command", "attempts": 1, "timeout": "5s", "run": ["false"]}
    return None


@pytest.fixture(autouse=True)
def _vault_token(openbao, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)


@pytest.mark.parametrize("variant", ["paused", "skewed"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_worker_that_lost_its_lease_in_a_retry_touches_nothing(tmp_path, openbao, fake_openai,
                                                                 monkeypatch, case, variant):
    plugin, method, health, request = CASES[case]
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="0s",
                       health=_health(health, tmp_path),
                       settings={"lock_ttl": f"{int(TTL.total_seconds())}s",
                                 "retry_deadline": "60s"})
    cred = fleet.credentials[0]
    legacy = fleet.vault_value(cred)
    took_over: list[bool] = []
    pair_box: list[Pair] = []

    def a_sleeps(seconds: float) -> None:
        """A's backoff: time passes beyond its lease (or B's clock runs ahead), and B takes
        the rotation over and finishes it before A wakes."""
        if took_over:
            return
        pair = pair_box[0]
        if variant == "paused":
            pair.a_clock.shared[0] += TTL + timedelta(seconds=1)
        else:
            pair.b_clock.offset = TTL + timedelta(seconds=1)
        took_over.append(True)
        take_over(pair)

    with two_engines(fleet, a_sleeps) as pair:
        pair_box.append(pair)
        if plugin is not None:
            a = pair.a.runtime
            target = a.provider(cred["provider"]) if plugin == "provider" else a.vault("main")
            pair.failures = fail_transiently(target, method)
        elif method is not None:  # a pause at a point of the protocol rather than in a retry
            monkeypatch.setattr("rotator.engine.crashpoint",
                                lambda point: a_sleeps(0) if point == method else None)
        creates_before = fake_openai.request_count("POST", "/api_keys")
        result: RotationResult = pair.a.rotate(RotationRequest(
            credential=pair.name, trigger="manual", **request))
        assert took_over, f"A never slept in a retry (failures seen: {pair.failures})"
        assert result.outcome == "interrupted", (result.outcome, result.message)
        assert "lease" in result.message or "another worker" in result.message, result.message

        store = pair.b.store
        rotation = store.rotation(result.rotation_id)
        expected = "rolled_back" if health == "failing" else "succeeded"
        assert rotation.status == expected, (rotation.status, rotation.error)
        assert not store.unfinished_rotations() and not store.pending_revocations()

        current = fleet.vault_value(cred)
        assert fake_openai.is_valid(current), "the vault's current key was revoked"
        live = fleet.live_keys(cred)
        assert len(live) == 1, f"live keys: {[(k['id'], k['name']) for k in live]}"
        if health == "failing":
            assert current == legacy, "a rollback leaves the old key current"
        else:
            assert current != legacy and not fake_openai.is_valid(legacy)
            assert live[0]["id"] == rotation.new_key_id
            assert live[0]["name"].startswith(f"rotator-{rotation.id}-e")
        # One create for the rotation, by whichever engine ran that step; two when A's key was
        # created but never staged (B replaced it, and revoked A's: A's epoch is older).
        creates = fake_openai.request_count("POST", "/api_keys") - creates_before
        assert creates == (2 if case == "stage" else 1), creates
        assert staged_copies(openbao, f"rotator/pending/{fleet.prefix}") == [], \
            "staged copies left behind"



def test_a_create_on_the_wire_when_the_lease_ran_out_leaves_no_key_behind(tmp_path, openbao,
                                                                          fake_openai):
    """The unfenceable case: A's create was sent under a valid lease but lands after B took
    the rotation over. A stops at its next call (staging); the key it created carries A's
    epoch, and B revokes it when it finishes the rotation (after the grace period)."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="1h",
                       settings={"lock_ttl": f"{int(TTL.total_seconds())}s"})
    cred = fleet.credentials[0]
    with two_engines(fleet, lambda s: None) as pair:
        provider = pair.a.runtime.provider(cred["provider"])
        original = provider.create
        landed: list[str] = []

        def slow_create(self: Any, info: Any, tag: str) -> Any:
            pair.a_clock.shared[0] += TTL + timedelta(seconds=1)  # A stalls on the wire...
            b = pair.b.resume(pair.name)  # ...B takes the rotation over first
            assert b is not None and b.outcome == "success" and b.revoke_at is not None, b
            key = original(info, tag)  # then A's create lands
            landed.append(key.key_id)
            return key

        slow_create.__name__ = "create"
        provider.create = types.MethodType(slow_create, provider)
        result = pair.a.rotate(RotationRequest(credential=pair.name, trigger="manual"))
        assert result.outcome == "interrupted", result.message
        assert len(fleet.live_keys(cred)) == 3, "old key in grace, B's new key, A's stray"

        pair.a_clock.shared[0] += timedelta(hours=1, seconds=1)
        assert pair.b.revoke_due(pair.name) == 1
        assert landed[0] not in {k["id"] for k in fleet.live_keys(cred)}, "A's key survived"
        fleet.assert_settled()
        rotation = pair.b.store.rotation(result.rotation_id)
        assert rotation.status == "succeeded"
        assert fleet.live_keys(cred)[0]["id"] == rotation.new_key_id
