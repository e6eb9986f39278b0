"""Benchmark: a 10,000-credential fleet, as an operator meets it (issue 16's fleet figures).

Writes a policy file with N credentials (default 10,000) on four OpenAI providers, with a real
OpenBao dev server as the vault (every credential's secret present in it) and the fake OpenAI
Admin API as the provider, and a SQLite state store in a temporary directory. Every credential
has a rotation ``window`` that is closed for the next two days, so the daemon rotates nothing
while it is measured (a never-rotated credential is otherwise due at once: see
``rotator.policy``). Each figure is a separate process, as an operator would run it:

- ``rotator run`` from process start to ready: systemd's ``READY=1`` (sd_notify, received on a
  ``NOTIFY_SOCKET`` of our own), which the daemon sends once /metrics is bound, interrupted
  work resumed and the scheduler running; ``/readyz`` is checked to answer 200 then. Once with
  an empty state store (first start) and once with the store already synced (second start);
- the daemon's resident memory (``VmRSS`` in /proc/PID/status) once ready and after the
  scrapes and commands, and its peak (``VmHWM``);
- ``rotator status``, ``status --json``, ``plan`` and ``plan --json`` wall time (best of
  ``--repeat``), run while the daemon runs;
- a full HTTP ``/metrics`` scrape of the running daemon (median and worst of ``--scrapes``),
  right after ready and again once settled: after the first usage poll of every provider
  finished (``rotator_usage_polls_total``), or ``--settle`` seconds at most.

The aims (issue 16): ready under 5 s, under 300 MB resident, a scrape under 100 ms; status and
plan under 3 s. The last lines check that nothing rotated (the due reasons on the scrape).

    .venv/bin/python bench/fleet_scale.py [--credentials 10000] [--scrapes 9] [--repeat 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotator.testing.fake_openai import FakeOpenAIServer  # noqa: E402
from rotator.testing.openbao import OpenBaoDevServer  # noqa: E402
from rotator.testing.server_process import free_port  # noqa: E402

PROVIDERS = 4
READY_TIMEOUT = 300.0
AIMS = {"ready": 5.0, "rss_mb": 300.0, "scrape": 0.100, "command": 3.0}
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def closed_window() -> str:
    """A one-hour weekly window that opens two days from now (UTC): closed while we measure,
    so every never-rotated credential answers ``outside_window`` instead of being due."""
    day = (datetime.now(UTC) + timedelta(days=2)).weekday()
    return f"{DAYS[day]} 00:00-01:00 UTC"


def seed_vault(bao: OpenBaoDevServer, n: int) -> None:
    """Each agent's key in the vault (a fake value), as in a fleet rotator already manages;
    eight writers at once, or seeding would take longer than the measurement."""
    local = threading.local()

    def write(i: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = bao.client()
        client.secrets.kv.v2.create_or_update_secret(
            path=f"fleet/agents/a{i}", secret={"OPENAI_API_KEY": f"sk-bench-{i:06d}"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(n)))


def write_policies(work: Path, n: int, bao: OpenBaoDevServer, fake: FakeOpenAIServer,
                   metrics_port: int) -> Path:
    project = fake.add_project()
    bao.client().secrets.kv.v2.create_or_update_secret(path="fleet/admin",
                                                       secret={"key": fake.admin_key})
    accounts = [fake.add_service_account(project, name=f"a{i}") for i in range(n)]
    window = closed_window()
    doc = {
        "rotator": {"state_url": f"sqlite:///{work / 'state.db'}",
                    "metrics_address": f"127.0.0.1:{metrics_port}",
                    "jitter": "10m", "max_concurrent_rotations": 8},
        "vaults": {"main": {"type": "vault", "url": bao.url, "token_env": "VAULT_TOKEN"}},
        "providers": {f"openai-{p}": {"type": "openai", "project_id": project,
                                      "base_url": fake.base_url,
                                      "admin_key": {"vault": "main", "path": "fleet/admin",
                                                    "field": "key"}}
                      for p in range(PROVIDERS)},
        "credentials": [{"name": f"a{i}/openai", "agent": f"a{i}",
                         "provider": f"openai-{i % PROVIDERS}", "vault": "main",
                         "path": f"fleet/agents/a{i}", "field": "OPENAI_API_KEY",
                         "interval": "30d", "grace": "1h", "window": window,
                         "params": {"service_account_id": accounts[i]},
                         "health_check": {"type": "none"}} for i in range(n)],
    }
    path = work / "rotation-policies.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def http_get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class RunningDaemon:
    """``rotator run`` in a child process, timed from spawn to its ``READY=1``."""

    def __init__(self, config: Path, env: dict[str, str], work: Path, port: int,
                 label: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = work / f"daemon-{label}.log"
        sock_path = work / f"notify-{label}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(sock_path))
        self.log = self.log_path.open("w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rotator.cli", "run", "-c", str(config)],
            env={**env, "NOTIFY_SOCKET": str(sock_path)}, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.ready_seconds = self._wait_ready(started)

    def _wait_ready(self, started: float) -> float:
        self.sock.settimeout(0.2)
        while time.perf_counter() - started < READY_TIMEOUT:
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    sys.exit(f"rotator run exited {self.proc.returncode}:\n"
                             f"{self.log_path.read_text()[-3000:]}")
                continue
            if "READY=1" in message.split("\n"):
                return time.perf_counter() - started
        self.stop()
        sys.exit(f"rotator run not ready after {READY_TIMEOUT:.0f} s")

    def readyz(self) -> int:
        return http_get(f"{self.base}/readyz")[0]

    def scrape(self) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        status, body = http_get(f"{self.base}/metrics")
        took = time.perf_counter() - t0
        if status != 200:
            sys.exit(f"/metrics answered {status}")
        return took, body

    def stop(self) -> float:
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()
        self.log.close()
        return time.perf_counter() - t0


def run_command(argv: list[str], env: dict[str, str], repeat: int) -> tuple[float, int]:
    """Best wall time of ``repeat`` runs of a command, and its output's size."""
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv[3:5])} failed ({proc.returncode}):\n"
                     f"{proc.stderr.decode()[-2000:]}")
        size = len(proc.stdout)
    return min(times), size


