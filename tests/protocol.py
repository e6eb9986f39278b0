"""A fleet built from a provider harness and a vault harness, for the protocol tests that run over
every built-in provider and vault (crash at each step, no outage, revoke-immediately).

The invariants are checked through the harnesses, never through the provider under test: the
vault holds a key the service accepts, it is the credential's only live key, the legacy key is
gone, and the secret's other fields were kept.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from rotator.state.store import StateStore
from tests.harnesses.base import ProviderHarness, SeededCredential, VaultHarness
from tests.support import Runner

OTHER = {"OTHER": "keep-me"}


@dataclass
class Credential:
    name: str
    path: str
    seeded: SeededCredential


@dataclass
class ProtocolFleet(Runner):
    tmp: Path
    vault: VaultHarness
    provider: ProviderHarness
    config: Path
    credentials: list[Credential] = field(default_factory=list)
    _runs: int = 0

    @property
    def state_url(self) -> str:
        return f"sqlite:///{self.tmp / 'state.db'}"

    def daemon_env(self) -> dict[str, str]:
        return {**self.vault.env(), **self.provider.env()}

    def store(self) -> StateStore:
        return StateStore(self.state_url)

    def current(self, cred: Credential) -> tuple[str | None, dict[str, str]]:
        """The key agents read now and the companion fields beside it."""
        fields = self.vault.read(cred.path)
        companions = {k: v for k, v in fields.items()
                      if k not in (cred.seeded.field, *OTHER)}
        return fields.get(cred.seeded.field), companions

    def current_accepted(self, cred: Credential) -> bool:
        value, companions = self.current(cred)
        return value is not None and self.provider.key_accepted(cred.seeded, value, companions)

    def assert_settled(self) -> None:
        """After every rotation finished: the vault's key works, it is the only live key,
        the legacy key is gone, and the other field was kept."""
        for cred in self.credentials:
            fields = self.vault.read(cred.path)
            assert fields.get("OTHER") == "keep-me", f"{cred.name}: other field lost"
            assert self.current_accepted(cred), f"{cred.name}: the vault's key is rejected"
            live = self.provider.live_key_ids(cred.seeded)
            if not self.provider.identifies_adopted:
                live.discard(cred.seeded.key_id or "")  # flagged for a manual revoke
                assert len(live) == 1, f"{cred.name}: live keys {sorted(live)}"
                continue
            assert len(live) == 1, f"{cred.name}: live keys {sorted(live)}"
            if cred.seeded.key_id is not None:
                assert cred.seeded.key_id not in live, f"{cred.name}: legacy key still live"
            if cred.seeded.value is not None and self.provider.revoked_is_rejected:
                legacy_works = self.provider.key_accepted(cred.seeded, cred.seeded.value,
                                                          cred.seeded.companions)
                assert not legacy_works, f"{cred.name}: the legacy key still works"


def make_protocol_fleet(tmp: Path, vault: VaultHarness, provider: ProviderHarness, n: int = 1,
                        *, grace: str = "0s", interval: str = "30d",
                        settings: dict[str, Any] | None = None) -> ProtocolFleet:
    """``n`` credentials seeded at the provider, their legacy keys in the vault, and a policy
    file at ``tmp/rotation-policies.toml``."""
    fleet = ProtocolFleet(tmp=tmp, vault=vault, provider=provider,
                          config=tmp / "rotation-policies.toml")
    prefix = f"p{uuid.uuid4().hex[:10]}"
    tables = []
    for i in range(n):
        seeded = provider.seed(i)
        name = f"agent-{i}/{provider.id}"
        path = f"{prefix}/agents/agent-{i}"
        fields = dict(OTHER)
        if seeded.value is not None:
            fields.update(seeded.companions)
            fields[seeded.field] = seeded.value
        vault.write(path, fields)
        fleet.credentials.append(Credential(name=name, path=path, seeded=seeded))
        tables.append({"name": name, "agent": f"agent-{i}", "provider": "under-test",
                       "vault": "main", "path": path, "field": seeded.field,
                       "interval": interval, "grace": grace, "params": seeded.params,
                       "health_check": {"type": "none"}})
    doc: dict[str, Any] = {
        "rotator": {"state_url": fleet.state_url, "jitter": "0s", "poll_interval": "1s",
                    "lock_ttl": "30s", "retry_deadline": "20s",
                    "metrics_address": "127.0.0.1:0", **(settings or {})},
        "vaults": {"main": vault.vault_table()},
        "providers": {"under-test": provider.provider_table()},
        "credentials": tables,
    }
    fleet.config.write_text(tomli_w.dumps(doc))
    return fleet


class Probe:
    """An agent stand-in: reads its key from the vault and has the service check it, in a loop.

    A rejection of the key the vault serves is an outage. Errors (a read during a write, a
    service hiccup) are counted apart.
    """

    def __init__(self, fleet: ProtocolFleet, cred: Credential, period: float = 0.02) -> None:
        self.fleet, self.cred, self.period = fleet, cred, period
        self.successes = self.rejections = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"probe-{cred.name}")

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ok = self.fleet.current_accepted(self.cred)
            except Exception:
                self.errors += 1
            else:
                if ok:
                    self.successes += 1
                else:
                    self.rejections += 1
            time.sleep(self.period)


def finished(store: StateStore) -> bool:
    rotations = store.rotations()
    return bool(rotations) and all(r.status in ("succeeded", "failed", "rolled_back")
                                   for r in rotations) and not store.pending_revocations()
