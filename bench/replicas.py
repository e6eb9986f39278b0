"""Benchmark: rotations per second for 1, 2 and 3 `rotator run` replicas on one PostgreSQL.

The provider is the fake OpenAI Admin API with 50 ms added to every call (network-like latency;
a rotation makes four: create, verify, revoke, and the check that the old key is refused), the
vault a real OpenBao dev server, the state store a private PostgreSQL cluster. For each replica
count, in a fresh database:

1. ``rotator db upgrade``, then the replicas start and rotate every credential once (warm-up:
   new credentials are due at first sight);
2. timed rounds: every credential is made due at the same instant (``next_due_at = now``) and
   the round lasts from the first rotation's start to the last one's end, as recorded in the
   state store. Each round must rotate each credential exactly once (checked against the
   provider's create and delete counts).

    .venv/bin/python bench/replicas.py [--credentials 120] [--rounds 3] [--workers 8]

Throughput grows with replicas while the provider's latency is the limit; it levels off where
the machine's CPUs (every process here shares them) or the state store's serialised audit chain
become the limit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotator.testing.fake_openai import FakeOpenAIServer  # noqa: E402
from rotator.testing.openbao import OpenBaoDevServer  # noqa: E402
from rotator.testing.postgres import PostgresCluster  # noqa: E402

LATENCY = 0.05
REPLICAS = (1, 2, 3)


def seed(bao: OpenBaoDevServer, fake: FakeOpenAIServer, n: int, prefix: str
         ) -> tuple[str, list[dict[str, Any]]]:
    """A project, an admin key in the vault, and n service accounts each with a key in use."""
    client = bao.client()
    project = fake.add_project()
    client.secrets.kv.v2.create_or_update_secret(path=f"{prefix}/openai-admin",
                                                 secret={"key": fake.admin_key})
    creds = []
    for i in range(n):
        account = fake.add_service_account(project, name=f"agent-{i}")
        _, value = fake.seed_key(project, account, name="legacy")
        path = f"{prefix}/agents/agent-{i}"
        client.secrets.kv.v2.create_or_update_secret(path=path,
                                                     secret={"OPENAI_API_KEY": value})
        creds.append({"name": f"agent-{i}/openai", "agent": f"agent-{i}",
                      "provider": "openai", "vault": "main", "path": path,
                      "field": "OPENAI_API_KEY", "interval": "1h", "grace": "0s",
                      "params": {"service_account_id": account},
                      "health_check": {"type": "none"}})
    return project, creds


def policy_file(work: Path, state_url: str, bao: OpenBaoDevServer, fake: FakeOpenAIServer,
                project: str, prefix: str, creds: list[dict[str, Any]], workers: int) -> Path:
    doc = {
        "rotator": {"state_url": state_url, "jitter": "0s", "poll_interval": "1s",
                    "max_concurrent_rotations": workers, "metrics_address": "127.0.0.1:0"},
        "vaults": {"main": {"type": "vault", "url": bao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {"openai": {
            "type": "openai", "project_id": project, "base_url": fake.base_url,
            "admin_key": {"vault": "main", "path": f"{prefix}/openai-admin", "field": "key"}}},
        "credentials": creds,
    }
    path = work / "rotation-policies.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def process_cpu() -> tuple[float, float]:
    """CPU seconds used so far by (PostgreSQL, this benchmark's whole process tree): the tree is
    this process (and the fake provider in it), the replicas, PostgreSQL and OpenBao. Other
    load on the machine is what the machine was busy with beyond it."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    postgres: set[int] = set()
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        pid = int(entry.parent.name)
        fields = stat[stat.rindex(")") + 2:].split()
        parent[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
        if stat[stat.index("(") + 1:stat.rindex(")")] == "postgres":
            postgres.add(pid)

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parent.get(pid, 1)
        return False

    tree = {pid for pid in used if ours(pid)}
    return sum(used[p] for p in postgres & tree), sum(used[p] for p in tree)


def finished_rotations(conn: Any) -> int:
    return conn.execute("SELECT count(*) FROM rotations WHERE outcome = 'success'").fetchone()[0]


def wait_rotations(conn: Any, total: int, procs: list[subprocess.Popen[bytes]],
                   timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while finished_rotations(conn) < total:
        if any(p.poll() is not None for p in procs):
            sys.exit("a replica exited; see its log under the work directory")
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {total} rotations")
        time.sleep(0.05)


Round = tuple[float, float | None, float, float | None]


def timed_round(conn: Any, fake: FakeOpenAIServer, n: int, done_before: int,
                procs: list[subprocess.Popen[bytes]]) -> Round:
    """Make every credential due now. Returns rotations per second over the round, start to
    end; how busy the machine's CPUs were meanwhile (0-1); PostgreSQL's CPU seconds per
    rotation; and the share of the machine's CPUs busy with something else than this bench."""
    cpu_before, (pg_before, tree_before) = cpu_times(), process_cpu()
    started = time.monotonic()
    creates, deletes = (fake.request_count("POST", "/api_keys"),
                        fake.request_count("DELETE", "/api_keys/"))
    t0 = conn.execute("SELECT now() AT TIME ZONE 'utc'").fetchone()[0]
    conn.execute("UPDATE credentials SET next_due_at = %s", (t0,))
    wait_rotations(conn, done_before + n, procs)
    rows = conn.execute(
        "SELECT count(*), min(started_at), max(finished_at), count(DISTINCT credential) "
        "FROM rotations WHERE started_at >= %s", (t0,)).fetchone()
    cpu_after, (pg_after, tree_after) = cpu_times(), process_cpu()
    elapsed = time.monotonic() - started
    busy = other = None
    if cpu_before and cpu_after and cpu_after[1] > cpu_before[1]:
        busy = (cpu_after[0] - cpu_before[0]) / (cpu_after[1] - cpu_before[1])
        other = max(busy - (tree_after - tree_before) / (elapsed * (os.cpu_count() or 1)), 0.0)
    count, first, last, distinct = rows
    made = fake.request_count("POST", "/api_keys") - creates
    revoked = fake.request_count("DELETE", "/api_keys/") - deletes
    if count != n or distinct != n or made != n or revoked != n:
        sys.exit(f"round wrong: {count} rotations of {distinct} credentials, {made} keys "
                 f"created and {revoked} revoked for {n} credentials")
    return n / (last - first).total_seconds(), busy, (pg_after - pg_before) / n, other


def run_replicas(k: int, args: argparse.Namespace, pg: PostgresCluster, bao: OpenBaoDevServer,
                 fake: FakeOpenAIServer, work: Path
                 ) -> list[Round]:
    from psycopg import sql

    db = f"bench_{k}"
    with pg.connect_admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    prefix = f"bench{k}"
    project, creds = seed(bao, fake, args.credentials, prefix)
    url = f"postgresql+psycopg://{pg.superuser}@{pg.host}:{pg.port}/{db}"
    run_dir = work / f"replicas-{k}"
    run_dir.mkdir()
    config = policy_file(run_dir, url, bao, fake, project, prefix, creds, args.workers)
    env = {**os.environ, "VAULT_TOKEN": bao.root_token, "PGPASSWORD": pg.password.reveal(),
           "ROTATOR_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    rotator = [sys.executable, "-m", "rotator.cli"]
    subprocess.run([*rotator, "db", "upgrade"], env=env, check=True, capture_output=True)
    procs = [subprocess.Popen([*rotator, "run"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL,
                              stderr=(run_dir / f"replica-{i}.log").open("w"))
             for i in range(k)]
    rates = []
    try:
        with pg.connect_admin(dbname=db) as conn:
            wait_rotations(conn, args.credentials, procs)  # warm-up round
            for round_no in range(args.rounds):
                done = finished_rotations(conn)
                rates.append(timed_round(conn, fake, args.credentials, done, procs))
                rate, busy, pg, other = rates[-1]
                print(f"  {k} replica(s), round {round_no + 1}: {rate:6.1f} rotations/s"
                      + (f", CPUs {100 * busy:.0f}% busy ({100 * other:.0f}% not this bench)"
                         if busy is not None and other is not None else "")
                      + f", PostgreSQL {1000 * pg:.1f} ms CPU per rotation", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--credentials", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8,
                        help="max_concurrent_rotations of each replica")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rotator-replicas-bench-"))
    results: dict[int, tuple[float, float | None, float]] = {}
    try:
        with PostgresCluster(settings={"max_connections": "200"}) as pg, \
                OpenBaoDevServer() as bao, FakeOpenAIServer() as fake:
            fake.set_latency(LATENCY)
            for k in REPLICAS:
                rounds = run_replicas(k, args, pg, bao, fake, work)
                busy = [b for _, b, _, _ in rounds if b is not None]
                results[k] = (statistics.median(r for r, _, _, _ in rounds),
                              statistics.median(busy) if busy else None,
                              statistics.median(p for _, _, p, _ in rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.credentials} credentials due at once, {int(LATENCY * 1000)} ms per provider "
          f"call, {args.workers} workers per replica, {os.cpu_count()} CPU(s) shared by every "
          f"process (replicas, PostgreSQL, OpenBao, the fake provider); median of "
          f"{args.rounds} round(s)")
    print("replicas  rotations/s  vs 1 replica  CPUs busy  PostgreSQL CPU per rotation")
    base = results[1][0]
    for k, (rate, busy, pg_cpu) in results.items():
        shown = f"{100 * busy:8.0f}%" if busy is not None else "        -"
        print(f"{k:>8}  {rate:11.1f}  {rate / base:11.2f}x  {shown}  {1000 * pg_cpu:21.1f} ms")
    rate, _, pg_cpu = results[REPLICAS[-1]]
    print(f"with {REPLICAS[-1]} replicas PostgreSQL kept {100 * rate * pg_cpu:.0f}% of one CPU "
          f"busy at {rate:.1f} rotations/s")


if __name__ == "__main__":
    main()
