"""Benchmark: how long one `/metrics` scrape takes with 1,000 and 10,000 credentials configured.

For each size it writes a policy file with that many credentials, lets the engine register them
in a fresh SQLite state store (each with a last-rotation time, as after a first round), primes
the counters as `rotator run` does, feeds one finished rotation per credential so every series
has data, serves `/metrics` on a free loopback port exactly as the daemon does, and times full
HTTP scrapes. Prometheus's default scrape timeout is 10 s; the aim is under 0.5 s at 10,000.

    .venv/bin/python bench/metrics_scrape.py [--sizes 1000 10000] [--scrapes 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotator.config import load_policies  # noqa: E402
from rotator.engine import Engine  # noqa: E402
from rotator.events import PluginCall, RotationFinished, StepFinished  # noqa: E402
from rotator.metrics import Metrics  # noqa: E402
from rotator.runtime import Runtime  # noqa: E402
from rotator.state.store import StateStore  # noqa: E402

STEPS = ("prepare", "create", "verify", "store", "health", "grace", "revoke")


def write_policies(work: Path, n: int) -> Path:
    doc = {
        "rotator": {"state_url": f"sqlite:///{work / 'state.db'}", "jitter": "0s"},
        "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:1",
                            "token_env": "VAULT_TOKEN"}},
        "providers": {f"openai-{p}": {"type": "openai", "project_id": f"proj_{p}",
                                      "base_url": "http://127.0.0.1:1/v1",
                                      "admin_key": {"env": "OPENAI_ADMIN_KEY"}}
                      for p in range(4)},
        "credentials": [{"name": f"agent-{i}/openai", "agent": f"agent-{i}",
                         "provider": f"openai-{i % 4}", "vault": "main",
                         "path": f"agents/agent-{i}", "field": "OPENAI_API_KEY",
                         "interval": "30d", "grace": "1h",
                         "params": {"service_account_id": f"svc_{i}"}} for i in range(n)],
    }
    path = work / "rotation-policies.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def build(work: Path, n: int) -> tuple[Metrics, StateStore, float]:
    t0 = time.perf_counter()
    policies = load_policies(write_policies(work, n))
    store = StateStore(policies.settings.state_url, create=True)
    runtime = Runtime(policies)
    engine = Engine(policies, runtime, store)
    engine.sync_credentials()
    now = datetime.now(UTC)
    for state in store.credentials():
        store.update_credential(state.name, last_rotated_at=now - timedelta(days=3))
    metrics = Metrics(store, lambda: policies, due=engine.due_decisions)
    metrics.prime(policies)
    for cred in policies.credentials:
        for step in STEPS:
            metrics.on_event(StepFinished("r1", cred.name, cred.agent, cred.provider, step,
                                          "succeeded", 0.05, None, now))
        metrics.on_event(RotationFinished("r1", cred.name, cred.agent, cred.provider,
                                          "schedule", "success", 1.2, None, now))
        metrics.on_call(PluginCall("provider", cred.provider, "create", "ok", 0.02, 1))
    return metrics, store, time.perf_counter() - t0


def scrape(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - t0, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--scrapes", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="rotator-bench-metrics-") as tmp:
            metrics, store, setup = build(Path(tmp), n)
            url = f"http://{metrics.serve('127.0.0.1:0')}/metrics"
            try:
                scrape(url)  # warm-up: first SQLAlchemy compile of the queries
                times, size = [], 0
                for _ in range(args.scrapes):
                    took, size = scrape(url)
                    times.append(took)
            finally:
                metrics.close()
                store.close()
        median = statistics.median(times)
        rows.append((n, median, min(times), max(times), size))
        print(f"{n:>6} credentials: scrape median {median * 1000:7.1f} ms "
              f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, {size / 1e6:.2f} MB, "
              f"set-up {setup:.1f} s)", flush=True)
    if len(rows) >= 2:
        (n1, t1, *_), (n2, t2, *_) = rows[0], rows[-1]
        print(f"growth: {n2 / n1:.0f}x credentials -> {t2 / t1:.1f}x scrape time "
              f"({t1 / n1 * 1e6:.1f} vs {t2 / n2 * 1e6:.1f} us per credential)")


if __name__ == "__main__":
    main()
