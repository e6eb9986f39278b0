"""deploy/vault/rotator-policy.hcl is enough and no more: the daemon rotates against a real
OpenBao with a token holding exactly that policy (without Vault's "default" policy), and a token
missing any one of its stanzas fails, saying which capability it needs."""

from __future__ import annotations

import re
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomli_w

from rotator.state.store import StateStore
from rotator.testing.fake_openai import FakeOpenAIServer
from rotator.testing.openbao import OpenBaoDevServer
from tests.support import Fleet, make_fleet, staged_copies, stop_daemon, wait_for

POLICY = Path(__file__).resolve().parent.parent / "deploy" / "vault" / "rotator-policy.hcl"
_STANZA = re.compile(r'^path "([^"]+)" \{\n(?:.*\n)*?\}\n', re.MULTILINE)


def _stanzas(hcl: str) -> dict[str, str]:
    """path -> its whole ``path "..." { ... }`` block."""
    return {m.group(1): m.group(0) for m in _STANZA.finditer(hcl)}


def _fleet(tmp: Path, bao: OpenBaoDevServer, fake: FakeOpenAIServer, n: int = 1,
           interval: str = "30d") -> tuple[Fleet, str]:
    """A fleet laid out as the policy expects, under a prefix of its own: managed secrets at
    ``<prefix>/agents/...``, the admin key at ``<prefix>/rotator/admin/openai``, staging at the
    default ``rotator/pending``. Returns the fleet and the policy rewritten for its prefix."""
    fleet = make_fleet(tmp, bao, fake, n=n, grace="0s", interval=interval)
    admin = f"{fleet.prefix}/rotator/admin/openai"
    bao.client().secrets.kv.v2.create_or_update_secret(
        path=admin, secret={"key": fake.admin_key}, mount_point="secret")
    doc = tomllib.loads(fleet.config.read_text())
    doc["providers"]["openai-test"]["admin_key"]["path"] = admin
    fleet.config.write_text(tomli_w.dumps(doc))
    return fleet, _for_prefix(POLICY.read_text(), fleet.prefix)


def _for_prefix(text: str, prefix: str) -> str:
    """The policy's (or one path's) managed and admin paths moved under ``prefix/``."""
    return re.sub(r"\bsecret/(data|metadata)/(agents|rotator/admin)/", rf"secret/\1/{prefix}/\2/",
                  text)


def _token(bao: OpenBaoDevServer, name: str, hcl: str | None) -> str:
    """A token with only policy ``hcl`` (only Vault's "default" policy when None)."""
    client = bao.client()
    if hcl is None:
        created = client.auth.token.create(policies=["default"], ttl="15m")
        return str(created["auth"]["client_token"])
    bao.write_policy(name, hcl)
    created = client.auth.token.create(policies=[name], no_default_policy=True, ttl="15m")
    return str(created["auth"]["client_token"])


def _key_accepted(fleet: Fleet) -> bool:
    return all(fleet.fake.is_valid(fleet.vault_value(c)) for c in fleet.credentials)


def test_the_policy_names_every_path_rotator_uses():
    stanzas = _stanzas(POLICY.read_text())
    assert set(stanzas) == {
        "secret/data/agents/*", "secret/metadata/agents/*", "secret/data/rotator/pending/*",
        "secret/metadata/rotator/pending/*", "secret/data/rotator/admin/*",
        "auth/token/lookup-self", "auth/token/renew-self"}
    assert '"delete"' not in stanzas["secret/data/agents/*"] + stanzas["secret/metadata/agents/*"]
    assert re.search(r'capabilities = \["read"\]', stanzas["secret/data/rotator/admin/*"])
    assert "sudo" not in POLICY.read_text() and '"list"' not in POLICY.read_text()


@pytest.mark.slow
def test_the_daemon_rotates_with_a_token_holding_exactly_this_policy(tmp_path, openbao,
                                                                     fake_openai):
    fleet, hcl = _fleet(tmp_path, openbao, fake_openai, n=2)
    token = _token(openbao, f"rotator-{fleet.prefix}", hcl)
    check = fleet.cli("check", "--online", VAULT_TOKEN=token)
    assert check.returncode == 0, check.stdout + check.stderr

    daemon = fleet.start_daemon(VAULT_TOKEN=token)
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: all(any(r.outcome == "success" for r in store.rotations(c["name"]))
                             for c in fleet.credentials), timeout=60, what="first rotations")
        wait_for(lambda: not store.pending_revocations() and not store.rotations_in_grace(),
                 timeout=30, what="old keys revoked")
    finally:
        code = stop_daemon(daemon)
        store.close()
    assert code == 0
    daemon_log = sorted((tmp_path / "out").glob("*-run.stderr"))[-1].read_text()
    assert "denied" not in daemon_log, daemon_log
    fleet.assert_settled()

    emergency = fleet.cli("rotate-now", "--all", "--revoke-immediately", "--yes",
                          VAULT_TOKEN=token)
    assert emergency.returncode == 0, emergency.stdout + emergency.stderr
    fleet.assert_settled()
    assert staged_copies(openbao, f"rotator/pending/{fleet.prefix}") == [], \
        "staged keys must not outlive their rotation"


@pytest.mark.slow
def test_a_token_missing_any_stanza_fails_clearly_and_keeps_the_old_key(tmp_path, openbao,
                                                                        fake_openai):
    """Each stanza is needed: without it the daemon's check or a rotation fails with a message
    naming what the policy lacks, and the agent's key in the vault still works. Without delete
    on the staging area rotations still succeed, but copies of live keys pile up there."""
    generic = [*_stanzas(POLICY.read_text()), None]
    cases: list[tuple[str | None, str, Fleet, str, list[str]]] = []
    for path in generic:
        sub = tmp_path / f"case{len(cases)}"
        sub.mkdir()
        fleet, hcl = _fleet(sub, openbao, fake_openai)
        if path is None:  # no rotator policy at all, only Vault's default one
            token, wanted = _token(openbao, "", None), "permission denied"
        else:
            own = _for_prefix(path, fleet.prefix)
            token = _token(openbao, f"rotator-{fleet.prefix}",
                           hcl.replace(_stanzas(hcl)[own], ""))
            wanted = own.removesuffix("*")
        command = ["check", "--online"] if path and path.startswith("auth/token/") else \
            ["rotate-now", "--all", "--yes"]
        cases.append((path, token, fleet, wanted, command))

    def run(case: tuple[str | None, str, Fleet, str, list[str]]) -> tuple[int, str]:
        _, token, fleet, _, command = case
        result = fleet.cli(*command, VAULT_TOKEN=token)
        return result.returncode, result.stdout + result.stderr

    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(run, cases))
    for (path, _, fleet, wanted, _), (code, output) in zip(cases, outcomes, strict=True):
        assert wanted in output and "policy needs" in output, output
        assert _key_accepted(fleet), f"without {wanted!r}: the vault holds a dead key"
        if path == "secret/metadata/rotator/pending/*":
            assert code == 0 and "not removed" in output, output
            assert staged_copies(openbao, f"rotator/pending/{fleet.prefix}"), \
                "the staged copy should have stayed"
        else:
            assert code != 0, f"without {wanted!r} the command succeeded:\n{output}"
