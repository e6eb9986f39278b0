"""The command line as scripts see it: exit codes, --json shapes, and no secret in output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.support import make_fleet


def test_help_does_not_import_provider_sdks():
    code = ("import sys; from click.testing import CliRunner; from rotator.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('openai', 'hvac', 'sqlalchemy', 'boto3') if m in sys.modules]; "
            "assert not bad, bad")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True)
    assert time.monotonic() - started < 5


def test_rotate_now_status_plan_history(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=3, grace="0s")
    dry = fleet.cli("rotate-now", "--all", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert [r["credential"] for r in json.loads(dry.stdout)["rotations"]] == \
        ["agent-0/openai", "agent-1/openai", "agent-2/openai"]
    assert fake_openai.request_count("POST") == 0

    result = fleet.cli("rotate-now", "--agent", "agent-1", "--reason", "test", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["succeeded"] == 1 and payload["failed"] == 0
    assert payload["rotations"][0]["credential"] == "agent-1/openai"

    status = json.loads(fleet.cli("status", "--json").stdout)
    by_name = {row["credential"]: row for row in status}
    assert by_name["agent-1/openai"]["last_outcome"] == "success"
    assert by_name["agent-1/openai"]["key_id"] == payload["rotations"][0]["message"].split()[2]
    assert by_name["agent-0/openai"]["last_outcome"] is None
    assert set(by_name["agent-0/openai"]) >= {"agent", "provider", "key_age_seconds",
                                              "next_due_at", "rotating_step"}

    plan = json.loads(fleet.cli("plan", "--within", "1d", "--json").stdout)
    assert {row["credential"] for row in plan} == {"agent-0/openai", "agent-2/openai"}
    assert all(row["reason"] == "never_rotated" for row in plan)

    history = json.loads(fleet.cli("history", "agent-1/openai", "--json").stdout)
    assert len(history) == 1 and history[0]["reason"] == "test"
    assert history[0]["trigger"] == "manual" and history[0]["requested_by"]
    assert [s["step"] for s in history[0]["steps"]][:3] == ["prepare", "create", "verify"]

    human = fleet.cli("status")
    assert human.returncode == 0 and "agent-1/openai" in human.stdout


def test_rotate_now_exits_1_naming_the_failure(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2, settings={"retry_deadline": "1s"})
    broken = fleet.credentials[0]["service_account_id"]
    fleet.config.write_text(fleet.config.read_text().replace(broken, "svc_acct_gone", 1))
    result = fleet.cli("rotate-now", "--all", "--revoke-immediately", "--yes")
    assert result.returncode == 1
    assert "1 rotated, 1 failed: agent-0/openai" in result.stdout
    assert "✗ agent-0/openai (agent agent-0): failed at step prepare" in result.stdout \
        or "✗ agent-0/openai (agent agent-0): failed at step create" in result.stdout
    assert "Traceback" not in result.stderr


def test_rotate_now_usage_errors_exit_2(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    assert fleet.cli("rotate-now").returncode == 2
    unknown = fleet.cli("rotate-now", "nope", "--yes")
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    both = fleet.cli("rotate-now", "--all", "--revoke-first", "--revoke-immediately", "--yes")
    assert both.returncode == 2
    no_tty = fleet.cli("rotate-now", "--all")
    assert no_tty.returncode == 2 and "--yes" in no_tty.stderr
    assert fake_openai.request_count("POST") == 0


def test_check_online_reports_unreachable_vault(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    ok = fleet.cli("check", "--online")
    assert ok.returncode == 0, ok.stderr
    fleet.config.write_text(fleet.config.read_text().replace(openbao.url, "http://127.0.0.1:9"))
    bad = fleet.cli("check", "--online")
    assert bad.returncode == 2
    assert "vaults.main" in bad.stderr and "Traceback" not in bad.stderr


def test_unusable_state_url_is_one_clear_line(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    fleet.config.write_text(fleet.config.read_text().replace(
        str(fleet.state_db), "/proc/no-such-dir/state.db"))
    result = fleet.cli("history")
    assert result.returncode == 2
    assert "no state store at" in result.stderr and "state_url" in result.stderr
    # status previews from the policy file, saying plainly that there is no store there.
    result = fleet.cli("status")
    assert result.returncode == 0
    assert "note: no state store at /proc/no-such-dir/state.db yet" in result.stderr
    assert not Path("/proc/no-such-dir").exists(), "a read-only command creates nothing"
    result = fleet.cli("rotate-now", "--all", "--yes")
    assert result.returncode == 2
    assert "cannot open the state store" in result.stderr and "state_url" in result.stderr
    assert "Traceback" not in result.stderr


def test_history_prints_stored_text_literally(tmp_path, openbao, fake_openai):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=1)
    reason = "[/] ticket [inc-42] [bold]x"
    assert fleet.cli("rotate-now", "--all", "--yes", "--reason", reason).returncode == 0
    result = fleet.cli("history")
    assert result.returncode == 0, result.stderr
    assert "[inc-42]" in result.stdout
    unknown = fleet.cli("history", "no-such-credential")
    assert unknown.returncode == 2 and "no-such-credential" in unknown.stderr
