"""A short fault-mix soak: three replicas on PostgreSQL rotating a dozen credentials every few
seconds while, on a seeded random schedule, a replica is killed (and replaced, as an
orchestrator would) or paused past its lease and woken, PostgreSQL and OpenBao restart (OpenBao
comes back sealed, and is unsealed a moment later), and the provider answers some calls with
429 or 500 and slowly. Afterwards the protocol's invariants must hold: no agent call was ever
refused, no key is orphaned, nothing is left staged, no two rotations of one credential
overlapped, each rotation was finished by one process, every rotation succeeded, and the audit
chain verifies.

About a minute in CI; ``ROTATOR_SOAK_SECONDS`` runs the faults longer and ``ROTATOR_SOAK_SEED``
replays a schedule (the seed is in every failure message).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from rotator.state.store import StateStore
from rotator.testing.agent import SampleAgent
from rotator.testing.openbao import OpenBaoServer
from rotator.testing.postgres import PostgresCluster
from tests.support import (
    Fleet,
    daemon_log_lines,
    make_fleet,
    postgres_state_url,
    remember_issued,
    staged_copies,
    stop_daemon,
    wait_for,
)

LOCK_TTL = 4.0
REPLICAS = 3
CREDENTIALS = 12
SECONDS = float(os.environ.get("ROTATOR_SOAK_SECONDS", "45"))
SEED = int(os.environ.get("ROTATOR_SOAK_SEED", str(random.SystemRandom().randrange(10**6))))


@dataclass
class Soak:
    fleet: Fleet
    bao: OpenBaoServer
    cluster: PostgresCluster
    rng: random.Random
    replicas: list[subprocess.Popen[bytes]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s {what}")

    def victim(self) -> subprocess.Popen[bytes]:
        alive = [p for p in self.replicas if p.poll() is None]
        return self.rng.choice(alive)

    # -- the faults --------------------------------------------------------------------------

    def kill(self) -> None:
        proc = self.victim()
        proc.kill()
        proc.wait(10)
        self.replicas.remove(proc)
        self.replicas.append(self.fleet.start_daemon())
        self.note(f"SIGKILL replica pid {proc.pid}, replacement started")

    def pause(self) -> None:
        proc = self.victim()
        pause = LOCK_TTL + self.rng.uniform(1.0, 3.0)
        proc.send_signal(signal.SIGSTOP)
        self.note(f"SIGSTOP replica pid {proc.pid} for {pause:.1f}s")
        time.sleep(pause)
        proc.send_signal(signal.SIGCONT)

    def restart_postgres(self) -> None:
        downtime = self.rng.uniform(1.0, 3.0)
        self.note(f"PostgreSQL restart, down {downtime:.1f}s")
        self.cluster.restart(downtime=downtime)

    def restart_openbao(self) -> None:
        sealed = self.rng.uniform(1.0, 3.0)
        self.note(f"OpenBao restart, sealed for {sealed:.1f}s")
        self.bao.restart(downtime=0.2, sealed=True)
        time.sleep(sealed)
        self.bao.unseal()

    def run_faults(self, until: float) -> None:
        faults: list[Callable[[], None]] = [self.kill, self.pause, self.pause,
                                            self.restart_postgres, self.restart_openbao]
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(2.0, 5.0))
            self.rng.choice(faults)()


class ProviderChaos:
    """Injects 429 (with Retry-After) and 500 answers into rotator's calls to the fake, a few
    a second, and makes every answer slow."""

    PATHS = (("POST", "/api_keys"), ("DELETE", "/api_keys/"), ("GET", "/api_keys"))

    def __init__(self, fake: Any, rng: random.Random) -> None:
        self.fake, self.rng = fake, rng
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ProviderChaos:
        self.fake.set_latency(0.2)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.2, 0.6)):
            method, path = self.rng.choice(self.PATHS)
            if self.rng.random() < 0.5:
                self.fake.inject_fault(429, path_contains=path, method=method, retry_after=1)
            else:
                self.fake.inject_fault(500, path_contains=path, method=method)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.fake.reset_faults()
        self.fake.set_latency(0)


@pytest.fixture
def servers(monkeypatch) -> Iterator[tuple[OpenBaoServer, PostgresCluster]]:
    bao = OpenBaoServer().start()
    cluster = PostgresCluster().start()
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    monkeypatch.setenv("PGPASSWORD", cluster.password.reveal())
    remember_issued([cluster.password.reveal()])
    try:
        yield bao, cluster
    finally:
        cluster.stop()
        bao.stop()


@pytest.mark.slow
@pytest.mark.soak
def test_fault_mix_soak_keeps_every_invariant(tmp_path, servers, fake_openai):
    bao, cluster = servers
    rng = random.Random(SEED)
    url = postgres_state_url(cluster)
    fleet = make_fleet(tmp_path, bao, fake_openai, n=CREDENTIALS, interval="3s", grace="1s",
                       settings={"state_url": url, "lock_ttl": f"{LOCK_TTL:g}s",
                                 "retry_deadline": "60s", "max_concurrent_rotations": 4})
    assert fleet.cli("db", "upgrade").returncode == 0
    soak = Soak(fleet, bao, cluster, rng)
    agents = [SampleAgent(vault_url=bao.url, vault_token=bao.root_token, path=c["path"],
                          field=c["field"], provider_base_url=fake_openai.base_url, period=0.1)
              for c in fleet.credentials]
    for agent in agents:
        agent.start()
    chaos = ProviderChaos(fake_openai, rng)
    store = StateStore(url)
    where = f"(seed {SEED}; replay with ROTATOR_SOAK_SEED={SEED})"
    try:
        soak.replicas = [fleet.start_daemon() for _ in range(REPLICAS)]
        wait_for(lambda: all(any(r.outcome == "success" for r in store.rotations(c["name"]))
                             for c in fleet.credentials), timeout=60, what="a first round")
        chaos.start()
        soak.run_faults(time.monotonic() + SECONDS)
        chaos.stop()
        soak.note("faults stopped")
        dead = [p.pid for p in soak.replicas if p.poll() is not None]
        assert not dead, f"replicas died by themselves: {dead} {where}"
        # Settle: rotations stop being due, the ones in flight (or paused) finish.
        fleet.config.write_text(fleet.config.read_text().replace('"3s"', '"30d"'))
        wait_for(lambda: _quiet(store), timeout=120, what=f"the rotations to settle {where}")
        rotations = store.rotations(limit=100_000)
        active_end = {r.id: _active_end(store, r.id) for r in rotations}
    finally:
        chaos.stop()
        codes = [stop_daemon(p) for p in soak.replicas]
        for agent in agents:
            agent.stop()
        store.close()
    history = "\n".join(soak.events)
    context = f"{where}\nfaults:\n{history}"
    print(f"soak {where}: {len(rotations)} rotations\n{history}")  # shown with -s
    assert codes == [0] * len(codes), f"replicas did not stop cleanly {context}"
    assert len(rotations) >= 2 * CREDENTIALS, f"too little ran to judge {context}"

    # (a) No agent call was refused: the vault never served a dead key.
    assert [a.rejections for a in agents] == [0] * len(agents), f"rejected keys {context}"
    # (b) No orphan: one live key per agent, the one in the vault.
    try:
        fleet.assert_settled()
    except AssertionError as exc:
        raise AssertionError(f"{exc} {context}") from None
    # (c) Nothing left staged.
    staged = staged_copies(bao, f"rotator/pending/{fleet.prefix}")
    assert staged == [], f"staged copies left: {staged} {context}"
    # (d) No overlap: one rotation of a credential at a time, each finished by one process.
    by_credential: dict[str, list[Any]] = {}
    for rotation in rotations:
        by_credential.setdefault(rotation.credential, []).append(rotation)
    for name, runs in by_credential.items():
        runs.sort(key=lambda r: r.started_at)
        for earlier, later in itertools.pairwise(runs):
            # A rotation is active until its new key is current (its grace step ends); the
            # next may start while the old key waits out its grace to be revoked.
            active_until = active_end[earlier.id]
            assert active_until is not None and active_until <= later.started_at, \
                f"{name}: {earlier.id} and {later.id} overlapped {context}"
    finishes = Counter(m.group(1) for line in daemon_log_lines(tmp_path)
                       if (m := re.search(r"rotation (\S+) finished: ", line["message"])))
    twice = [rid for rid, n in finishes.items() if n > 1]
    assert not twice, f"rotations finished by more than one process: {twice} {context}"
    # (e) Every rotation succeeded.
    bad = [(r.credential, r.id, r.status, r.error) for r in rotations if r.status != "succeeded"]
    assert not bad, f"rotations that did not succeed: {bad} {context}"
    # (f) The audit chain is one chain.
    audit = fleet.cli("audit", "verify")
    assert audit.returncode == 0, f"{audit.stdout}{audit.stderr} {context}"


def _active_end(store: StateStore, rotation_id: str) -> Any:
    """When ``rotation_id`` stopped changing things but revoking its old key: the end of its
    grace step (or of its last step, for a rotation that never got there)."""
    steps = store.steps(rotation_id)
    ends = [s.finished_at for s in steps if s.step == "grace" and s.status == "succeeded"]
    return ends[0] if ends else max((s.finished_at for s in steps if s.finished_at),
                                    default=None)


def _quiet(store: StateStore) -> bool:
    return (not store.unfinished_rotations() and not store.pending_revocations()
            and not store.rotations_in_grace())
