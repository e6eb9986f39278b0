"""Benchmark: `rotator rotate-now --all` against the limit of this machine.

Rotates N credentials (default 100) with `rotator rotate-now --all --yes` against a real OpenBao
and the fake OpenAI Admin API (grace 0, health check none, max_concurrent_rotations 8), and, in
the same run, a bare script (bench/bare_rotation.py) that makes the same external calls for the
same credentials with the same concurrency and no bookkeeping. Both run as fresh processes, so
start-up counts for both. The fake's request log and a request counter around hvac
(bench/count_vault_calls.py) count the external calls of each, to show they match.

Then rotator runs the same workload again in-process with timers around the state store and the
plugin calls, to show where its own time goes.

    .venv/bin/python bench/rotate_now.py [--credentials 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


CPU_SECONDS: dict[str, float] = {}


def timed_process(argv: list[str], env: dict[str, str], label: str = "") -> float:
    """Wall time of a child process; its CPU time (user + system) goes to CPU_SECONDS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS[label] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"{argv[:3]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-2000:]}")
    return elapsed


def profile_in_process(config: Path) -> dict[str, float]:
    """Rotate the fleet in this process with timers around the store and the plugins."""
    from rotator.audit import AuditLog
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
    audit = AuditLog(store)
    engine.listeners.append(audit.listener("bench"))
    ctx = Context(policies, store, runtime, engine, audit)
    results = rotate_now(ctx, list(policies.credentials), revoke_mode="grace", reason="bench")
    totals["wall"] = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        sys.exit(f"in-process run: {len(failed)} failed: {failed[0].message}")
    engine.close()
    runtime.close()
    store.close()
    return totals


