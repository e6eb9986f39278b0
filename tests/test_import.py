"""``rotator import`` and ``rotator revoke-found`` on a small repository: what they refuse and
what they never do (overwrite another key, print a value, revoke a key an agent still uses),
on OpenBao and on AWS Secrets Manager (moto)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import tomli_w

from rotator.scan import fingerprint
from rotator.testing.moto_server import REGION
from tests.harnesses.aws import admin_env, admin_refs
from tests.support import ROTATOR


def _repo(root: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def _policy(tmp: Path, vault: dict[str, Any], provider: dict[str, Any],
            creds: list[dict[str, Any]]) -> Path:
    config = tmp / "rotation-policies.toml"
    config.write_text(tomli_w.dumps({
        "rotator": {"state_url": f"sqlite:///{tmp / 'state.db'}"},
        "vaults": {"main": vault}, "providers": {"openai": provider}, "credentials": creds}))
    return config


def _run(env: dict[str, str], tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    out = tmp / f"out-{uuid.uuid4().hex[:6]}.txt"
    with out.open("w") as fo:
        proc = subprocess.run([*ROTATOR, *args], env=env, stdout=fo, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=120, cwd=tmp)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text())


@pytest.fixture
def openai_fleet(tmp_path, openbao, fake_openai):
    """Two agents' .env files with keys issued by the fake, a policy for them on OpenBao."""
    project = fake_openai.add_project()
    legacy = fake_openai.add_service_account(project, name="legacy")
    keys = {a: fake_openai.seed_key(project, legacy)[1] for a in ("a1", "a2")}
    repo = _repo(tmp_path / "repo", {f"agents/{a}/.env": f"OPENAI_API_KEY={v}\nPORT=8080\n"
                                     for a, v in keys.items()})
    prefix = f"imp{uuid.uuid4().hex[:8]}"
    openbao.client().secrets.kv.v2.create_or_update_secret(
        path=f"{prefix}/admin", secret={"key": fake_openai.admin_key}, mount_point="secret")
    config = _policy(tmp_path, {"type": "vault", "url": openbao.url, "token_env": "VAULT_TOKEN"},
                     {"type": "openai", "project_id": project, "base_url": fake_openai.base_url,
                      "admin_key": {"vault": "main", "path": f"{prefix}/admin", "field": "key"}},
                     [{"name": f"{a}/openai", "agent": a, "provider": "openai", "vault": "main",
                       "path": f"{prefix}/agents/{a}", "field": "OPENAI_API_KEY",
                       "interval": "90d",
                       "params": {"service_account_id": fake_openai.add_service_account(
                           project, name=a)}} for a in keys])
    env = {**os.environ, "VAULT_TOKEN": openbao.root_token}
    yield repo, config, env, keys, prefix
    _forget(repo)


def _forget(repo: Path) -> None:
    """The repository holds plaintext keys on purpose; the session's leak scan must not find
    them (an operator deletes the .env files too)."""
    shutil.rmtree(repo, ignore_errors=True)


