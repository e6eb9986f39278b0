"""Issue 13 end to end: a fleet repository with `.env` files goes to every key in the vault, a
policy per key, the first rotation done and every key that sat in a file or in history revoked.

The fixture's keys are issued by the fakes (OpenAI, Anthropic, Stripe) and moto (AWS), so
``scan --verify`` asks real services and "revoked" is the services' word. The operator's steps
are the README's "Migrating from .env files" commands: scan, draft, fill in, import, run the
agents through ``rotator exec --watch``, ``rotator run``, replace the Anthropic keys by hand
(its API cannot create keys), ``revoke-found`` what no credential rotates, ``scan --verify``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import boto3
import pytest
import tomli_w

from rotator.scan import fingerprint
from rotator.testing.fleet_repo import AGENTS, FleetRepo, build_fleet_repo
from rotator.testing.moto_server import REGION
from tests.harnesses.aws import admin_env, admin_refs
from tests.support import ENV_AGENT, ROTATOR, wait_for

pytestmark = pytest.mark.slow
PREFIX = "migration"
"""Where this test's secrets live in the session's OpenBao (the draft says agents/...)."""



class Operator:
    """Runs ``rotator`` as the operator would, every output kept on disk (the leak scan reads
    it) and returned."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env, self.n = tmp, env, 0

    def run(self, *args: str, cwd: Path | None = None, ok: tuple[int, ...] = (0,)
            ) -> subprocess.CompletedProcess[str]:
        self.n += 1
        out, err = self.tmp / f"out-{self.n}-{args[0]}.txt", self.tmp / f"err-{self.n}.txt"
        with out.open("w") as fo, err.open("w") as fe:
            proc = subprocess.run([*ROTATOR, *args], env=self.env, stdout=fo, stderr=fe,
                                  stdin=subprocess.DEVNULL, timeout=180, cwd=cwd or self.tmp)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                             err.read_text())
        assert proc.returncode in ok, (args, proc.returncode, result.stdout, result.stderr)
        return result

    def json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.run(*args, "--json", **kw).stdout)

    def popen(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        out = (self.tmp / f"{name}.out").open("w")
        return subprocess.Popen([*ROTATOR, *args], env=self.env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


@pytest.fixture
def services(openbao, fake_openai, fake_anthropic, fake_stripe, moto_server):
    """The fleet's services, and key makers that have each issue the fixture's keys."""
    project = fake_openai.add_project()
    legacy = fake_openai.add_service_account(project, name="legacy")
    iam = boto3.client("iam", region_name=REGION, endpoint_url=moto_server.url,
                       aws_access_key_id=moto_server.admin.access_key_id,
                       aws_secret_access_key=moto_server.admin.secret_access_key)
    iam.create_user(UserName="agent-04")
    pair: dict[str, str] = {}

    def aws_pair(part: str) -> str:
        if not pair:
            key = iam.create_access_key(UserName="agent-04")["AccessKey"]
            pair.update(id=key["AccessKeyId"], secret=key["SecretAccessKey"])
        return pair[part]

    makers = {
        "openai": lambda: fake_openai.seed_key(project, legacy, name="legacy")[1],
        "anthropic": lambda: fake_anthropic.seed_key("legacy")[1],
        "stripe": lambda: fake_stripe.seed_api_key("fleet-payments")[1],
        "aws_access_key_id": lambda: aws_pair("id"),
        "aws_secret_access_key": lambda: aws_pair("secret"),
    }
    return {"project": project, "makers": makers, "iam": iam}


def _fill_in(draft: Path, tmp: Path, openbao, fake_openai, fake_anthropic, fake_stripe,
             moto_server, project: str, prefix: str) -> Path:
    """What only the operator knows: the vault's address, the project, a service account per
    agent, the Stripe key name, the IAM user; and a short grace so the test sees revocations."""
    doc = tomllib.loads(draft.read_text())
    doc["rotator"].update(state_url=f"sqlite:///{tmp / 'state.db'}", jitter="0s",
                          poll_interval="1s", lock_ttl="30s", retry_deadline="20s",
                          metrics_address="127.0.0.1:0")
    doc["vaults"]["main"]["url"] = openbao.url
    providers = doc["providers"]
    providers["openai"].update(project_id=project, base_url=fake_openai.base_url)
    providers["anthropic"]["base_url"] = fake_anthropic.url
    providers["stripe"]["api_base"] = fake_stripe.base_url
    providers["aws"].update(region=REGION, endpoint_url=moto_server.url, **admin_refs())
    client = openbao.client()
    for path, value in ((f"{prefix}/rotator/admin/openai", fake_openai.admin_key),
                        (f"{prefix}/rotator/admin/anthropic", fake_anthropic.admin_key),
                        (f"{prefix}/rotator/admin/stripe", fake_stripe.admin_key)):
        client.secrets.kv.v2.create_or_update_secret(path=path, secret={"key": value},
                                                     mount_point="secret")
    for provider in providers.values():
        for ref in provider.values():
            if isinstance(ref, dict) and "path" in ref:
                ref["path"] = f"{prefix}/{ref['path']}"
    for cred in doc["credentials"]:
        cred["path"] = f"{prefix}/{cred['path']}"
        cred["grace"] = "2s"
        params = cred.get("params", {})
        if "service_account_id" in params:
            params["service_account_id"] = fake_openai.add_service_account(
                project, name=cred["agent"])
        if "key_name" in params:
            params["key_name"] = "fleet-payments"
        if "user_name" in params:
            params["user_name"] = cred["agent"]
    assert "FILL IN" not in json.dumps(doc), "every placeholder is filled in"
    filled = tmp / "rotation-policies.toml"
    filled.write_text(tomli_w.dumps(doc))
    return filled


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def test_a_fleet_of_env_files_migrates_to_rotated_keys_with_every_old_key_revoked(
        tmp_path, openbao, fake_openai, fake_anthropic, fake_stripe, moto_server, services):
    repo: FleetRepo = build_fleet_repo(tmp_path / "fleet", services["makers"])
    op = Operator(tmp_path, {**os.environ, "VAULT_TOKEN": openbao.root_token,
                             **admin_env(moto_server)})
    daemon = None
    agents: list[subprocess.Popen[bytes]] = []
    try:
        # 1. The inventory and the draft.
        draft = tmp_path / "draft.toml"
        found = op.json("scan", ".", "--git", "--policy-out", str(draft), cwd=repo.root)
        assert len({f["fingerprint"] for f in found["found"]}) == len(repo.planted)
        config = _fill_in(draft, tmp_path, openbao, fake_openai, fake_anthropic, fake_stripe,
                          moto_server, services["project"], PREFIX)
        op.run("check", "-c", str(config))
        # Every key the services issued is live before the migration: --verify says so.
        before = op.json("scan", ".", "--git", "--verify", "-c", str(config), cwd=repo.root,
                         ok=(1,))
        by_fp = {f["fingerprint"]: f["verified"]["state"] for f in before["found"]}
        for p in repo.planted:
            fp = fingerprint(p.value)
            expected = "unchecked" if p.service in ("postgres", "unknown") else "live"
            assert by_fp[fp] == expected, (p.service, p.variable, by_fp[fp])

        # 2. Import: a dry run writes nothing, --apply writes, a second run changes nothing.
        dry = op.json("import", "-c", str(config), ".", cwd=repo.root, ok=(1,))
        rows = {r["credential"]: r for r in dry["rows"]}
        assert rows["agent-08/anthropic-api-key"]["action"] == "ambiguous", \
            "agent-08's compose file and .env hold different Anthropic keys"
        assert all(r["action"] == "write" for n, r in rows.items()
                   if n != "agent-08/anthropic-api-key"), rows
        assert len(rows["agent-05/openai-api-key"]["shared_with"]) == 4
        with pytest.raises(Exception):  # noqa: B017 - hvac's InvalidPath: nothing written
            openbao.client().secrets.kv.v2.read_secret_version(
                path=f"{PREFIX}/agents/agent-00/openai", mount_point="secret",
                raise_on_deleted_version=True)
        applied = op.json("import", "-c", str(config), ".", "--apply", "--strip-env",
                          cwd=repo.root, ok=(1,))
        assert sum(r["action"] == "written" for r in applied["rows"]) == len(rows) - 1
        assert any("tools.py" in line for line in applied["remove_by_hand"])
        # The operator settles agent-08's Anthropic key: the compose file's is the one its
        # agent runs with, so the stale line goes from its .env, and import runs again.
        stale = repo.root / "agents/agent-08/.env"
        stale.write_text("".join(line for line in stale.read_text().splitlines(True)
                                 if not line.startswith("ANTHROPIC_API_KEY=")))
        settled = op.json("import", "-c", str(config), ".", "--apply", "--strip-env",
                          cwd=repo.root)
        assert [r["credential"] for r in settled["rows"] if r["action"] == "written"] == [
            "agent-08/anthropic-api-key"]
        assert any("docker-compose.yml" in line for line in settled["remove_by_hand"])
        versions = _versions(openbao)
        again = op.json("import", "-c", str(config), ".", "--apply", cwd=repo.root)
        assert {r["action"] for r in again["rows"]} == {"unchanged"}, again["rows"]
        assert _versions(openbao) == versions, "a second import changes nothing"
        env_text = (repo.root / "agents/agent-00/.env").read_text()
        assert "OPENAI_API_KEY now lives in vault" in env_text
        assert not any(p.value in env_text for p in repo.planted if p.service == "openai")
        assert "LOG_LEVEL=info" in env_text, "lines that are not keys stay"

        # 3. The agents read the vault through rotator exec --watch; then rotator run.
        script = tmp_path / "agent.py"
        script.write_text(ENV_AGENT)
        for i in range(AGENTS):
            agents.append(op.popen("exec", "-c", str(config), "--agent", f"agent-{i:02d}",
                                   "--watch", "--restart", "--poll", "1s", "--", sys.executable,
                                   str(script), str(tmp_path / f"agent-{i:02d}.jsonl"),
                                   fake_openai.base_url, name=f"exec-{i:02d}"))
        wait_for(lambda: all(_records(tmp_path / f"agent-{i:02d}.jsonl")
                             for i in range(AGENTS)), timeout=60, what="every agent started")
        # One agent of the five sharing an OpenAI key moves first, its old key revoked at
        # once: the key is handed over, not revoked, while the other four still use it.
        shared = next(p for p in repo.planted if p.service == "openai" and len(p.agents) == 5)
        first = op.run("rotate-now", "-c", str(config), "agent-05/openai-api-key",
                       "--revoke-immediately", "--yes", "--json")
        assert '"handed_over"' in first.stdout, first.stdout
        assert fake_openai.is_valid(shared.value), "the shared key was revoked under 4 agents"
        daemon = op.popen("run", "-c", str(config), name="daemon")
        rotatable = [c for c in tomllib.loads(config.read_text())["credentials"]
                     if not c.get("manual_only")]

        def settled() -> bool:
            rows = op.json("status", "-c", str(config))
            done = {r["credential"] for r in rows if r.get("last_outcome") == "success"}
            pending = [r for r in rows if r.get("old_keys")]
            return {c["name"] for c in rotatable} <= done and not pending

        wait_for(settled, timeout=180, what="every credential's first rotation and revocation")
        wait_for(lambda: all(len({r["started"] for r in _records(
            tmp_path / f"agent-{i:02d}.jsonl") if "started" in r}) >= 2 for i in range(AGENTS)),
            timeout=60, what="every agent restarted with its own key")
        for i in range(AGENTS):
            answers = [r for r in _records(tmp_path / f"agent-{i:02d}.jsonl") if "ok" in r]
            assert answers and all(r["ok"] for r in answers), f"agent-{i:02d} was refused"
        history = op.json("history", "-c", str(config), "--limit", "200")
        assert {h["credential"] for h in history if h["outcome"] == "success"} >= \
            {c["name"] for c in rotatable}

        # 4. Anthropic's API cannot create keys: the operator makes one per agent in the
        # console and writes it to the vault; then the shared and compose keys are unused.
        client = openbao.client()
        for cred in tomllib.loads(config.read_text())["credentials"]:
            if cred["provider"] == "anthropic":
                _, value = fake_anthropic.seed_key(cred["agent"])
                client.secrets.kv.v2.patch(path=cred["path"], secret={cred["field"]: value},
                                           mount_point="secret")
        live = op.json("scan", ".", "--git", "--verify", "-c", str(config), cwd=repo.root,
                       ok=(1,))["live"]
        op.run("revoke-found", "-c", str(config), ".", "--git", *[
            a for fp in live for a in ("--key", fp)], cwd=repo.root)
        after = op.json("scan", ".", "--git", "--verify", "-c", str(config), cwd=repo.root)
        assert after["live"] == []

        # Every key that sat in a file or in history is dead at its service.
        for p in repo.planted:
            if p.service == "openai":
                assert not fake_openai.is_valid(p.value), p.variable
            elif p.service == "anthropic":
                assert not fake_anthropic.is_valid(p.value), p.variable
            elif p.service == "stripe":
                assert not fake_stripe.api_key_accepted(p.value)
        assert services["iam"].list_access_keys(UserName="agent-04")["AccessKeyMetadata"] \
            and all(k["AccessKeyId"] != _aws_id(repo) for k in services["iam"]
                    .list_access_keys(UserName="agent-04")["AccessKeyMetadata"])
    finally:
        for proc in [*agents, *([daemon] if daemon else [])]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*agents, *([daemon] if daemon else [])]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # The fixture repository holds the old keys in plaintext on purpose; an operator
        # deletes the .env files too. The leak scan must not find them in the test's files.
        shutil.rmtree(repo.root, ignore_errors=True)
        for leftover in (tmp_path / "draft.toml",):
            assert not any(p.value in leftover.read_text() for p in repo.planted)


def _aws_id(repo: FleetRepo) -> str:
    return next(p.value for p in repo.planted if p.service == "aws_access_key_id")


def _versions(openbao) -> dict[str, int]:
    client = openbao.client()
    out = {}
    root = f"{PREFIX}/agents"
    for agent in client.secrets.kv.v2.list_secrets(path=root,
                                                   mount_point="secret")["data"]["keys"]:
        for leaf in client.secrets.kv.v2.list_secrets(path=f"{root}/{agent}",
                                                      mount_point="secret")["data"]["keys"]:
            meta = client.secrets.kv.v2.read_secret_metadata(path=f"{root}/{agent}{leaf}",
                                                             mount_point="secret")
            out[f"{agent}{leaf}"] = meta["data"]["current_version"]
    return out
