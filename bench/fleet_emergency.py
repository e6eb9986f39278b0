"""Benchmark: a fleet-wide emergency at the provider's rate limit (issue 16).

N OpenAI credentials (default 1,000), seeded as bench/rotate_now.py does (a real OpenBao dev
server, each secret written by rotator before, so no key needs identifying; SQLite state), the
fake OpenAI Admin API adding ``--latency`` (100 ms) to every call and limiting the admin key to
``--rate`` requests a second (a token bucket of one second's worth, 429 with ``Retry-After``
above it). Then ``rotator rotate-now --all --revoke-first --yes --concurrency N`` runs as a
process, N = ``--concurrency`` (64: enough workers to reach the limit; the daemon's default of
8 is not).

Measured from the fake's own request log, from the moment the command is started:

- every old key dead: the last accepted revoke (``DELETE`` of a seeded key id);
- every agent with a working key: the last vault promote (the creation time OpenBao recorded
  for each secret's current version); then, untimed, each secret is read back and the fake
  asked whether it accepts its key.

The floor is the admin calls an emergency needs (one revoke and one create per credential)
divided by the allowed rate; the aim is both times within 1.2x of it, with no rotation failed.
The number of 429s the fake answered is printed too.

    .venv/bin/python bench/fleet_emergency.py [--credentials 1000] [--rate 50] [--latency 0.1]
                                              [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rotate_now import setup_fleet  # noqa: E402
from rotator.testing.fake_openai import FakeOpenAIServer  # noqa: E402
from rotator.testing.openbao import OpenBaoDevServer  # noqa: E402

AIM = 1.2


def _vault_time(text: str) -> float:
    """OpenBao's RFC 3339 time (nanoseconds, ``Z``) as Unix seconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(head + "+00:00").timestamp()
    return whole + (float(f"0.{frac}") if frac else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--credentials", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0,
                        help="admin requests per second the fake allows (default 50)")
    parser.add_argument("--latency", type=float, default=0.1,
                        help="seconds the fake adds to every call (default 0.1)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="rotate-now --concurrency (default 64)")
    args = parser.parse_args()
    n = args.credentials
    work = Path(tempfile.mkdtemp(prefix="rotator-emergency-"))
    with OpenBaoDevServer() as bao, FakeOpenAIServer() as fake:
        project = fake.add_project()
        config, creds = setup_fleet(bao, fake, project, n, "em", work)
        seeded = {key["id"] for key in fake.live_keys(project)}
        env = {**os.environ, "VAULT_TOKEN": bao.root_token}
        subprocess.run([sys.executable, "-m", "rotator.cli", "status", "-c", str(config)],
                       env=env, capture_output=True, check=True)  # state store made, synced
        fake.set_latency(args.latency)
        fake.set_rate_limit(args.rate)
        logged_before = len(fake.answered())
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "rotator.cli", "rotate-now", "-c", str(config), "--all",
             "--revoke-first", "--concurrency", str(args.concurrency),
             "--reason", "bench: fleet emergency", "--yes", "--json"],
            env=env, capture_output=True, text=True)
        wall = time.time() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        throttled = fake.rate_limited_count
        fake.set_rate_limit(None)
        fake.set_latency(0)
        log = fake.answered()[logged_before:]
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            sys.exit(f"rotate-now gave no JSON ({proc.returncode}):\n{proc.stderr[-3000:]}")
        failed = report["failed"]

        admin = [a for a in log if "/organization/" in a.target]
        accepted_admin = [a for a in admin if a.status < 400 or a.status == 404]
        revokes = [a for a in admin if a.method == "DELETE" and a.status == 200
                   and a.target.rsplit("/", 1)[-1] in seeded]
        dead_at = max(a.answered_at for a in revokes) if revokes else float("nan")
        first_admin = min(a.at for a in admin) if admin else float("nan")

        # Untimed: each agent's secret holds a new key the provider accepts.
        client = bao.client()
        promoted_at, working = [], 0
        for cred in creds:
            meta = client.secrets.kv.v2.read_secret_metadata(path=cred["path"])["data"]
            current = meta["versions"][str(meta["current_version"])]
            promoted_at.append(_vault_time(current["created_time"]))
            value = client.secrets.kv.v2.read_secret_version(
                path=cred["path"], raise_on_deleted_version=True)["data"]["data"]
            key_id = meta["custom_metadata"].get("OPENAI_API_KEY.key_id")
            if key_id not in seeded and fake.is_valid(value["OPENAI_API_KEY"]):
                working += 1
        still_alive = seeded & {key["id"] for key in fake.live_keys(project)}
        working_at = max(promoted_at)

    floor = 2 * n / args.rate
    t_dead, t_working = dead_at - started, working_at - started
    print(f"fleet emergency: {n} OpenAI credentials, rotate-now --all --revoke-first, "
          f"{args.concurrency} workers; the fake adds {1000 * args.latency:.0f} ms a call and "
          f"allows the admin key {args.rate:g} requests/s")
    print(f"admin calls: {len(accepted_admin)} accepted (needed: {2 * n}), {throttled} "
          f"answered 429; all calls to the fake: {len(log)}")
    print(f"floor (admin calls needed / allowed rate): {floor:.1f} s")
    print(f"every old key dead:          {t_dead:6.1f} s  ({t_dead / floor:.2f}x the floor)")
    print(f"every agent a working key:   {t_working:6.1f} s  ({t_working / floor:.2f}x the floor)")
    print(f"  (from the first admin call: dead {dead_at - first_admin:.1f} s, working "
          f"{working_at - first_admin:.1f} s; process start-up "
          f"{first_admin - started:.1f} s; command wall time {wall:.1f} s)")
    print(f"rotations failed: {failed} of {n}; agents with a new key the provider accepts: "
          f"{working} of {n}; old keys still alive: {len(still_alive)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"CPU of rotate-now: {cpu:.1f} s (2 cores, shared with OpenBao and the fake)")
    met = failed == 0 and max(t_dead, t_working) <= AIM * floor
    print(f"aim (within {AIM}x of the floor, no rotation failed): {'met' if met else 'NOT met'}")
    if proc.returncode not in (0, 1):
        print(proc.stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