def metrics_cost(config: Path, with_metrics: bool) -> tuple[float, float]:
    """Rotate the fleet in process with or without the daemon's metrics hooks attached;
    return (wall seconds, seconds spent inside the hooks)."""
    from rotator.audit import AuditLog
    from rotator.config import load_policies
    from rotator.engine import Engine
    from rotator.metrics import Metrics
    from rotator.runtime import Runtime
    from rotator.service import Context, rotate_now
    from rotator.state.store import StateStore

    policies = load_policies(config)
    store = StateStore(policies.settings.state_url)
    runtime = Runtime(policies)
    engine = Engine(policies, runtime, store)
    engine.sync_credentials()
    inside = [0.0]
    lock = threading.Lock()
    if with_metrics:
        metrics = Metrics(store, lambda: policies)
        metrics.prime(policies)

        def hook(fn: Callable[[Any], None]) -> Callable[[Any], None]:
            def timed(event: Any) -> None:
                t0 = time.perf_counter()
                fn(event)
                with lock:
                    inside[0] += time.perf_counter() - t0
            return timed

        engine.listeners.append(hook(metrics.on_event))
        engine.call_observers.append(hook(metrics.on_call))
    audit = AuditLog(store)
    engine.listeners.append(audit.listener("bench"))
    ctx = Context(policies, store, runtime, engine, audit)
    t0 = time.perf_counter()
    results = rotate_now(ctx, list(policies.credentials), revoke_mode="grace", reason="bench")
    wall = time.perf_counter() - t0
    if not all(r.ok for r in results):
        sys.exit("metrics comparison: a rotation failed")
    engine.close()
    runtime.close()
    store.close()
    return wall, inside[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--credentials", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.credentials
    work = Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    with OpenBaoDevServer() as bao, FakeOpenAIServer() as fake:
        project = fake.add_project()
        env = {**os.environ, "VAULT_TOKEN": bao.root_token}
        # Alternate the two, on fresh credentials each round, and keep the medians: the
        # machine's two cores are shared by OpenBao, the fake and the process measured.
        rot_times, bare_times, rot_calls, bare_calls = [], [], [], []
        for round_no in range(args.rounds):
            rot_config, _ = setup_fleet(bao, fake, project, n, f"rot{round_no}", work)
            _, bare_creds = setup_fleet(bao, fake, project, n, f"bare{round_no}", work)
            spec = work / f"bare{round_no}.json"
            spec.write_text(json.dumps({"vault_url": bao.url, "base_url": fake.base_url,
                                        "project_id": project,
                                        "admin_path": f"bare{round_no}/admin",
                                        "concurrency": CONCURRENCY,
                                        "credentials": bare_creds}))
            rot_argv = [sys.executable, "-m", "rotator.cli", "rotate-now", "-c",
                        str(rot_config), "--all", "--yes"]
            bare_argv = [sys.executable, str(ROOT / "bench" / "bare_rotation.py"), str(spec)]
            f0 = fake.request_count()
            rot_times.append(timed_process(rot_argv, env, "rotator"))
            f1 = fake.request_count()
            bare_times.append(timed_process(bare_argv, env, "bare"))
            f2 = fake.request_count()
            rot_calls.append(f1 - f0)
            bare_calls.append(f2 - f1)
        rot_time, bare_time = statistics.median(rot_times), statistics.median(bare_times)
        prof_config, _ = setup_fleet(bao, fake, project, n, "prof", work)
        start_time = timed_process([sys.executable, "-m", "rotator.cli", "status", "--json",
                                    "-c", str(rot_config)], env)
        sdk_time = timed_process([sys.executable, "-c", "import openai, hvac"], env)
        # Count vault calls in a separate, untimed pass on fresh credentials of each kind.
        counter = [sys.executable, str(ROOT / "bench" / "count_vault_calls.py")]
        count_rot, _ = setup_fleet(bao, fake, project, 10, "crot", work)
        _, count_creds = setup_fleet(bao, fake, project, 10, "cbare", work)
        count_spec = work / "cbare.json"
        count_spec.write_text(json.dumps({**json.loads(spec.read_text()),
                                          "admin_path": "cbare/admin",
                                          "credentials": count_creds}))
        timed_process([*counter, str(work / "vault-rot"), "-m", "rotator.cli", "rotate-now",
                       "-c", str(count_rot), "--all", "--yes"], env)
        timed_process([*counter, str(work / "vault-bare"), str(bare_argv[1]), str(count_spec)],
                      env)
        vault_rot = int((work / "vault-rot").read_text())
        vault_bare = int((work / "vault-bare").read_text())
        os.environ["VAULT_TOKEN"] = bao.root_token
        prof = profile_in_process(prof_config)
        on_walls, off_walls, hook_times = [], [], []
        for round_no in range(args.rounds):
            on_config, _ = setup_fleet(bao, fake, project, n, f"mon{round_no}", work)
            off_config, _ = setup_fleet(bao, fake, project, n, f"moff{round_no}", work)
            wall, inside = metrics_cost(on_config, True)
            on_walls.append(wall)
            hook_times.append(inside)
            off_walls.append(metrics_cost(off_config, False)[0])

    rot_rate, bare_rate = n / rot_time, n / bare_time
    print(f"credentials rotated: {n} per run, concurrency {CONCURRENCY}, grace 0, no health check")
    print(f"OpenAI requests  rotator: {rot_calls[0]}, bare: {bare_calls[0]} (per round of {n})")
    print(f"vault requests   rotator: {vault_rot}, bare: {vault_bare} (for 10 credentials, "
          "counted in a separate untimed pass)")
    print(f"rotator rotate-now --all: {rot_time:6.2f} s  {rot_rate:6.1f} rotations/s   "
          f"(median of {', '.join(f'{t:.2f}' for t in rot_times)})")
    print(f"bare script (the limit):  {bare_time:6.2f} s  {bare_rate:6.1f} rotations/s   "
          f"(median of {', '.join(f'{t:.2f}' for t in bare_times)})")
    print(f"ratio: rotator runs at {100 * rot_rate / bare_rate:.0f}% of the limit's rate")
    print(f"CPU of the process (last round): rotator {CPU_SECONDS['rotator']:.2f} s, bare "
          f"{CPU_SECONDS['bare']:.2f} s (2 cores, shared with OpenBao and the fake)")
    print("where rotator's own time goes:")
    print(f"  start-up: `rotator status` (process, imports, policy load, state store open, "
          f"{n} credentials synced) {start_time:.2f} s; importing the SDKs {sdk_time:.2f} s "
          "(the bare script pays that too)")
    wall = prof["wall"]
    for bucket in ("state store", "vault calls (hvac + OpenBao)",
                   "provider calls (openai SDK + fake)"):
        per = 1000 * prof[bucket] / n
        print(f"  {bucket:<36} {per:7.1f} ms per rotation "
              f"(summed over threads; {prof[bucket] / CONCURRENCY:.2f} s of {wall:.2f} s wall "
              "at full concurrency)")
    print(f"  policy load in process: {1000 * prof['load policies']:.0f} ms")
    on, off = statistics.median(on_walls), statistics.median(off_walls)
    hooks = statistics.median(hook_times)
    print(f"metrics on/off (in process, median of {args.rounds}): on {on:.2f} s, off {off:.2f} s "
          f"({100 * (on - off) / off:+.1f}%; runs: on {min(on_walls):.2f}-{max(on_walls):.2f}, "
          f"off {min(off_walls):.2f}-{max(off_walls):.2f}); time inside the metric updates: "
          f"{1e6 * hooks / n:.0f} us per rotation ({100 * hooks / on / CONCURRENCY:.2f}% of the "
          "threads' time)")


if __name__ == "__main__":
    main()
