"""``rotator scan`` on the fleet fixture: every planted key found where it sits, with its agent,
variable and sharing; the history-only key with --git; no look-alike flagged; no value shown."""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict

import pytest

from rotator.scan import fingerprint
from rotator.testing.fleet_repo import FleetRepo, build_fleet_repo
from tests.support import ROTATOR


@pytest.fixture(scope="module")
def fleet_repo(tmp_path_factory) -> FleetRepo:
    return build_fleet_repo(tmp_path_factory.mktemp("scan") / "fleet")


def _scan(repo: FleetRepo, *args: str) -> tuple[dict, str]:
    result = subprocess.run([*ROTATOR, "scan", ".", *args], cwd=repo.root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = result.stdout + result.stderr
    leaked = [p.service for p in repo.planted if p.value in shown]
    assert leaked == [], f"values of {leaked} in the output"
    return (json.loads(result.stdout) if "--json" in args else {}), shown


def test_every_planted_key_is_found_where_it_sits(fleet_repo):
    doc, _ = _scan(fleet_repo, "--json")
    found = {(f["path"], f["line"]): f for f in doc["found"]}
    for planted in fleet_repo.planted:
        for place in planted.places:
            assert place in found, f"{planted.service} key at {place} not found"
            f = found[place]
            assert f["fingerprint"] == fingerprint(planted.value)
            assert f["variable"] in (planted.variable, "CLIENT_KEY"), f
            assert f["agent"] in planted.agents, (f["agent"], planted.agents)
    services = {f["service"] for f in doc["found"]}
    assert {"openai", "anthropic", "stripe", "aws", "database", "acme"} <= services
    assert doc["files"] == 13


def test_no_look_alike_is_flagged(fleet_repo):
    doc, _ = _scan(fleet_repo, "--json")
    flagged = {(f["path"], f["line"]) for f in doc["found"]}
    assert [d for d in fleet_repo.decoys if d in flagged] == []
    planted = {place for p in fleet_repo.planted for place in p.places}
    assert flagged == planted, "a finding that is no planted key"


def test_shared_keys_name_every_agent_holding_them(fleet_repo):
    doc, _ = _scan(fleet_repo, "--json")
    by_key: dict[str, set[str]] = defaultdict(set)
    for f in doc["found"]:
        by_key[f["fingerprint"]].add(tuple(f["shared_by"]))
    for planted in fleet_repo.planted:
        if not planted.places:
            continue
        holders = {a for p in planted.places for a in [_agent_of(doc, p)]}
        expected = tuple(sorted(holders)) if len(holders) > 1 else ()
        assert by_key[fingerprint(planted.value)] == {expected}, planted.service
    anthropic = next(p for p in fleet_repo.planted if p.service == "anthropic")
    assert len(next(iter(by_key[fingerprint(anthropic.value)]))) == 10


def _agent_of(doc: dict, place: tuple[str, int]) -> str:
    return next(f["agent"] for f in doc["found"] if (f["path"], f["line"]) == place)


def test_git_finds_the_key_that_lives_on_only_in_history(fleet_repo):
    gone = next(p for p in fleet_repo.planted if p.history)
    without, _ = _scan(fleet_repo, "--json")
    assert fingerprint(gone.value) not in {f["fingerprint"] for f in without["found"]}
    doc, _ = _scan(fleet_repo, "--git", "--json")
    [f] = [f for f in doc["found"] if f["fingerprint"] == fingerprint(gone.value)]
    assert f["path"] == gone.history[0] and f["commit"] and f["agent"] == "agent-07"
    assert "(history, commit" in f["where"]
    # Keys still in the tree are reported there, not again for each commit that holds them.
    assert len(doc["found"]) == len(without["found"]) + 1
    assert doc["history_versions"] > 0


def test_the_table_names_agents_places_and_sharing(fleet_repo):
    _, shown = _scan(fleet_repo, "--git")
    assert "agents/agent-03/tools.py:3" in shown and "10 agents" in shown
    assert "docker-compose.yml:5" in shown and "(history, commit" in shown


FILLED = {  # what an operator would write where the draft says FILL IN
    "your Vault or OpenBao address": "http://127.0.0.1:8200",
    "the OpenAI project id": "proj_fleet",
    "the service account of": "svc_acct_fleet",
    "the region": "us-east-1",
    "the IAM user of": "fleet-agent",
    "the name of": "fleet agent key",
}


def test_policy_out_drafts_a_file_check_accepts_once_filled_in(fleet_repo, tmp_path):
    draft = tmp_path / "draft.toml"
    _scan(fleet_repo, "--git", "--policy-out", str(draft))
    text = draft.read_text()
    assert [p.service for p in fleet_repo.planted if p.value in text] == [], "a value"
    import tomllib

    doc = tomllib.loads(text)
    creds = {c["name"]: c for c in doc["credentials"]}
    # One credential per agent for the OpenAI key five agents share (and one for the key
    # hardcoded in agent-03's script), and per agent for the Anthropic one.
    assert sum(1 for c in creds.values() if c["provider"] == "openai") == 11
    assert "agent-03/client-key" in creds
    assert sum(1 for c in creds.values() if c["provider"] == "anthropic") == 10
    assert all(c.get("manual_only") for c in creds.values() if c["provider"] == "anthropic")
    assert {c["interval"] for c in creds.values() if c["provider"] == "stripe"} == {"30d"}
    assert {c["interval"] for c in creds.values() if c["provider"] == "openai"} == {"90d"}
    assert "ACME_API_KEY of agent-06" in text and "DATABASE_URL of agent-00" in text
    result = subprocess.run([*ROTATOR, "check", "-c", str(draft), "--json"],
                            capture_output=True, text=True, timeout=60)
    problems = json.loads(result.stdout)["problems"]
    assert result.returncode == 2 and problems
    assert all("still a placeholder" in p for p in problems), problems
    for hint, value in FILLED.items():
        text = re.sub(rf'"FILL IN: {re.escape(hint)}[^"]*"', f'"{value}"', text)
    assert "FILL IN" not in text.split("# Found but not drafted")[0].replace(
        "# Replace every \"FILL IN", "")
    draft.write_text(text)
    filled = subprocess.run([*ROTATOR, "check", "-c", str(draft)], capture_output=True,
                            text=True, timeout=60)
    assert filled.returncode == 0, filled.stderr
    again = subprocess.run([*ROTATOR, "scan", ".", "--policy-out", str(draft)],
                           cwd=fleet_repo.root, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr, "never overwrites a file"