def usage_polls(body: bytes) -> float:
    """Usage polls finished so far, every provider and outcome (``rotator_usage_polls_total``)."""
    return sum(float(v) for v in re.findall(rb"^rotator_usage_polls_total\{[^}]*\} (\S+)$",
                                            body, re.M))


def due_reasons(body: bytes) -> collections.Counter[str]:
    return collections.Counter(m.decode() for m in re.findall(
        rb'rotator_credential_due_reason\{[^}]*reason="(\w+)"', body))


def measure_daemon(config: Path, env: dict[str, str], work: Path, port: int, label: str,
                   scrapes: int, commands: list[tuple[str, list[str]]], repeat: int,
                   settle: float) -> dict[str, Any]:
    daemon = RunningDaemon(config, env, work, port, label)
    try:
        figures: dict[str, Any] = {"ready": daemon.ready_seconds}
        figures["readyz"] = daemon.readyz()
        figures["rss_ready"], _ = memory(daemon.proc.pid)
        daemon.scrape()  # the first scrape pays for compiling the queries
        times, body = [], b""
        for _ in range(scrapes):
            took, body = daemon.scrape()
            times.append(took)
        figures["scrape_median"], figures["scrape_max"] = statistics.median(times), max(times)
        figures["scrape_mb"] = len(body) / 1e6
        figures["rss_scraped"], _ = memory(daemon.proc.pid)
        figures["reasons"] = due_reasons(body)
        # Settled: the first usage poll reads every credential's secret (thousands of vault
        # reads), competing with a scrape for the interpreter; an operator lives after it.
        t0 = time.perf_counter()
        while usage_polls(body) < PROVIDERS and time.perf_counter() - t0 < settle:
            time.sleep(1.0)
            body = daemon.scrape()[1]
        figures["settled_after"] = time.perf_counter() - t0
        times = []
        for _ in range(scrapes):
            took, body = daemon.scrape()
            times.append(took)
        figures["settled_median"], figures["settled_max"] = statistics.median(times), max(times)
        figures["rss_settled"], _ = memory(daemon.proc.pid)
        for name, argv in commands:
            figures[name], _ = run_command(argv, env, repeat)
        figures["rss_after"], figures["rss_peak"] = memory(daemon.proc.pid)
    finally:
        figures["stop"] = daemon.stop()
    log_text = daemon.log_path.read_text()
    figures["errors"] = sum(1 for line in log_text.splitlines() if '"level": "error"' in line)
    return figures


