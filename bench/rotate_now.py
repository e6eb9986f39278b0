"""Benchmark: `rotator rotate-now --all` against the limit of this machine.

Rotates N credentials (default 100) with `rotator rotate-now --all --yes` against a real OpenBao
and the fake OpenAI Admin API (grace 0, health check none, max_concurrent_rotations 8), and, in
the same run, a bare script (bench/bare_rotation.py) that makes the same external calls for the
same credentials with the same concurrency and no bookkeeping. Both run as fresh processes, so
start-up counts for both. OpenBao's audit log and the fake's request log count the external
calls of each, to show they match.

Then rotator runs the same workload again in-process with timers around the state store and the
plugin calls, to show where its own time goes.

    .venv/bin/python bench/rotate_now.py [--credentials 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotator.testing.fake_openai import FakeOpenAIServer  # noqa: E402
from rotator.testing.openbao import OpenBaoDevServer  # noqa: E402

CONCURRENCY = 8


def setup_fleet(bao: OpenBaoDevServer, fake: FakeOpenAIServer, project: str, n: int,
                prefix: str, work: Path) -> tuple[Path, list[dict[str, Any]]]:
    """n service accounts, each with a key rotator wrote before (metadata with its key id)."""
    client = bao.client()
    client.secrets.kv.v2.create_or_update_secret(path=f"{prefix}/admin",
                                                 secret={"key": fake.admin_key})
    creds = []
    for i in range(n):
        account = fake.add_service_account(project, name=f"{prefix}-{i}")
        key_id, value = fake.seed_key(project, account, name=f"{prefix}-seed-{i}")
        path = f"{prefix}/agents/a{i}"
        version = client.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"OPENAI_API_KEY": value, "OTHER": "x"})["data"]["version"]
        client.secrets.kv.v2.update_metadata(path=path, custom_metadata={
            "OPENAI_API_KEY.key_id": key_id, "OPENAI_API_KEY.rotation_id": "seed",
            "OPENAI_API_KEY.version": str(version)})
        creds.append({"name": f"a{i}/openai", "agent": f"a{i}", "path": path,
                      "service_account_id": account})
    doc = {
        "rotator": {"state_url": f"sqlite:///{work / f'{prefix}.db'}", "jitter": "0s",
                    "max_concurrent_rotations": CONCURRENCY},
        "vaults": {"main": {"type": "vault", "url": bao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {"openai": {"type": "openai", "project_id": project,
                                 "base_url": fake.base_url,
                                 "admin_key": {"vault": "main", "path": f"{prefix}/admin",
                                               "field": "key"}}},
        "credentials": [{"name": c["name"], "agent": c["agent"], "provider": "openai",
                         "vault": "main", "path": c["path"], "field": "OPENAI_API_KEY",
                         "interval": "30d", "grace": "0s",
                         "params": {"service_account_id": c["service_account_id"]},
                         "health_check": {"type": "none"}} for c in creds],
    }
    config = work / f"{prefix}.toml"
    config.write_text(tomli_w.dumps(doc))
    return config, creds


class AuditCounter:
    """Counts OpenBao requests through a file audit device."""

    def __init__(self, bao: OpenBaoDevServer, path: Path) -> None:
        self.path = path
        bao.client().sys.enable_audit_device("file", options={"file_path": str(path)})

    def count(self) -> int:
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.open() if '"type":"request"' in line)


def timed_process(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{argv[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-2000:]}")
    return elapsed


def profile_in_process(config: Path) -> dict[str, float]:
    """Rotate the fleet in this process with timers around the store and the plugins."""
    from rotator.config import load_policies
    from rotator.engine import Engine
    from rotator.runtime import Runtime
    from rotator.service import Context, rotate_now
    from rotator.state.store import StateStore

    totals: dict[str, float] = defaultdict(float)
    lock = threading.Lock()

    def timed(bucket: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    totals[bucket] += time.perf_counter() - t0
        return wrapper

    t0 = time.perf_counter()
    policies = load_policies(config)
    totals["load policies"] = time.perf_counter() - t0
    store = StateStore(policies.settings.state_url)
    for name in dir(StateStore):
        if not name.startswith("_") and callable(getattr(StateStore, name)) and name != "close":
            setattr(store, name, timed("state store", getattr(store, name)))
    runtime = Runtime(policies)
    vault = runtime.vault("main")
    for name in ("read", "read_version", "stage", "read_staged", "promote", "discard_staged"):
        setattr(vault, name, timed("vault calls (hvac + OpenBao)", getattr(vault, name)))
    provider = runtime.provider("openai")
    for name in ("create", "verify", "revoke", "find_by_rotation", "identify"):
        setattr(provider, name, timed("provider calls (openai SDK + fake)",
                                      getattr(provider, name)))
    engine = Engine(policies, runtime, store)
    engine.sync_credentials()
    t0 = time.perf_counter()
    ctx = Context(policies, store, runtime, engine)
    results = rotate_now(ctx, list(policies.credentials), revoke_mode="grace", reason="bench")
    totals["wall"] = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        sys.exit(f"in-process run: {len(failed)} failed: {failed[0].message}")
    engine.close()
    runtime.close()
    store.close()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--credentials", type=int, default=100)
    args = parser.parse_args()
    n = args.credentials
    work = Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    with OpenBaoDevServer() as bao, FakeOpenAIServer() as fake:
        audit = AuditCounter(bao, work / "audit.log")
        project = fake.add_project()
        env = {**os.environ, "VAULT_TOKEN": bao.root_token}
        rot_config, _ = setup_fleet(bao, fake, project, n, "rot", work)
        _bare_config, bare_creds = setup_fleet(bao, fake, project, n, "bare", work)
        prof_config, _ = setup_fleet(bao, fake, project, n, "prof", work)
        spec = work / "bare.json"
        spec.write_text(json.dumps({"vault_url": bao.url, "base_url": fake.base_url,
                                    "project_id": project, "admin_path": "bare/admin",
                                    "concurrency": CONCURRENCY, "credentials": bare_creds}))

        # Warm the OS caches for both (imports), so neither pays a cold first start.
        subprocess.run([sys.executable, "-m", "rotator.cli", "--version"], env=env,
                       capture_output=True)

        a0, f0 = audit.count(), fake.request_count()
        rot_time = timed_process([sys.executable, "-m", "rotator.cli", "-c", str(rot_config),
                                  "rotate-now", "--all", "--yes"], env)
        a1, f1 = audit.count(), fake.request_count()
        bare_time = timed_process([sys.executable, str(ROOT / "bench" / "bare_rotation.py"),
                                   str(spec)], env)
        a2, f2 = audit.count(), fake.request_count()
        start_time = timed_process([sys.executable, "-m", "rotator.cli", "-c", str(rot_config),
                                    "check"], env)
        os.environ["VAULT_TOKEN"] = bao.root_token
        prof = profile_in_process(prof_config)

    rot_rate, bare_rate = n / rot_time, n / bare_time
    print(f"credentials rotated: {n} per run, concurrency {CONCURRENCY}, grace 0, no health check")
    print(f"external calls   rotator: {a1 - a0} OpenBao + {f1 - f0} OpenAI requests")
    print(f"                 bare:    {a2 - a1} OpenBao + {f2 - f1} OpenAI requests")
    print(f"rotator rotate-now --all: {rot_time:6.2f} s  {rot_rate:6.1f} rotations/s")
    print(f"bare script (the limit):  {bare_time:6.2f} s  {bare_rate:6.1f} rotations/s")
    print(f"ratio: rotator runs at {100 * rot_rate / bare_rate:.0f}% of the limit's rate")
    print("where rotator's own time goes:")
    print(f"  start-up (`rotator check`: imports, policy load, process): {start_time:.2f} s")
    wall = prof["wall"]
    for bucket in ("state store", "vault calls (hvac + OpenBao)",
                   "provider calls (openai SDK + fake)"):
        per = 1000 * prof[bucket] / n
        print(f"  {bucket:<36} {per:7.1f} ms per rotation "
              f"(summed over threads; {prof[bucket] / CONCURRENCY:.2f} s of {wall:.2f} s wall "
              "at full concurrency)")
    print(f"  policy load in process: {1000 * prof['load policies']:.0f} ms")


if __name__ == "__main__":
    main()
