"""``rotator exec``: an agent started with its keys from the vault instead of a .env file, kept
working through rotations with ``--watch`` (issue 13)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ENV_AGENT as AGENT
from tests.support import ROTATOR, make_fleet, wait_for


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def test_exec_hands_the_agent_only_its_own_keys_and_passes_the_exit_status(
        tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    mine = _digest(fleet.vault_value(fleet.credentials[0]))
    check = ("import hashlib, os, sys; v = os.environ.get('OPENAI_API_KEY', ''); "
             "sys.exit(0 if hashlib.sha256(v.encode()).hexdigest() == sys.argv[1] else 9)")
    ran = fleet.cli("exec", "--agent", "agent-0", "--", sys.executable, "-c", check, mine)
    assert ran.returncode == 0, ran.stderr
    other = _digest(fleet.vault_value(fleet.credentials[1]))
    assert fleet.cli("exec", "--agent", "agent-0", "--", sys.executable, "-c", check,
                     other).returncode == 9, "agent-0 must get its own key, not agent-1's"
    assert fleet.cli("exec", "--agent", "agent-0", "--", "sh", "-c", "exit 7").returncode == 7
    typo = fleet.cli("exec", "--agent", "agnet-0", "--", "true")
    assert typo.returncode == 2 and 'did you mean "agent-0"?' in typo.stderr
    missing = fleet.cli("exec", "--agent", "agent-0", "--", "no-such-command-here")
    assert missing.returncode == 2 and "no-such-command-here" in missing.stderr
    assert ran.stdout == "" and "sk-" not in ran.stderr


def _start_watched(fleet, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    log = tmp_path / "agent.jsonl"
    proc = subprocess.Popen(
        [*ROTATOR, "exec", "--agent", "agent-0", "--watch", "--poll", "1s", *flags, "--",
         sys.executable, str(script), str(log), fleet.fake.base_url],
        env=fleet.env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "exec.stderr").open("w"))
    wait_for(lambda: any("ok" in r for r in _records(log)), what="the agent to call")
    return proc, log


def test_watch_restart_keeps_the_agent_working_through_a_rotation(tmp_path, openbao,
                                                                  fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, grace="3s")
    proc, log = _start_watched(fleet, tmp_path, "--restart")
    try:
        first = _digest(fleet.vault_value(fleet.credentials[0]))
        assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
        second = _digest(fleet.vault_value(fleet.credentials[0]))
        assert second != first
        wait_for(lambda: any(r.get("key") == second and r.get("ok") for r in _records(log)),
                 what="the agent to be restarted with the new key")
        time.sleep(4)  # past the old key's grace: it is revoked now
        assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
        third = _digest(fleet.vault_value(fleet.credentials[0]))
        wait_for(lambda: any(r.get("key") == third for r in _records(log)),
                 what="a second restart")
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    records = _records(log)
    assert [r["started"] for r in records if "started" in r] == [first, second, third]
    rejected = [r for r in records if r.get("ok") is False]
    assert rejected == [], f"the agent saw {len(rejected)} rejected call(s)"
    assert code == 3, "SIGTERM is forwarded and the agent's own exit status passed through"


def test_watch_signals_the_agent_when_its_key_changes(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, grace="1h")
    proc, log = _start_watched(fleet, tmp_path)  # default: SIGHUP
    try:
        assert not any("signal" in r for r in _records(log))
        assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
        wait_for(lambda: any(r.get("signal") == "HUP" for r in _records(log)),
                 what="SIGHUP after the rotation")
        assert sum(1 for r in _records(log) if "started" in r) == 1, "signalled, not restarted"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 128 + signal.SIGINT, "SIGINT reaches the agent, which dies of it"
    assert "sk-" not in (tmp_path / "exec.stderr").read_text()


def test_an_agent_token_from_the_shipped_policy_reads_only_its_own_keys(tmp_path, openbao,
                                                                        fake_openai):
    """deploy/vault/agent-policy.hcl, filled in for one agent, is all `rotator exec` needs."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    shipped = (Path(__file__).parent.parent / "deploy/vault/agent-policy.hcl").read_text()
    own = shipped.replace("secret/data/agents/AGENT/*", f"secret/data/{fleet.prefix}/agents/"
                          "agent-0")
    assert own != shipped
    root = openbao.client()
    root.sys.create_or_update_policy(name=f"{fleet.prefix}-agent-0", policy=own)
    token = root.auth.token.create(policies=[f"{fleet.prefix}-agent-0"], ttl="10m")
    agent_token = token["auth"]["client_token"]
    mine = _digest(fleet.vault_value(fleet.credentials[0]))
    check = ("import hashlib, os, sys; v = os.environ.get('OPENAI_API_KEY', ''); "
             "sys.exit(0 if hashlib.sha256(v.encode()).hexdigest() == sys.argv[1] else 9)")
    ran = fleet.cli("exec", "--agent", "agent-0", "--", sys.executable, "-c", check, mine,
                    VAULT_TOKEN=agent_token)
    assert ran.returncode == 0, ran.stderr
    denied = fleet.cli("exec", "--agent", "agent-1", "--", "true", VAULT_TOKEN=agent_token)
    assert denied.returncode != 0 and "permission denied" in denied.stderr
