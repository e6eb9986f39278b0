"""The ``vault`` plugin against a real OpenBao dev server: KV v2, CAS, metadata, auth, errors."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import hvac
import pytest
from pydantic import ValidationError

from rotator.errors import NotFound, PermanentError, RotatorError, TransientError
from rotator.interfaces import Secret
from rotator.testing.openbao import OpenBaoDevServer
from rotator.testing.server_process import free_port
from rotator.vaults.hashicorp_vault import HashiCorpVault, HashiCorpVaultSettings
from tests.fixtures.vaults import TOKEN_ENV


def unique(prefix: str = "agents") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def new_value() -> str:
    return f"sk-test-{uuid.uuid4().hex}"


def meta(key_id: str) -> dict[str, str]:
    return {"key_id": key_id, "rotated_at": "2026-01-01T00:00:00+00:00"}


def assert_no_secret(exc: BaseException, *values: str) -> None:
    """Neither the message nor its cause chain shows any of ``values``."""
    seen: BaseException | None = exc
    while seen is not None:
        for value in values:
            assert value not in str(seen)
            assert value not in repr(seen)
        seen = seen.__cause__


@pytest.fixture
def vault(make_vault: Any) -> HashiCorpVault:
    return make_vault()


@pytest.fixture
def kv(openbao: OpenBaoDevServer) -> Any:
    return openbao.client().secrets.kv.v2


def raw(kv: Any, path: str, version: int | None = None) -> dict[str, Any]:
    return kv.read_secret_version(path, version=version, mount_point="secret",
                                  raise_on_deleted_version=True)["data"]


def stage_and_promote(vault: HashiCorpVault, path: str, field: str, value: str,
                      key_id: str) -> tuple[str, str]:
    rotation_id = f"r-{uuid.uuid4().hex[:8]}"
    vault.stage(path, field, Secret(value), rotation_id)
    return rotation_id, vault.promote(path, field, rotation_id, meta(key_id))


# -- the two-phase write ---------------------------------------------------------------------


def test_stage_then_promote_keeps_other_fields_and_the_previous_version(
        vault: HashiCorpVault, kv: Any) -> None:
    path, old, new = unique(), new_value(), new_value()
    kv.create_or_update_secret(path, {"API_KEY": old, "OTHER": "keep-me"}, mount_point="secret")

    before = vault.read(path, "API_KEY")
    assert before.secret == Secret(old) and before.version == "1" and before.metadata == {}

    vault.stage(path, "API_KEY", Secret(new), "r-1")
    assert vault.read(path, "API_KEY").secret == Secret(old)  # agents still see the old key
    assert vault.read_staged(path, "API_KEY", "r-1") == Secret(new)
    assert vault.read_staged(path, "API_KEY", "r-other") is None
    assert vault.read_staged(path, "OTHER", "r-1") is None

    version = vault.promote(path, "API_KEY", "r-1", meta("key_new"))
    assert version == "2"
    after = vault.read(path, "API_KEY")
    assert after.secret == Secret(new) and after.version == "2"
    assert after.metadata == {"key_id": "key_new", "rotation_id": "r-1",
                              "rotated_at": "2026-01-01T00:00:00+00:00"}
    assert raw(kv, path)["data"] == {"API_KEY": new, "OTHER": "keep-me"}
    assert vault.read_version(path, "API_KEY", "1") == Secret(old)
    custom = raw(kv, path)["metadata"]["custom_metadata"]
    assert old not in str(custom) and new not in str(custom)

    vault.discard_staged(path, "r-1")
    assert vault.read_staged(path, "API_KEY", "r-1") is None
    vault.discard_staged(path, "r-1")  # nothing staged is success


def test_promote_is_idempotent_per_rotation(vault: HashiCorpVault, kv: Any) -> None:
    path = unique()
    kv.create_or_update_secret(path, {"K": new_value()}, mount_point="secret")
    rotation_id, version = stage_and_promote(vault, path, "K", new_value(), "key_1")
    assert vault.promote(path, "K", rotation_id, meta("key_1")) == version
    vault.discard_staged(path, rotation_id)
    # a crash after the promote and the discard: the re-run needs no staged copy
    assert vault.promote(path, "K", rotation_id, meta("key_1")) == version
    assert kv.read_secret_metadata(path, mount_point="secret")["data"]["current_version"] == 2


def test_promote_after_a_crash_between_write_and_metadata(vault: HashiCorpVault,
                                                          kv: Any) -> None:
    path, new = unique(), new_value()
    kv.create_or_update_secret(path, {"K": new_value()}, mount_point="secret")
    vault.stage(path, "K", Secret(new), "r-crash")
    kv.create_or_update_secret(path, {"K": new}, mount_point="secret")  # data written, no record
    assert vault.promote(path, "K", "r-crash", meta("key_c")) == "2"
    assert vault.read(path, "K").metadata["rotation_id"] == "r-crash"


def test_promote_creates_a_missing_secret(vault: HashiCorpVault) -> None:
    path, new = unique(), new_value()
    with pytest.raises(NotFound):
        vault.read(path, "K")
    _, version = stage_and_promote(vault, path, "K", new, "key_1")
    assert version == "1"
    assert vault.read(path, "K").secret == Secret(new)


def test_promote_without_a_staged_key_is_permanent(vault: HashiCorpVault) -> None:
    with pytest.raises(PermanentError, match="no key staged"):
        vault.promote(unique(), "K", "r-missing", meta("key_x"))


def test_read_of_a_missing_field_and_versions(vault: HashiCorpVault, kv: Any) -> None:
    path, first = unique(), new_value()
    kv.create_or_update_secret(path, {"K": first}, mount_point="secret")
    kv.create_or_update_secret(path, {"K": new_value()}, mount_point="secret")
    assert vault.read(path, "ABSENT").secret is None
    assert vault.read_version(path, "ABSENT", "1") is None
    with pytest.raises(NotFound):
        vault.read_version(path, "K", "9")
    kv.delete_secret_versions(path, [1], mount_point="secret")
    assert vault.read_version(path, "K", "1") is None
    with pytest.raises(PermanentError, match="not a KV v2 version"):
        vault.read_version(path, "K", "latest")


# -- metadata per field ----------------------------------------------------------------------


def test_metadata_is_per_field_and_ignored_once_a_person_rewrites_the_field(
        vault: HashiCorpVault, kv: Any) -> None:
    path = unique()
    kv.create_or_update_secret(path, {"A": new_value(), "B": new_value(), "C": "plain"},
                               mount_point="secret")
    rid_a, _ = stage_and_promote(vault, path, "A", new_value(), "key_a")
    rid_b, version_b = stage_and_promote(vault, path, "B", new_value(), "key_b")
    assert version_b == "3"
    # B's rotation made version 3, but A's record still holds: A's value did not change
    a = vault.read(path, "A")
    assert a.version == "3" and a.metadata["key_id"] == "key_a"
    assert a.metadata["rotation_id"] == rid_a
    assert vault.read(path, "B").metadata["rotation_id"] == rid_b
    assert vault.read(path, "C").metadata == {}

    data = raw(kv, path)["data"]
    kv.create_or_update_secret(path, {**data, "A": new_value()}, mount_point="secret")
    assert vault.read(path, "A").metadata == {}  # an adopted key: rotator did not write it
    assert vault.read(path, "B").metadata["key_id"] == "key_b"


def test_restore_makes_the_old_value_current_again(vault: HashiCorpVault, kv: Any) -> None:
    path, old = unique(), new_value()
    kv.create_or_update_secret(path, {"K": old, "OTHER": "keep-me"}, mount_point="secret")
    rotation_id, _ = stage_and_promote(vault, path, "K", new_value(), "key_new")
    undo = f"{rotation_id}/rollback"
    version = vault.restore(path, "K", "1", undo, meta("key_old"))
    assert version == "3"
    current = vault.read(path, "K")
    assert current.secret == Secret(old)
    assert current.metadata["key_id"] == "key_old" and current.metadata["rotation_id"] == undo
    assert raw(kv, path)["data"]["OTHER"] == "keep-me"
    assert vault.restore(path, "K", "1", undo, meta("key_old")) == "3"
    with pytest.raises(PermanentError, match="no field"):
        vault.restore(path, "MISSING", "1", undo, meta("key_old"))


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_promotes_of_different_fields_all_land(vault: HashiCorpVault,
                                                          kv: Any) -> None:
    path = unique()
    kv.create_or_update_secret(path, {"SEED": "x"}, mount_point="secret")
    fields = [f"F{i}" for i in range(6)]
    values = {f: new_value() for f in fields}
    for f in fields:
        vault.stage(path, f, Secret(values[f]), f"r-{f}")
    barrier = threading.Barrier(len(fields))
    errors: list[BaseException] = []

    def run(f: str) -> None:
        try:
            barrier.wait()
            vault.promote(path, f, f"r-{f}", meta(f"key-{f}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in fields]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = raw(kv, path)["data"]
    assert data == {"SEED": "x", **values}
    for f in fields:
        assert vault.read(path, f).metadata["key_id"] == f"key-{f}"


class _InterleavingVault(HashiCorpVault):
    """Lets another writer change the secret right before this vault's first write."""

    interloper: Any = None

    def _write(self, path: str, data: dict[str, Any], *, cas: int | None, what: str) -> int:
        if self.interloper is not None:
            run, self.interloper = self.interloper, None
            run()
        return super()._write(path, data, cas=cas, what=what)