def test_import_never_replaces_a_different_key_without_force(tmp_path, openbao, openai_fleet):
    repo, config, env, keys, prefix = openai_fleet
    client = openbao.client()
    client.secrets.kv.v2.create_or_update_secret(
        path=f"{prefix}/agents/a2", secret={"OPENAI_API_KEY": "sk-other-key-already-there",
                                            "OTHER": "keep"}, mount_point="secret")
    result = _run(env, tmp_path, "import", "-c", str(config), str(repo), "--apply", "--json")
    assert result.returncode == 1, result.stdout
    rows = {r["credential"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows["a1/openai"]["action"] == "written"
    assert rows["a2/openai"]["action"] == "conflict"
    assert rows["a2/openai"]["detail"].endswith("--force replaces it")
    held = client.secrets.kv.v2.read_secret_version(
        path=f"{prefix}/agents/a2", mount_point="secret", raise_on_deleted_version=True)
    assert held["data"]["data"]["OPENAI_API_KEY"] == "sk-other-key-already-there"
    forced = _run(env, tmp_path, "import", "-c", str(config), str(repo), "--apply", "--force")
    assert forced.returncode == 0, forced.stdout
    held = client.secrets.kv.v2.read_secret_version(
        path=f"{prefix}/agents/a2", mount_point="secret", raise_on_deleted_version=True)
    assert held["data"]["data"] == {"OPENAI_API_KEY": keys["a2"], "OTHER": "keep"}
    for value in keys.values():
        assert value not in result.stdout + forced.stdout


def test_strip_env_leaves_a_comment_and_the_other_lines(tmp_path, openai_fleet):
    repo, config, env, keys, _ = openai_fleet
    dry = _run(env, tmp_path, "import", "-c", str(config), str(repo), "--strip-env")
    assert dry.returncode == 0 and "would be stripped" in dry.stdout, dry.stdout
    assert keys["a1"] in (repo / "agents/a1/.env").read_text(), "a dry run changes no file"
    done = _run(env, tmp_path, "import", "-c", str(config), str(repo), "--apply", "--strip-env")
    assert done.returncode == 0, done.stdout
    text = (repo / "agents/a1/.env").read_text()
    assert keys["a1"] not in text and "PORT=8080" in text
    assert "rotator exec --agent a1" in text
    again = _run(env, tmp_path, "import", "-c", str(config), str(repo), "--apply", "--json")
    assert {r["action"] for r in json.loads(again.stdout)["rows"]} == {"unchanged"}


def test_revoke_found_refuses_a_key_an_agent_still_reads(tmp_path, fake_openai, openai_fleet):
    repo, config, env, keys, _ = openai_fleet
    assert _run(env, tmp_path, "import", "-c", str(config), str(repo), "--apply").returncode == 0
    fp = fingerprint(keys["a1"])
    refused = _run(env, tmp_path, "revoke-found", "-c", str(config), str(repo), "--key", fp)
    assert refused.returncode == 1 and "still the vault's key of a1/openai" in refused.stdout
    assert fake_openai.is_valid(keys["a1"])
    unknown = _run(env, tmp_path, "revoke-found", "-c", str(config), str(repo), "--key",
                   "000000000000")
    assert unknown.returncode == 1 and "not found" in unknown.stdout
    forced = _run(env, tmp_path, "revoke-found", "-c", str(config), str(repo), "--key", fp,
                  "--force")
    assert forced.returncode == 0 and f"{fp}: revoked" in forced.stdout, forced.stdout
    assert not fake_openai.is_valid(keys["a1"])
    verify = _run(env, tmp_path, "scan", str(repo), "--verify", "-c", str(config), "--json")
    states = {f["fingerprint"]: f["verified"]["state"] for f in json.loads(verify.stdout)["found"]}
    assert states == {fp: "revoked", fingerprint(keys["a2"]): "live"}
    assert verify.returncode == 1, "a live key found is an incident: exit 1"


def test_import_into_aws_secrets_manager_with_the_access_key_id_beside(
        tmp_path, moto_server, fake_openai):
    iam = boto3.client("iam", region_name=REGION, endpoint_url=moto_server.url,
                       aws_access_key_id=moto_server.admin.access_key_id,
                       aws_secret_access_key=moto_server.admin.secret_access_key)
    user = f"agent-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    pair = iam.create_access_key(UserName=user)["AccessKey"]
    repo = _repo(tmp_path / "repo", {f"agents/{user}/.env": (
        f"AWS_ACCESS_KEY_ID={pair['AccessKeyId']}\n"
        f"AWS_SECRET_ACCESS_KEY={pair['SecretAccessKey']}\n")})
    config = tmp_path / "rotation-policies.toml"
    config.write_text(tomli_w.dumps({
        "rotator": {"state_url": f"sqlite:///{tmp_path / 'state.db'}"},
        "vaults": {"sm": {"type": "aws-secretsmanager", "region": REGION,
                          "endpoint_url": moto_server.url, **admin_refs()}},
        "providers": {"aws": {"type": "aws-iam", "region": REGION,
                              "endpoint_url": moto_server.url, **admin_refs()}},
        "credentials": [{"name": f"{user}/aws", "agent": user, "provider": "aws", "vault": "sm",
                         "path": f"agents/{user}/aws", "field": "AWS_SECRET_ACCESS_KEY",
                         "interval": "90d", "params": {"user_name": user}}]}))
    env = {**os.environ, **admin_env(moto_server)}
    try:
        _import_and_rotate_aws(env, tmp_path, config, repo, moto_server, iam, user, pair)
    finally:
        _forget(repo)


def _import_and_rotate_aws(env: dict[str, str], tmp_path: Path, config: Path, repo: Path,
                           moto_server: Any, iam: Any, user: str, pair: dict[str, str]) -> None:
    result = _run(env, tmp_path, "import", "-c", str(config), str(repo), "--apply")
    assert result.returncode == 0, result.stdout
    assert pair["SecretAccessKey"] not in result.stdout
    sm = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_server.url,
                      aws_access_key_id=moto_server.admin.access_key_id,
                      aws_secret_access_key=moto_server.admin.secret_access_key)
    # The label is given: moto answers a read without one with a stale version.
    stored = json.loads(sm.get_secret_value(SecretId=f"agents/{user}/aws",
                                            VersionStage="AWSCURRENT")["SecretString"])
    assert stored == {"AWS_SECRET_ACCESS_KEY": pair["SecretAccessKey"],
                      "AWS_ACCESS_KEY_ID": pair["AccessKeyId"]}
    verified = _run(env, tmp_path, "scan", str(repo), "--verify", "-c", str(config), "--json")
    assert {f["verified"]["state"] for f in json.loads(verified.stdout)["found"]} == {"live"}
    # The first rotation adopts the imported pair (identified through its id) and revokes it.
    rotated = _run(env, tmp_path, "rotate-now", "-c", str(config), f"{user}/aws",
                   "--revoke-immediately", "--yes")
    assert rotated.returncode == 0, rotated.stdout
    ids = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]]
    assert pair["AccessKeyId"] not in ids and len(ids) == 1
    after = _run(env, tmp_path, "scan", str(repo), "--verify", "-c", str(config), "--json")
    assert {f["verified"]["state"] for f in json.loads(after.stdout)["found"]} == {"revoked"}
