"""Benchmark: what misuse monitoring costs for a fleet of 1,000 keys.

1,000 OpenAI credentials on the fake OpenAI Admin API, each key with a week of synthetic
history (a few calls every hour), polled by the daemon's usage monitor in-process against a
SQLite state store. It prints, for the first poll (which backfills the baseline: 8 days of
hourly buckets) and for a steady-state poll: the calls made to the usage API, the wall time,
the buckets written; then the state store's growth per day at one poll every
``usage_poll_interval`` (from rows per day and the measured bytes per row), and what the rules
cost per poll. Every figure is measured here, in this run.

    .venv/bin/python bench/usage_poll.py [--keys 1000] [--history-days 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotator.app import App  # noqa: E402
from rotator.config import load_policies  # noqa: E402
from rotator.monitor.poller import UsageMonitor  # noqa: E402
from rotator.testing.fake_openai import FakeOpenAIServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--history-days", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="usage-bench-"))
    fake = FakeOpenAIServer().start()
    try:
        project = fake.add_project()
        now = time.time()
        creds, keys = [], {}
        for i in range(args.keys):
            account = fake.add_service_account(project, name=f"a{i}")
            key_id, _ = fake.seed_key(project, account, name=f"a{i}")
            keys[f"a{i}/openai"] = key_id
            for hour in range(0, args.history_days * 24, 6):  # a record every 6 hours
                fake.record_usage(key_id, now - hour * 3600 - 60, requests=5, input_tokens=500)
            creds.append({"name": f"a{i}/openai", "agent": f"a{i}", "provider": "openai",
                          "vault": "main", "path": f"agents/a{i}", "field": "OPENAI_API_KEY",
                          "params": {"service_account_id": account}})
        state = work / "state.db"
        config = work / "rotation-policies.toml"
        config.write_text(tomli_w.dumps({
            "rotator": {"state_url": f"sqlite:///{state}", "usage_poll_interval": "5m"},
            "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:9",
                                "token_env": "VAULT_TOKEN"}},
            "providers": {"openai": {"type": "openai", "project_id": project,
                                     "base_url": fake.base_url,
                                     "admin_key": {"env": "BENCH_ADMIN_KEY"}}},
            "credentials": creds}))
        os.environ["BENCH_ADMIN_KEY"] = fake.admin_key
        app = App(load_policies(config), actor="bench")
        app.engine.sync_credentials()
        for name, key_id in keys.items():  # as after a first rotation: the key id is known
            app.store.update_credential(name, current_key_id=key_id)
        monitor = UsageMonitor(app, lambda: datetime.now(UTC))
        try:
            print(f"{args.keys} keys, {args.history_days} days of history at the fake "
                  f"OpenAI usage API")
            for label in ("first poll (backfill)", "steady-state poll"):
                before = fake.request_count(path_contains="/usage/")
                rows_before = app.store.count_usage_rows()
                t0 = time.perf_counter()
                result = monitor.poll("openai")
                elapsed = time.perf_counter() - t0
                calls = fake.request_count(path_contains="/usage/") - before
                written = app.store.count_usage_rows() - rows_before
                print(f"  {label}: {calls} usage API call(s), {elapsed:.2f} s, "
                      f"{result.buckets} bucket(s) read, {written} new row(s), "
                      f"outcome {result.outcome}")
            rows = app.store.count_usage_rows()
            size = state.stat().st_size + (state.with_suffix(".db-wal").stat().st_size
                                           if state.with_suffix(".db-wal").exists() else 0)
            per_row = size / max(rows, 1)
            active_per_day = args.keys * 24  # each key used every hour: the worst case
            print(f"  store: {rows} usage rows, {size / 1e6:.1f} MB on disk "
                  f"(~{per_row:.0f} bytes per row, indexes included)")
            print(f"  growth per day if every key is used every hour: {active_per_day} rows, "
                  f"~{active_per_day * per_row / 1e6:.1f} MB/day; kept usage_retention (35d): "
                  f"~{active_per_day * 35 * per_row / 1e6:.0f} MB at most")
            t0 = time.perf_counter()
            for cred in app.policies.credentials:
                monitor._rows(cred, datetime.now(UTC), monitor_keep())
            print(f"  reading every credential's buckets for the rules: "
                  f"{time.perf_counter() - t0:.2f} s")
        finally:
            app.close(1.0)
    finally:
        fake.stop()


def monitor_keep():  # the window the rules read: baseline (7d) plus the last day
    from datetime import timedelta

    return timedelta(days=8)


if __name__ == "__main__":
    main()