def verdict(value: float, aim: float) -> str:
    return "ok" if value < aim else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--credentials", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each command; the best is kept")
    parser.add_argument("--settle", type=float, default=180.0,
                        help="longest wait for the first usage poll before the settled "
                             "scrapes (seconds)")
    args = parser.parse_args()
    n = args.credentials
    with tempfile.TemporaryDirectory(prefix="rotator-bench-fleet-") as tmp, \
            OpenBaoDevServer() as bao, FakeOpenAIServer() as fake:
        work = Path(tmp)
        t0 = time.perf_counter()
        seed_vault(bao, n)
        port = free_port()
        config = write_policies(work, n, bao, fake, port)
        print(f"{n} credentials, {PROVIDERS} providers, window {closed_window()!r}; set-up "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        env = {**os.environ, "VAULT_TOKEN": bao.root_token, "ROTATOR_LOG_FORMAT": "json"}
        base = [sys.executable, "-m", "rotator.cli"]
        commands = [(name, [*base, *argv, "-c", str(config)]) for name, argv in (
            ("status", ["status"]), ("status --json", ["status", "--json"]),
            ("plan", ["plan"]), ("plan --json", ["plan", "--json"]))]
        runs = {}
        for label in ("first", "second"):
            runs[label] = measure_daemon(config, env, work, port, label, args.scrapes,
                                         commands if label == "second" else [], args.repeat,
                                         args.settle)
            print(f"{label} start measured", flush=True)
        creates = fake.request_count("POST", "/api_keys")

    first, second = runs["first"], runs["second"]
    rows = [
        ("ready, first start (empty store)", f"{first['ready']:.2f} s", AIMS["ready"],
         first["ready"]),
        ("ready, second start (store synced)", f"{second['ready']:.2f} s", AIMS["ready"],
         second["ready"]),
        ("RSS once ready (second start)", f"{second['rss_ready']:.0f} MB", AIMS["rss_mb"],
         second["rss_ready"]),
        ("RSS after scrapes + commands", f"{second['rss_after']:.0f} MB", AIMS["rss_mb"],
         second["rss_after"]),
        ("RSS peak (VmHWM)", f"{second['rss_peak']:.0f} MB", AIMS["rss_mb"],
         second["rss_peak"]),
        ("/metrics scrape, median", f"{second['scrape_median'] * 1000:.0f} ms",
         AIMS["scrape"], second["scrape_median"]),
        ("/metrics scrape, worst", f"{second['scrape_max'] * 1000:.0f} ms", AIMS["scrape"],
         second["scrape_max"]),
        ("/metrics scrape settled, median", f"{second['settled_median'] * 1000:.0f} ms",
         AIMS["scrape"], second["settled_median"]),
        ("/metrics scrape settled, worst", f"{second['settled_max'] * 1000:.0f} ms",
         AIMS["scrape"], second["settled_max"]),
    ]
    for name, _ in commands:
        rows.append((f"rotator {name}", f"{second[name]:.2f} s", AIMS["command"], second[name]))
    print(f"\n{'figure':<38} {'value':>10}   aim")
    for label, shown, aim, value in rows:
        unit = "MB" if "RSS" in label else "s"
        aim_text = f"{aim * 1000:.0f} ms" if aim < 1 else f"{aim:g} {unit}"
        print(f"{label:<38} {shown:>10}   < {aim_text:<7} {verdict(value, aim)}")
    print(f"\nfirst start: RSS once ready {first['rss_ready']:.0f} MB, scrape median "
          f"{first['scrape_median'] * 1000:.0f} ms, worst {first['scrape_max'] * 1000:.0f} ms; "
          f"/metrics page {second['scrape_mb']:.1f} MB; /readyz at ready: "
          f"{first['readyz']}, {second['readyz']}; stop after SIGTERM {first['stop']:.1f} s, "
          f"{second['stop']:.1f} s; settled {first['settled_after']:.0f} s, "
          f"{second['settled_after']:.0f} s after the first scrapes (first start: settled "
          f"median {first['settled_median'] * 1000:.0f} ms)")
    for run, figures in (("first", first), ("second", second)):
        print(f"RSS, {run} start: ready {figures['rss_ready']:.0f} MB, after the first scrapes "
              f"{figures['rss_scraped']:.0f} MB, settled {figures['rss_settled']:.0f} MB, after "
              f"the commands {figures['rss_after']:.0f} MB, peak {figures['rss_peak']:.0f} MB")
    print(f"due reasons on the scrape: {dict(second['reasons'])}; keys created at the "
          f"provider: {creates}; error lines in the daemon's log: "
          f"{first['errors']}, {second['errors']}")


if __name__ == "__main__":
    main()
