"""``rotator demo``: the example policy file, run for real on loopback servers.

It starts a real OpenBao dev server, the fake OpenAI Admin API and one sample agent per agent
named in ``rotation-policies.toml``; seeds each agent's vault secret with a key rotator did not
create (so the first rotation shows adoption); writes a demo copy of the policies pointing at
those servers with intervals of seconds; runs the daemon; and shows live what rotates and that
the agents never see a rejected key. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rotator.errors import PermanentError

log = logging.getLogger("rotator.demo")

DEMO_INTERVALS = ("30s", "45s", "60s", "40s")
DEMO_GRACE = "10s"
DRILL_ENV = Path("rotator-drill.env")
"""Written by ``demo --serve`` in the current directory for a second terminal to source."""


def run_demo(*, duration: float | None = None, workdir: Path | None = None,
             example: Path | None = None, serve: bool = False) -> int:
    """Run the demo until Ctrl-C or ``duration`` seconds; returns 0 if no agent saw an outage.

    ``serve``: also write ``drill.env`` (the vault address and token, the policy file) and say
    how a second terminal uses it to practise the leak runbook against the running demo. A
    temporary work directory is removed at the end; a ``workdir`` given is kept."""
    import tomli_w

    from rotator.config import load_policies, resolve_config_path
    from rotator.scheduling import Daemon
    from rotator.testing.agent import SampleAgent
    from rotator.testing.fake_openai import FakeOpenAIServer
    from rotator.testing.openbao import OpenBaoDevServer

    example = example or resolve_config_path(None)
    if not example.exists():
        raise PermanentError(f"the demo runs the example policy file, and {example} does not "
                             "exist: run it from the repository root or set $ROTATOR_CONFIG")
    doc = tomllib.loads(example.read_text())
    temporary = workdir is None
    work = (workdir or Path(tempfile.mkdtemp(prefix="rotator-demo-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "rotator.log"
    _log_to_file(log_path)
    out = _Printer()
    out.line(f"rotator demo: files in {work}; daemon log {log_path}")

    stack: list[Any] = []
    # SIGTERM and SIGHUP stop the demo like Ctrl-C does, so its servers are always stopped.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        bao = OpenBaoDevServer().start()
        stack.append(bao)
        out.line(f"  OpenBao dev server      {bao.url}")
        fake = FakeOpenAIServer().start()
        stack.append(fake)
        out.line(f"  fake OpenAI Admin API   {fake.base_url}")
        os.environ["VAULT_TOKEN"] = bao.root_token
        demo_doc, agents = _demo_policies(doc, work, bao, fake)
        for agent_name, spec in agents.items():
            agent = SampleAgent(vault_url=bao.url, vault_token=bao.root_token,
                                path=spec["path"], field=spec["field"],
                                provider_base_url=fake.base_url, mount=spec["mount"])
            agent.start()
            stack.append(agent)
            spec["agent"] = agent
            out.line(f"  agent {agent_name:<17} {agent.health_url}")
        for cred in demo_doc["credentials"]:
            cred["health_check"]["url"] = agents[cred["agent"]]["agent"].health_url
        demo_file = work / "rotation-policies.demo.toml"
        demo_file.write_text(
            f"# Demo copy of {example.name}: local servers, intervals of seconds.\n"
            + tomli_w.dumps(demo_doc))
        policies = load_policies(demo_file)
        daemon = Daemon(demo_file, policies)
        thread = threading.Thread(target=daemon.run, name="rotator-daemon", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while daemon.metrics_url is None and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        out.line(f"  daemon                  {len(policies.credentials)} credential(s), "
                 f"metrics on {daemon.metrics_url}")
        if serve:
            stack.append(_DrillEnv(DRILL_ENV.absolute(), bao, demo_file))
            out.line("Practise the leak runbook from a second terminal in this directory "
                     "(README: \"Practise the leak runbook\"):")
            out.line(f"  source {DRILL_ENV}")
            out.line("  rotator status")
        out.line("Ctrl-C stops everything." if duration is None
                 else f"Running for {duration:.0f}s.")
        started = time.monotonic()
        try:
            while duration is None or time.monotonic() - started < duration:
                out.table(_rows(daemon, agents))
                time.sleep(1.0)
        except KeyboardInterrupt:
            out.line("stopping...")
        daemon.stop("demo finished")
        thread.join(timeout=60)
        rows = _rows(daemon, agents)
        out.table(rows, final=True)
        rejected = sum(spec["agent"].rejections for spec in agents.values())
        calls = sum(spec["agent"].successes for spec in agents.values())
        rotations = sum(int(r["rotations"]) for r in rows)
        out.line(f"{rotations} rotation(s) put a new key in place; agents made {calls} "
                 f"successful call(s) and saw {rejected} rejected key(s)")
        return 0 if rejected == 0 else 1
    finally:
        # A second Ctrl-C while stopping must not leave a server behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for item in reversed(stack):
            try:
                item.stop()
            except BaseException:
                log.exception("stopping %s failed", type(item).__name__)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if temporary:
            import shutil

            logging.getLogger().handlers[:] = []
            shutil.rmtree(work, ignore_errors=True)


class _DrillEnv:
    """The environment a second terminal needs to work on the running demo (vault address and
    token, the demo's policy file), in an owner-only file in the current directory: never
    printed (the token is a secret, even a throw-away dev server's), removed when the demo
    stops."""

    def __init__(self, path: Path, bao: Any, config: Path) -> None:
        self.path = path
        lines = [f"export VAULT_ADDR={bao.url}", f"export VAULT_TOKEN={bao.root_token}",
                 f"export ROTATOR_CONFIG={config}"]
        if "ROTATOR_DEMO_OPENAI_ADMIN_KEY" in os.environ:
            lines.append("export ROTATOR_DEMO_OPENAI_ADMIN_KEY="
                         + os.environ["ROTATOR_DEMO_OPENAI_ADMIN_KEY"])
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")

    def stop(self) -> None:
        self.path.unlink(missing_ok=True)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _demo_policies(doc: dict[str, Any], work: Path, bao: Any, fake: Any
                   ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The example file rewritten for the local servers; seeds the vault and the fake."""
    client = bao.client()
    settings = dict(doc.get("rotator", {}))
    settings.update(state_url=f"sqlite:///{work / 'state.db'}", poll_interval="1s",
                    metrics_address="127.0.0.1:0",
                    jitter="3s", lock_ttl="30s", retry_deadline="20s")
    vaults = {name: {"type": "vault", "url": bao.url, "mount": v.get("mount", "secret"),
                     "token_env": "VAULT_TOKEN"}
              for name, v in doc.get("vaults", {}).items() if v.get("type") == "vault"}
    providers: dict[str, Any] = {}
    for name, p in doc.get("providers", {}).items():
        if p.get("type") != "openai":
            continue
        project = fake.add_project(p["project_id"])
        ref = p.get("admin_key", {})
        if "vault" in ref and ref["vault"] in vaults:
            client.secrets.kv.v2.create_or_update_secret(
                path=ref["path"], secret={ref["field"]: fake.admin_key},
                mount_point=vaults[ref["vault"]]["mount"])
            admin = {"vault": ref["vault"], "path": ref["path"], "field": ref["field"]}
        else:
            os.environ["ROTATOR_DEMO_OPENAI_ADMIN_KEY"] = fake.admin_key
            admin = {"env": "ROTATOR_DEMO_OPENAI_ADMIN_KEY"}
        providers[name] = {"type": "openai", "project_id": project, "admin_key": admin,
                           "base_url": fake.base_url, "_project": project}
    credentials = []
    agents: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(doc.get("credentials", [])):
        if c.get("provider") not in providers or c.get("vault") not in vaults:
            continue
        prov = providers[c["provider"]]
        account = fake.add_service_account(prov["_project"], name=c["agent"])
        _key_id, legacy = fake.seed_key(prov["_project"], account, name="legacy .env key")
        mount = vaults[c["vault"]]["mount"]
        client.secrets.kv.v2.create_or_update_secret(
            path=c["path"], secret={c["field"]: legacy, "NOTE": "kept across rotations"},
            mount_point=mount)
        agents.setdefault(c["agent"], {"path": c["path"], "field": c["field"],
                                       "mount": mount})
        credentials.append({
            "name": c["name"], "agent": c["agent"], "provider": c["provider"],
            "vault": c["vault"], "path": c["path"], "field": c["field"],
            "interval": DEMO_INTERVALS[i % len(DEMO_INTERVALS)], "grace": DEMO_GRACE,
            "params": {**c.get("params", {}), "service_account_id": account},
            "health_check": {"type": "http", "url": "", "expect_status": 200,
                             "expect_json": {"key_id": "{key_id}"}, "timeout": "2s",
                             "attempts": 10, "delay": "1s"},
        })
    if not credentials:
        raise PermanentError("the example policy file has no openai credential on a `vault` "
                             "vault for the demo to run")
    for p in providers.values():
        p.pop("_project")
    return ({"rotator": settings, "vaults": vaults, "providers": providers,
             "credentials": credentials}, agents)


def _rows(daemon: Any, agents: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    now = datetime.now(UTC)
    states = {s.name: s for s in daemon.store.credentials()}
    active = daemon.store.active_rotation_steps()
    rows = []
    for cred in daemon.policies.credentials:
        state = states.get(cred.name)
        agent = agents[cred.agent]["agent"]
        count = sum(1 for r in daemon.store.rotations(cred.name, limit=1000)
                    if r.outcome == "success" or r.status == "grace")
        last = state.last_rotated_at if state else None
        due = state.next_due_at if state else None
        rows.append({
            "credential": cred.name, "agent": cred.agent,
            "key id": (state.current_key_id or "(adopted)") if state else "-",
            "key age": f"{(now - last).total_seconds():.0f}s" if last else "-",
            "rotations": str(count),
            "last": (state.last_outcome or "-") if state else "-",
            "next in": f"{max((due - now).total_seconds(), 0):.0f}s" if due else "-",
            "step": active.get(cred.name, ""),
            "agent calls ok/rejected": f"{agent.successes}/{agent.rejections}",
        })
    return rows


class _Printer:
    """A live table on a terminal; a line per change elsewhere (CI, pipes)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.tty = sys.stdout.isatty()
        self.console = Console(highlight=False, width=None if self.tty else 160)
        self._live: Any = None
        self._last: list[dict[str, str]] | None = None

    def line(self, text: str) -> None:
        self.console.print(text)

    def table(self, rows: list[dict[str, str]], final: bool = False) -> None:
        from rich.table import Table

        table = Table(title="rotator demo" + (" (final)" if final else ""))
        for col in (rows[0] if rows else {}):
            table.add_column(col)
        for row in rows:
            style = {"success": "green", "failed": "red", "rolled_back": "yellow"}.get(
                row.get("last", ""))
            table.add_row(*row.values(), style=style)
        if self.tty and not final:
            from rich.live import Live

            if self._live is None:
                self._live = Live(table, console=self.console, auto_refresh=False)
                self._live.start()
            self._live.update(table, refresh=True)
            return
        if self._live is not None:
            self._live.stop()
            self._live = None
        changed = [{k: v for k, v in r.items() if k not in ("key age", "next in",
                                                            "agent calls ok/rejected")}
                   for r in rows]
        if final or changed != self._last:
            self.console.print(table)
        self._last = changed


def _log_to_file(path: Path) -> None:
    from rotator.log import RedactingFilter

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("apscheduler", "httpx", "httpcore", "httpx2", "httpcore2", "urllib3",
                  "openai", "alembic", "hvac", "stripe", "botocore", "boto3", "psycopg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
