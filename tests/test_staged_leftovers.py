"""Staged copies no rotation will promote or remove are visible: `rotator check --online` warns
about each (exit 0) and `rotator status` lists them per credential (``staged_leftovers`` in each
``--json`` row, warnings on stderr). A copy staged by a rotation still in progress is not a
leftover, nor is one at a path this policy file does not use whose rotation the state store
does not know (another deployment's). No value is ever shown."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from rotator.interfaces import Secret
from rotator.state.models import Rotation
from rotator.state.store import StateStore
from rotator.testing.openbao import OpenBaoDevServer
from rotator.vaults.hashicorp_vault import HashiCorpVault
from tests.support import Fleet, make_fleet, remember_issued

RUNNING = "r20261205000000-running"
UNKNOWN = "r20261205000000-unknown"


def own_staging(doc: dict[str, Any]) -> None:
    """A staging area of this test's own: the session's OpenBao is shared with other tests."""
    prefix = doc["credentials"][0]["path"].split("/", 1)[0]
    doc["vaults"]["main"]["staging_path"] = f"rotator/pending/{prefix}"


def new_values(n: int) -> list[str]:
    values = [f"sk-proj-staged-{secrets.token_urlsafe(24)}" for _ in range(n)]
    remember_issued(values)
    return values


def start_running_rotation(fleet: Fleet, cred: dict[str, Any], rotation_id: str) -> None:
    """A rotation in progress, as a worker that is mid-step leaves it in the store."""
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        store.start_rotation(Rotation(
            id=rotation_id, credential=cred["name"], agent=cred["agent"],
            provider=cred["provider"], trigger="manual", revoke_mode="grace", status="running",
            step="verify", started_at=datetime.now(UTC)), 1)
    finally:
        store.close()


def finished_rotation(fleet: Fleet, cred: dict[str, Any]) -> str:
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        (rotation,) = store.rotations(cred["name"])
    finally:
        store.close()
    assert rotation.status == "succeeded"
    return rotation.id


@pytest.fixture
def fleet(tmp_path, openbao: OpenBaoDevServer, fake_openai) -> Fleet:
    """Two credentials rotated once (finished rotations in the store), nothing staged."""
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2, extra=own_staging)
    assert fleet.cli("rotate-now", "--all", "--yes").returncode == 0
    return fleet


@pytest.fixture
def staging(fleet: Fleet, make_vault) -> HashiCorpVault:
    return make_vault(staging_path=f"rotator/pending/{fleet.prefix}")


def leave_leftovers(fleet: Fleet, staging: HashiCorpVault) -> tuple[str, list[str]]:
    """Stage copies for: a finished rotation (a leftover), a rotation the store does not know
    at a credential's path (a leftover), a running rotation and an unknown rotation at a path
    no credential uses (neither is). Returns the finished rotation's id and the values."""
    cred, other = fleet.credentials
    finished = finished_rotation(fleet, cred)
    start_running_rotation(fleet, other, RUNNING)
    values = new_values(4)
    staging.stage(cred["path"], cred["field"], Secret(values[0]), finished)
    staging.stage(other["path"], other["field"], Secret(values[1]), UNKNOWN)
    staging.stage(other["path"], other["field"], Secret(values[2]), RUNNING)
    staging.stage(f"{fleet.prefix}/elsewhere", "K", Secret(values[3]), UNKNOWN)
    return finished, values


def test_check_online_warns_about_each_leftover_and_what_to_do(fleet: Fleet,
                                                               staging: HashiCorpVault) -> None:
    clean = fleet.cli("check", "--online")
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr
    cred, other = fleet.credentials
    finished, values = leave_leftovers(fleet, staging)

    checked = fleet.cli("check", "--online")
    assert checked.returncode == 0, checked.stderr
    warnings = [line for line in checked.stderr.splitlines() if ": warning: " in line]
    assert len(warnings) == 2, checked.stderr
    first, second = sorted(warnings, key=lambda line: cred["path"] not in line)
    assert (f"rotation-policies.toml: warning: vault 'main': a key is still staged for "
            f"{cred['path']} (credentials {cred['name']!r}) by rotation {finished}, which ended "
            "succeeded: nothing will promote or remove it, so it can be deleted: "
            f"secret/rotator/pending/{fleet.prefix}/{cred['path']}/{finished}") in first
    assert (f"vault 'main': a key is still staged for {other['path']} by rotation {UNKNOWN}, "
            "which the state store has no record of: nothing will promote or remove it, so it "
            "can be deleted") in second
    assert RUNNING not in checked.stderr, "a running rotation's staged copy is no leftover"
    assert "elsewhere" not in checked.stderr, "another deployment's copy is not ours to judge"
    assert not any(v in checked.stdout + checked.stderr for v in values)

    staging.discard_staged(cred["path"], finished)
    staging.discard_staged(other["path"], UNKNOWN)
    assert "warning" not in fleet.cli("check", "--online").stderr


