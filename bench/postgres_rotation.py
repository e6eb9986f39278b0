"""Benchmark: PostgreSQL role passwords, rotator against OpenBao's own database secrets engine.

In one private PostgreSQL cluster, N roles (default 100) are rotated twice per round:

1. by ``rotator rotate-now --all --yes`` (a fresh process; strategy ``single``, OpenBao dev
   server as the vault, health check none, grace 0, ``max_concurrent_rotations`` 8): per role
   a vault read, a generated password staged in the vault, ``ALTER ROLE`` with a SCRAM verifier
   and the marker comment in one transaction, a login with the new password (verify), the
   vault version promoted, and a login with the old password that must fail (revoke check);
2. by OpenBao's database secrets engine (built-in ``postgresql-database-plugin``, one static
   role per PostgreSQL role, ``password_authentication = scram-sha-256`` so it too sends only
   verifiers): ``database/rotate-role/<name>`` for every role from 8 threads. OpenBao sets the
   password and stores it; it does not log in with it.

After each, untimed, every role is logged into with the password its side now serves (the
rotator's from the KV secret, OpenBao's from ``database/static-creds``), so a fast wrong answer
cannot pass. Rounds alternate the two and the medians are reported.

    .venv/bin/python bench/postgres_rotation.py [--roles 100] [--rounds 3]

It needs the ``postgres`` provider registered as the ``rotator.providers`` entry point; until
the package is reinstalled with it, the rotator process is started through a shim that
registers ``providers.postgres.provider:PostgresProvider`` in that process only (said in the
output).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from providers.postgres.provider import generate_password  # noqa: E402
from providers.postgres.scram import scram_sha256_verifier  # noqa: E402
from rotator.testing.openbao import OpenBaoDevServer  # noqa: E402
from rotator.testing.postgres import PostgresCluster  # noqa: E402

CONCURRENCY = 8
ADMIN = "rotator_bench_admin"
FIELD = "PGPASSWORD"
SHIM = """\
import sys
from rotator import plugins
from providers.postgres.provider import PostgresProvider
real_class, real_types = plugins.provider_class, plugins.provider_types
plugins.provider_class = lambda t: PostgresProvider if t == "postgres" else real_class(t)
plugins.provider_types = lambda: sorted({*real_types(), "postgres"})
from rotator.cli import console_main
sys.argv = ["rotator", *sys.argv[1:]]
console_main()
"""


def entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "postgres" for ep in entry_points(group="rotator.providers"))


def setup_cluster(pg: PostgresCluster, n: int, admin_password: str) -> list[tuple[str, str]]:
    """The admin role (CREATEROLE, as in production) and n login roles, each with a password
    and the marker rotator would have left, as if rotator had rotated them before."""
    from psycopg import sql

    roles = []
    with pg.connect_admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
            sql.Identifier(ADMIN), sql.Literal(scram_sha256_verifier(admin_password))))
        for i in range(n):
            role, password = f"bench_r{i:03d}", generate_password()
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(scram_sha256_verifier(password))))
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS 'rotator:seed'").format(
                sql.Identifier(role)))
            roles.append((role, password))
    return roles


def setup_rotator(bao: OpenBaoDevServer, pg: PostgresCluster, roles: list[tuple[str, str]],
                  admin_password: str, work: Path) -> Path:
    """KV secrets holding each role's password (metadata as rotator writes it) and a policy
    file rotating them all."""
    client = bao.client()
    client.secrets.kv.v2.create_or_update_secret(path="bench/pg-admin",
                                                 secret={"password": admin_password})
    for role, password in roles:
        path = f"bench/agents/{role}"
        version = client.secrets.kv.v2.create_or_update_secret(
            path=path, secret={FIELD: password, "PGHOST": pg.host})["data"]["version"]
        client.secrets.kv.v2.update_metadata(path=path, custom_metadata={
            f"{FIELD}.key_id": f"{role}@seed", f"{FIELD}.rotation_id": "seed",
            f"{FIELD}.version": str(version)})
    doc: dict[str, Any] = {
        "rotator": {"state_url": f"sqlite:///{work / 'state.db'}", "jitter": "0s",
                    "max_concurrent_rotations": CONCURRENCY},
        "vaults": {"main": {"type": "vault", "url": bao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {"pg": {"type": "postgres", "host": pg.host, "port": pg.port,
                             "dbname": "postgres", "admin_user": ADMIN, "sslmode": "disable",
                             "admin_password": {"vault": "main", "path": "bench/pg-admin",
                                                "field": "password"}}},
        "credentials": [{"name": f"{role}/pg", "agent": role, "provider": "pg",
                         "vault": "main", "path": f"bench/agents/{role}", "field": FIELD,
                         "interval": "30d", "grace": "0s",
                         "params": {"strategy": "single", "role": role},
                         "health_check": {"type": "none"}} for role, _ in roles],
    }
    config = work / "rotation-policies.toml"
    config.write_text(tomli_w.dumps(doc))
    return config


def setup_openbao_engine(bao: OpenBaoDevServer, pg: PostgresCluster,
                         roles: list[tuple[str, str]], admin_password: str) -> None:
    """``database/`` with one PostgreSQL connection and a static role per PostgreSQL role.
    Creating a static role rotates its password once: that is set-up, not timed."""
    client = bao.client()
    plugin = client.adapter.get("/v1/sys/plugins/catalog/database/postgresql-database-plugin")
    if not plugin["data"].get("builtin"):
        sys.exit("this bao binary has no built-in postgresql-database-plugin")
    client.sys.enable_secrets_engine("database", path="database")
    client.adapter.post("/v1/database/config/pg", json={
        "plugin_name": "postgresql-database-plugin",
        "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.host}:{pg.port}"
                          "/postgres?sslmode=disable",
        "username": ADMIN, "password": admin_password,
        "password_authentication": "scram-sha-256", "allowed_roles": "*",
        "max_open_connections": CONCURRENCY,
    })
    for role, _ in roles:
        client.adapter.post(f"/v1/database/static-roles/{role}",
                            json={"db_name": "pg", "username": role, "rotation_period": "24h"})


def rotate_with_openbao(bao: OpenBaoDevServer, roles: list[tuple[str, str]]) -> float:
    """``database/rotate-role/<name>`` for every role, CONCURRENCY at a time; wall seconds."""
    local = threading.local()

    def rotate(role: str) -> None:
        if not hasattr(local, "client"):
            local.client = bao.client()
        local.client.adapter.post(f"/v1/database/rotate-role/{role}")

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(rotate, [role for role, _ in roles]))
    return time.perf_counter() - started


def rotate_with_rotator(config: Path, env: dict[str, str], shim: bool) -> float:
    argv = ([sys.executable, "-c", SHIM] if shim else [sys.executable, "-m", "rotator.cli"])
    argv += ["rotate-now", "-c", str(config), "--all", "--yes", "--reason", "bench"]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=config.parent)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"rotator rotate-now failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    return elapsed


def startup_seconds(config: Path, env: dict[str, str], shim: bool) -> float:
    """What a rotator process costs before it rotates anything (`rotator status`)."""
    argv = ([sys.executable, "-c", SHIM] if shim else [sys.executable, "-m", "rotator.cli"])
    started = time.perf_counter()
    subprocess.run([*argv, "status", "--json", "-c", str(config)], env=env,
                   capture_output=True, check=True, cwd=config.parent)
    return time.perf_counter() - started


def logins_ok(pg: PostgresCluster, pairs: list[tuple[str, str]]) -> int:
    """How many (role, password) pairs log in; CONCURRENCY at a time."""
    import psycopg

    def ok(pair: tuple[str, str]) -> bool:
        try:
            with psycopg.connect(pg.dsn_for(pair[0], pair[1]), connect_timeout=5):
                return True
        except psycopg.OperationalError:
            return False

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return sum(pool.map(ok, pairs))


def rotator_passwords(bao: OpenBaoDevServer, roles: list[tuple[str, str]]) -> list[tuple[str,
                                                                                          str]]:
    client = bao.client()
    return [(role, client.secrets.kv.v2.read_secret_version(
        path=f"bench/agents/{role}", raise_on_deleted_version=True)["data"]["data"][FIELD])
        for role, _ in roles]


def openbao_passwords(bao: OpenBaoDevServer, roles: list[tuple[str, str]]) -> list[tuple[str,
                                                                                          str]]:
    client = bao.client()
    return [(role, client.adapter.get(f"/v1/database/static-creds/{role}")["data"]["password"])
            for role, _ in roles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roles", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.roles
    shim = not entry_point_installed()
    work = Path(tempfile.mkdtemp(prefix="rotator-pg-bench-"))
    admin_password = generate_password()
    pg = PostgresCluster(settings={"max_connections": "200"})
    try:
        with pg, OpenBaoDevServer() as bao:
            roles = setup_cluster(pg, n, admin_password)
            config = setup_rotator(bao, pg, roles, admin_password, work)
            setup_openbao_engine(bao, pg, roles, admin_password)
            env = {**os.environ, "VAULT_TOKEN": bao.root_token, "PYTHONPATH": str(ROOT)}
            rot_times, bao_times = [], []
            for round_no in range(1, args.rounds + 1):
                before = rotator_passwords(bao, roles)
                rot_times.append(rotate_with_rotator(config, env, shim))
                after = rotator_passwords(bao, roles)
                changed = sum(a[1] != b[1] for a, b in zip(after, before, strict=True))
                good = logins_ok(pg, after)
                if changed != n or good != n:
                    sys.exit(f"round {round_no}: rotator changed {changed} of {n} passwords and "
                             f"{good} of {n} log in")
                bao_times.append(rotate_with_openbao(bao, roles))
                good = logins_ok(pg, openbao_passwords(bao, roles))
                if good != n:
                    sys.exit(f"round {round_no}: {good} of {n} OpenBao passwords log in")
                print(f"round {round_no}: rotator {rot_times[-1]:.2f} s, OpenBao "
                      f"{bao_times[-1]:.2f} s (all {n} new passwords log in on both sides)",
                      flush=True)
            start = startup_seconds(config, env, shim)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rot, bao_t = statistics.median(rot_times), statistics.median(bao_times)
    rot_rate, bao_rate = n / rot, n / bao_t
    net = max(rot - start, 1e-9)
    print(f"\nPostgreSQL roles rotated: {n} per run, concurrency {CONCURRENCY}, "
          f"{args.rounds} round(s), medians")
    if shim:
        print("(the `postgres` entry point is not installed: rotator ran through a shim that "
              "registers providers.postgres.provider in its own process)")
    print(f"rotator rotate-now --all:        {rot:6.2f} s  {rot_rate:6.1f} rotations/s  "
          f"({', '.join(f'{t:.2f}' for t in rot_times)})")
    print(f"  of which process start-up:     {start:6.2f} s  (`rotator status`); without it "
          f"{n / net:6.1f} rotations/s")
    print(f"OpenBao database/rotate-role:    {bao_t:6.2f} s  {bao_rate:6.1f} rotations/s  "
          f"({', '.join(f'{t:.2f}' for t in bao_times)})")
    print(f"ratio: rotator runs at {100 * rot_rate / bao_rate:.0f}% of OpenBao's rate "
          f"({100 * (n / net) / bao_rate:.0f}% without start-up)")
    print("per rotation, rotator also keeps the state store and audit trail, stages and "
          "promotes a KV version, logs in with the new password and checks the old one is "
          "refused; OpenBao sets the password and stores it")


if __name__ == "__main__":
    main()