def test_a_write_lost_to_check_and_set_is_retried_on_fresh_data(
        openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch, kv: Any) -> None:
    monkeypatch.setenv(TOKEN_ENV, openbao.root_token)
    vault = _InterleavingVault("main", HashiCorpVaultSettings(url=openbao.url,
                                                              token_env=TOKEN_ENV))
    path, new = unique(), new_value()
    kv.create_or_update_secret(path, {"K": "old-value-1"}, mount_point="secret")
    vault.stage(path, "K", Secret(new), "r-cas")
    vault.interloper = lambda: kv.create_or_update_secret(
        path, {"K": "old-value-1", "OTHER": "written-meanwhile"}, mount_point="secret")
    assert vault.promote(path, "K", "r-cas", meta("key_cas")) == "3"
    assert raw(kv, path)["data"] == {"K": new, "OTHER": "written-meanwhile"}
    vault.close()


# -- authentication --------------------------------------------------------------------------

RW_POLICY = """
path "secret/data/{p}/*"              {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/{p}/*"          {{ capabilities = [{meta}] }}
path "secret/data/{p}-ro/*"           {{ capabilities = ["read"] }}
path "secret/data/rotator/pending/*"  {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/rotator/pending/*" {{ capabilities = ["delete"] }}
"""


def test_token_file_auth(make_vault: Any, openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(openbao.root_token + "\n")
    vault = make_vault(token_file=str(token_file))
    vault.health()
    path = unique()
    stage_and_promote(vault, path, "K", new_value(), "key_1")
    assert vault.read(path, "K").version == "1"


def test_approle_auth_relogin_and_metadata_without_patch_capability(
        make_vault: Any, openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    prefix = unique("approle")
    policy = RW_POLICY.format(p=prefix, meta='"read", "update"')  # no "patch": fallback path
    role_id, secret_id = openbao.enable_approle(policy, role="rotator-test")
    monkeypatch.setenv("ROTATOR_TEST_ROLE_ID", role_id)
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)
    vault = make_vault(approle={"role_id_env": "ROTATOR_TEST_ROLE_ID",
                                "secret_id_file": str(secret_file)})
    vault.health()
    path = f"{prefix}/svc"
    rotation_id, version = stage_and_promote(vault, path, "K", new_value(), "key_1")
    assert vault.read(path, "K").metadata["rotation_id"] == rotation_id

    token = vault._auth.current()[1]
    openbao.client().auth.token.revoke(token.reveal())  # as if it had expired
    assert vault.read(path, "K").version == version  # logged in again


def test_approle_with_a_wrong_secret_id(make_vault: Any, openbao: OpenBaoDevServer,
                                        monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    role_id, _ = openbao.enable_approle('path "secret/*" { capabilities = ["read"] }',
                                        role="rotator-wrong")
    monkeypatch.setenv("ROTATOR_TEST_ROLE_ID", role_id)
    bogus = f"not-the-secret-id-{uuid.uuid4()}"
    (tmp_path / "sid").write_text(bogus)
    vault = make_vault(approle={"role_id_env": "ROTATOR_TEST_ROLE_ID",
                                "secret_id_file": str(tmp_path / "sid")})
    with pytest.raises(PermanentError, match="AppRole login") as caught:
        vault.health()
    assert_no_secret(caught.value, bogus)


def test_missing_credentials_name_the_setting(make_vault: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROTATOR_TEST_UNSET", raising=False)
    with pytest.raises(PermanentError, match=r"ROTATOR_TEST_UNSET \(token_env\)"):
        make_vault(token_env="ROTATOR_TEST_UNSET").read(unique(), "K")
    with pytest.raises(PermanentError, match=r"token_file .*nope"):
        make_vault(token_file=str(tmp_path / "nope")).read(unique(), "K")


def test_an_invalid_token_fails_health(make_vault: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = f"s.bogus-{uuid.uuid4().hex}"
    monkeypatch.setenv("ROTATOR_TEST_BOGUS", bogus)
    with pytest.raises(PermanentError, match="permission denied") as caught:
        make_vault(token_env="ROTATOR_TEST_BOGUS").health()
    assert_no_secret(caught.value, bogus)


def test_settings_need_exactly_one_auth_method(openbao: OpenBaoDevServer) -> None:
    with pytest.raises(ValidationError, match="set exactly one of token_env, token_file"):
        HashiCorpVaultSettings(url=openbao.url)
    with pytest.raises(ValidationError, match="found token_env, token_file"):
        HashiCorpVaultSettings(url=openbao.url, token_env="X", token_file="/y")
    with pytest.raises(ValidationError, match="http"):
        HashiCorpVaultSettings(url="127.0.0.1:8200", token_env="X")
    with pytest.raises(ValidationError):
        HashiCorpVaultSettings(url=openbao.url, token_env="X", unknown=1)


# -- errors ----------------------------------------------------------------------------------


def test_forbidden_path_is_permanent_and_names_path_and_capability(
        make_vault: Any, openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch,
        kv: Any) -> None:
    allowed, denied = unique("allowed"), unique("denied")
    token = openbao.create_token(RW_POLICY.format(p=allowed, meta='"patch"'),
                                 name=f"p-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("ROTATOR_TEST_LIMITED", token)
    vault = make_vault(token_env="ROTATOR_TEST_LIMITED")
    stage_and_promote(vault, f"{allowed}/ok", "K", new_value(), "key_1")  # "patch" suffices

    value = new_value()
    kv.create_or_update_secret(denied, {"K": value}, mount_point="secret")
    with pytest.raises(PermanentError, match="permission denied") as caught:
        vault.read(denied, "K")
    assert f'"read" on "secret/data/{denied}"' in str(caught.value)
    assert "vault 'main'" in str(caught.value)
    assert_no_secret(caught.value, value, token)

    new = new_value()
    read_only = f"{allowed}-ro/svc"
    vault.stage(read_only, "K", Secret(new), "r-ro")
    with pytest.raises(PermanentError, match='"create" and "update"') as caught:
        vault.promote(read_only, "K", "r-ro", meta("key_ro"))
    assert f"secret/data/{read_only}" in str(caught.value)
    assert_no_secret(caught.value, new, token)


def test_missing_mount_is_not_found_with_a_hint(make_vault: Any) -> None:
    vault = make_vault(mount="secrt")
    with pytest.raises(NotFound, match=r"no KV v2 mount 'secrt'.*check `mount`"):
        vault.read(unique(), "K")
    with pytest.raises(NotFound, match="secrt"):
        vault.health()


def test_a_kv_version_1_mount_fails_health(make_vault: Any, openbao: OpenBaoDevServer) -> None:
    mount = f"kv1-{uuid.uuid4().hex[:6]}"
    openbao.client().sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
    with pytest.raises(PermanentError, match="not KV version 2"):
        make_vault(mount=mount).health()


def test_unreachable_vault_is_transient(make_vault: Any) -> None:
    vault = make_vault(url=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(TransientError, match="unreachable"):
        vault.health()
    with pytest.raises(TransientError):
        vault.read(unique(), "K")
    value = new_value()
    with pytest.raises(TransientError) as caught:
        vault.stage(unique(), "K", Secret(value), "r-1")
    assert_no_secret(caught.value, value)


def test_a_sealed_vault_says_unseal_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with OpenBaoDevServer() as server:
        monkeypatch.setenv(TOKEN_ENV, server.root_token)
        vault = HashiCorpVault("sealed", HashiCorpVaultSettings(url=server.url,
                                                                token_env=TOKEN_ENV))
        vault.health()
        path = unique()
        # Staged by another process: the one that stages a key answers read_staged and
        # promote from what it wrote (rotator.vaults.recent), sealed vault or not.
        HashiCorpVault("stager", HashiCorpVaultSettings(
            url=server.url, token_env=TOKEN_ENV)).stage(path, "K", Secret(new_value()), "r-1")
        server.client().sys.seal()
        # Sealed means "not serving right now": transient for every operation, so rotations
        # wait for the unseal instead of failing; the message still says what to do.
        with pytest.raises(TransientError, match=r"'sealed' at .* is sealed: unseal it") as caught:
            vault.health()
        assert_no_secret(caught.value, server.root_token)
        value = new_value()
        calls = {
            "read": lambda: vault.read(path, "K"),
            "read_staged": lambda: vault.read_staged(path, "K", "r-1"),
            "stage": lambda: vault.stage(path, "K", Secret(value), "r-2"),
            "promote": lambda: vault.promote(path, "K", "r-1", {"key_id": "k1"}),
            "restore": lambda: vault.restore(path, "K", "1", "r-1/rollback", {}),
            "discard_staged": lambda: vault.discard_staged(path, "r-1"),
        }
        for name, call in calls.items():
            with pytest.raises(TransientError, match="is sealed") as caught:
                call()
            assert not isinstance(caught.value, PermanentError), name
            assert_no_secret(caught.value, value)
        vault.close()
        tmpdir = server._tmpdir
        assert tmpdir is not None and Path(tmpdir, "home").is_dir()
    assert not server.running and server.pid is None
    assert not Path(tmpdir).exists()


def test_dev_server_keeps_to_itself(openbao: OpenBaoDevServer) -> None:
    assert openbao.url.startswith("http://127.0.0.1:") and openbao.pid
    assert openbao.health()["sealed"] is False
    assert isinstance(openbao.client(), hvac.Client)


def test_errors_are_rotator_errors(vault: HashiCorpVault) -> None:
    with pytest.raises(RotatorError):
        vault.read("", "K")