def test_status_lists_leftovers_per_credential_and_keeps_its_json_a_list(
        fleet: Fleet, staging: HashiCorpVault) -> None:
    cred, other = fleet.credentials
    before = json.loads(fleet.cli("status", "--json").stdout)
    assert [row["staged_leftovers"] for row in before] == [[], []]
    finished, values = leave_leftovers(fleet, staging)

    result = fleet.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and [r["credential"] for r in rows] == \
        [cred["name"], other["name"]]
    assert set(rows[0]) == set(before[0]), "the rows keep their keys"
    location = f"secret/rotator/pending/{fleet.prefix}/{cred['path']}/{finished}"
    assert rows[0]["staged_leftovers"] == [{
        "vault": "main", "path": cred["path"], "rotation_id": finished,
        "rotation_status": "succeeded", "location": location}]
    assert [(e["rotation_id"], e["rotation_status"]) for e in rows[1]["staged_leftovers"]] \
        == [(UNKNOWN, None)]
    assert result.stderr.strip() == "", "every leftover belongs to a row: nothing on stderr"

    table = fleet.cli("status")
    assert table.returncode == 0, table.stderr
    notes = [line for line in table.stderr.splitlines() if line.startswith("warning: ")]
    assert len(notes) == 2 and any(location in note for note in notes), table.stderr
    assert not any(v in out for v in values for out in (result.stdout, table.stdout,
                                                        table.stderr))


def test_a_leftover_of_a_credential_no_longer_in_the_file_goes_to_stderr(
        fleet: Fleet, staging: HashiCorpVault) -> None:
    cred, other = fleet.credentials
    finished = finished_rotation(fleet, cred)
    (value,) = new_values(1)
    staging.stage(cred["path"], cred["field"], Secret(value), finished)
    doc_text = fleet.config.read_text()
    # Drop the first credential from the policy file: its rotation is still in the store.
    start = doc_text.index("[[credentials]]")
    second = doc_text.index("[[credentials]]", start + 1)
    fleet.config.write_text(doc_text[:start] + doc_text[second:])

    result = fleet.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["credential"], r["staged_leftovers"]) for r in rows] == [(other["name"], [])]
    assert f"warning: vault 'main': a key is still staged for {cred['path']} " \
           f"(credentials {cred['name']!r}) by rotation {finished}, which ended succeeded" \
           in result.stderr
    assert value not in result.stdout + result.stderr


def test_a_vault_that_cannot_list_is_said_once_and_its_rows_are_null(
        fleet: Fleet, openbao: OpenBaoDevServer) -> None:
    """The least policy (deploy/vault/rotator-policy.hcl) grants no "list": leftovers then
    cannot be checked, which the commands say, without failing."""
    token = openbao.create_token(
        f'path "secret/*" {{ capabilities = ["read"] }}\n'
        f'path "secret/metadata/rotator/pending/{fleet.prefix}/*" {{ capabilities = ["deny"] }}',
        name=f"nolist-{fleet.prefix}")
    result = fleet.cli("status", "--json", VAULT_TOKEN=token)
    assert result.returncode == 0, result.stderr
    assert [row["staged_leftovers"] for row in json.loads(result.stdout)] == [None, None]
    (line,) = result.stderr.splitlines()
    assert line.startswith("warning: vault 'main': staged copies not checked:") and \
        "permission denied" in line and '"list"' in line, line

    checked = fleet.cli("check", "--online", VAULT_TOKEN=token)
    assert checked.returncode == 0, checked.stderr
    assert "staged copies not checked" in checked.stderr


def test_an_unreachable_vault_is_a_check_failure_not_a_second_warning(fleet: Fleet,
                                                                      openbao) -> None:
    fleet.config.write_text(fleet.config.read_text().replace(openbao.url, "http://127.0.0.1:9"))
    checked = fleet.cli("check", "--online")
    assert checked.returncode == 2
    assert "vaults.main" in checked.stderr and "staged copies" not in checked.stderr
    status = fleet.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert [row["staged_leftovers"] for row in json.loads(status.stdout)] == [None, None]
    assert "staged copies not checked" in status.stderr and "unreachable" in status.stderr
