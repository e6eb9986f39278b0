"""The ``postgres`` provider against a real PostgreSQL 15 cluster (SCRAM only, every statement
logged): what the contract suite cannot see.

- The server gets a SCRAM verifier, never a plaintext: pg_authid holds exactly the verifier,
  and the password appears neither in the server log nor in pg_stat_statements.
- ``single`` (in place): ``generate`` changes nothing, ``apply`` is idempotent, rollback puts
  the old key back, ``revoke`` of a key no longer held leaves the role alone.
- ``alternating``: the old role works through the grace period, the free role is chosen by
  the markers, ``revoke`` scrambles a role only if its marker still names the key's rotation.
- Misconfiguration gives messages that say what to fix, and never a password.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import tomli_w
from pydantic import ValidationError

from providers.postgres.provider import PostgresParams, PostgresProvider, PostgresSettings
from providers.postgres.scram import scram_sha256_verifier
from rotator.errors import CredentialRejected, PermanentError, TransientError, UnsupportedOperation
from rotator.interfaces import CredentialInfo, NewKey, Secret
from rotator.testing.postgres import PostgresCluster
from rotator.testing.provider_contract import assert_no_secret_in_exception, new_rotation_id
from tests.harnesses.base import SeededCredential
from tests.harnesses.postgres import PostgresHarness, libpq_verifier, marker_rid
from tests.support import free_port, remember_issued

# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def single(postgres_single: PostgresHarness) -> Iterator[tuple[PostgresHarness,
                                                                PostgresProvider]]:
    provider = postgres_single.provider()
    yield postgres_single, provider
    provider.close()


@pytest.fixture
def alternating(postgres_alternating: PostgresHarness) -> Iterator[tuple[PostgresHarness,
                                                                          PostgresProvider]]:
    provider = postgres_alternating.provider()
    yield postgres_alternating, provider
    provider.close()


def info(seeded: SeededCredential) -> CredentialInfo:
    return CredentialInfo(name="agent/pg", agent="agent",
                          params=PostgresParams.model_validate(seeded.params))


def authid(cluster: PostgresCluster, role: str) -> tuple[str | None, str | None]:
    """(stored password verifier, comment) of ``role``, read as the superuser."""
    with cluster.connect_admin() as conn:
        row = conn.execute("SELECT rolpassword, shobj_description(oid, 'pg_authid') "
                           "FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
    assert row is not None, f"role {role} does not exist"
    return row[0], row[1]


def new_key(harness: PostgresHarness, seeded: SeededCredential, provider: PostgresProvider,
            rid: str | None = None, *, apply: bool = True) -> NewKey:
    key = provider.generate(info(seeded), rid or new_rotation_id())
    harness.observe(seeded, key.secret.reveal())
    if apply:
        provider.apply(info(seeded), key)
    return key


def role_of(key: NewKey) -> str:
    return key.key_id.rpartition("@")[0]


# -- the server never sees a plaintext ---------------------------------------------------------


def test_server_gets_the_verifier_never_the_plaintext(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeded = harness.seed(1)
    role = seeded.extra["roles"][0]
    key = new_key(harness, seeded, provider)
    password = key.secret.reveal()

    stored, comment = authid(harness.cluster, role)
    assert stored is not None and stored.startswith("SCRAM-SHA-256$4096:")
    salt = base64.b64decode(stored.split("$")[1].split(":")[1])
    assert scram_sha256_verifier(password, salt=salt) == stored, (
        "pg_authid does not hold the verifier of the new password")
    assert marker_rid(comment) == key.key_id.rpartition("@")[2]
    assert harness.login_ok(role, password)

    log_text = harness.cluster.log_text()
    assert f'ALTER ROLE "{role}" PASSWORD \'SCRAM-SHA-256$4096:' in log_text, (
        "the server log lacks the ALTER ROLE statement: is log_statement=all in effect?")
    assert password not in log_text, "the plaintext password is in the server log"
    assert seeded.value is not None and seeded.value not in log_text

    if not harness.cluster.pg_stat_statements:
        pytest.skip("pg_stat_statements is not installed: the log check above still ran")
    with harness.cluster.connect_admin() as conn:
        texts = [q for (q,) in conn.execute("SELECT query FROM pg_stat_statements")]
    assert any(role in q for q in texts), "pg_stat_statements did not record the ALTER ROLE"
    assert not any(password in q for q in texts), "the plaintext is in pg_stat_statements"


@pytest.mark.parametrize("password", [
    "plain-ASCII-123", "\uff46\uff55\uff4c\uff4cwidth", "pässwörd\u00a0nbsp", "zero\u200bwidth",
    "\u00adsoft",
    "\u05d0\u05d1\u05d2", "\u05d0mixed", "ctl\x07char", "\u2163roman", "\ufb01ligature",
])
def test_verifier_matches_libpq(postgres_cluster: PostgresCluster, password: str) -> None:
    """Same salt, same verifier as libpq's PQencryptPasswordConn, SASLprep cases included:
    a verifier hashed differently from the server's own hashing locks everyone out."""
    with postgres_cluster.connect_admin() as conn:
        theirs = libpq_verifier(conn, "someone", password)
    salt = base64.b64decode(theirs.split("$")[1].split(":")[1])
    assert scram_sha256_verifier(password, salt=salt) == theirs


def test_apply_of_a_non_ascii_adopted_password_logs_in(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    """Rollback re-applies whatever password was there before, not only generated ones."""
    harness, provider = single
    seeded = harness.seed(2)
    legacy = "\uff2c\uff45gacy\u00a0pässwörd-" + base64.b32encode(bytes(8)).decode()
    harness.observe(seeded, legacy)
    provider.apply(info(seeded), NewKey(seeded.key_id or "", Secret(legacy)))
    assert harness.login_ok(seeded.extra["roles"][0], legacy)


# -- single: in place --------------------------------------------------------------------------


def test_single_generate_has_no_side_effect(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeded = harness.seed(3)
    role = seeded.extra["roles"][0]
    before = authid(harness.cluster, role)
    key = new_key(harness, seeded, provider, apply=False)
    assert key.key_id.startswith(f"{role}@r")
    assert authid(harness.cluster, role) == before
    assert harness.login_ok(role, seeded.value or "")
    assert not harness.login_ok(role, key.secret.reveal())


def test_single_apply_is_idempotent(single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeded = harness.seed(4)
    role = seeded.extra["roles"][0]
    rid = new_rotation_id()
    key = new_key(harness, seeded, provider, rid)
    provider.apply(info(seeded), key)
    assert harness.login_ok(role, key.secret.reveal())
    assert not harness.login_ok(role, seeded.value or "")
    assert authid(harness.cluster, role)[1] == f"rotator:{rid}"
    assert provider.find_by_rotation(info(seeded), rid) == [key.key_id]
    assert harness.live_key_ids(seeded) == {key.key_id}


def test_single_rollback_puts_the_old_key_back(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    """What the engine does on rollback: apply the old key (its id names the adopted key or an
    older rotation), then revoke this rotation's keys, which must leave the old one alone."""
    harness, provider = single
    seeded = harness.seed(5)
    role = seeded.extra["roles"][0]
    cred = info(seeded)
    first = new_key(harness, seeded, provider)
    rid = new_rotation_id()
    second = new_key(harness, seeded, provider, rid)

    provider.apply(cred, NewKey(first.key_id, first.secret))
    assert provider.find_by_rotation(cred, rid) == []
    provider.revoke(cred, second.key_id)
    assert harness.login_ok(role, first.secret.reveal())
    assert not harness.login_ok(role, second.secret.reveal())
    assert harness.live_key_ids(seeded) == {first.key_id}

    # The adopted legacy key, as the engine passes it when identify could not name it.
    assert seeded.value is not None
    provider.apply(cred, NewKey("adopted", Secret(seeded.value)))
    provider.revoke(cred, first.key_id)
    assert harness.login_ok(role, seeded.value)
    assert harness.live_key_ids(seeded) == {f"{role}@adopted"}


def test_single_create_is_refused(single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeded = harness.seed(6)
    with pytest.raises(UnsupportedOperation, match="generate"):
        provider.create(info(seeded), new_rotation_id())
    assert harness.login_ok(seeded.extra["roles"][0], seeded.value or "")


def test_single_revoke_of_the_adopted_key_kills_it(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    """``--revoke-first`` on a role rotator never marked: the legacy password dies."""
    harness, provider = single
    seeded = harness.seed(7)
    role = seeded.extra["roles"][0]
    assert provider.identify(info(seeded), Secret(seeded.value or "")) == f"{role}@adopted"
    provider.revoke(info(seeded), f"{role}@adopted")
    assert not harness.login_ok(role, seeded.value or "")
    assert authid(harness.cluster, role)[1] == "rotator-revoked:adopted"
    provider.revoke(info(seeded), f"{role}@adopted")  # again: already gone


def test_operator_comment_is_kept(single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeded = harness.seed(8)
    role = seeded.extra["roles"][0]
    with harness.cluster.connect_admin() as conn:
        conn.execute(psycopg.sql.SQL("COMMENT ON ROLE {} IS 'billing agent; owner: team-x'")
                     .format(psycopg.sql.Identifier(role)))
    key = new_key(harness, seeded, provider)
    comment = authid(harness.cluster, role)[1] or ""
    assert comment.splitlines()[0] == "billing agent; owner: team-x"
    assert marker_rid(comment) == key.key_id.rpartition("@")[2]
    provider.revoke(info(seeded), key.key_id)
    comment = authid(harness.cluster, role)[1] or ""
    assert comment.splitlines()[0] == "billing agent; owner: team-x"
    assert len(comment.splitlines()) == 2 and marker_rid(comment) is None


# -- alternating -------------------------------------------------------------------------------


def test_alternating_old_role_works_through_the_grace(
        alternating: tuple[PostgresHarness, PostgresProvider]) -> None:
    """The engine's flow for an adopted key: identify (marks the role in use), generate,
    stage, apply on the other role; both work until the old one is revoked."""
    harness, provider = alternating
    seeded = harness.seed(10)
    role_a, role_b = seeded.extra["roles"]
    cred = info(seeded)
    legacy = Secret(seeded.value or "")
    assert provider.companion_fields(cred) == ("PGUSER",)
    assert provider.identify(cred, legacy, seeded.companions) == f"{role_a}@adopted"
    assert marker_rid(authid(harness.cluster, role_a)[1]) == "adopted"

    key = new_key(harness, seeded, provider)
    assert role_of(key) == role_b
    assert provider.companions(cred, key.key_id) == {"PGUSER": role_b}
    provider.verify(cred, key.secret, key_id=key.key_id)
    provider.verify(cred, legacy, key_id=f"{role_a}@adopted")
    assert harness.login_ok(role_a, legacy.reveal())  # grace: the old role still works

    provider.revoke(cred, f"{role_a}@adopted")
    assert not harness.login_ok(role_a, legacy.reveal())
    assert harness.login_ok(role_b, key.secret.reveal())
    with pytest.raises(CredentialRejected):
        provider.verify(cred, legacy, key_id=f"{role_a}@adopted")
    # The next rotation writes the role just revoked, and leaves role_b alone.
    nxt = new_key(harness, seeded, provider)
    assert role_of(nxt) == role_a
    assert harness.live_key_ids(seeded) == {key.key_id, nxt.key_id}


def test_alternating_revoke_scrambles_only_if_the_marker_matches(
        alternating: tuple[PostgresHarness, PostgresProvider]) -> None:
    """Three rotations reuse role_b: revoking the first one's key must not kill the third's."""
    harness, provider = alternating
    seeded = harness.seed(11)
    cred = info(seeded)
    r1 = provider.create(cred, new_rotation_id())
    r2 = provider.create(cred, new_rotation_id())
    r3 = provider.create(cred, new_rotation_id())
    for key in (r1, r2, r3):
        harness.observe(seeded, key.secret.reveal())
    assert role_of(r1) == role_of(r3) != role_of(r2)
    provider.revoke(cred, r1.key_id)
    assert harness.login_ok(role_of(r3), r3.secret.reveal())
    assert harness.login_ok(role_of(r2), r2.secret.reveal())
    provider.revoke(cred, r2.key_id)
    assert not harness.login_ok(role_of(r2), r2.secret.reveal())
    assert harness.live_key_ids(seeded) == {r3.key_id}


def test_alternating_identify_and_verify_without_the_username(
        alternating: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = alternating
    seeded = harness.seed(12)
    cred = info(seeded)
    key = provider.create(cred, new_rotation_id())
    harness.observe(seeded, key.secret.reveal())
    assert provider.identify(cred, key.secret) == key.key_id  # no companions: tries both
    assert provider.identify(cred, key.secret, {"PGUSER": role_of(key)}) == key.key_id
    provider.verify(cred, key.secret)  # no key id: either role may accept it
    with pytest.raises(CredentialRejected):
        provider.verify(cred, Secret("not-the-password-of-either-role"))
    assert provider.identify(cred, Secret("not-the-password-of-either-role")) is None


def test_alternating_without_markers_prefers_the_role_without_a_password(
        postgres_alternating: PostgresHarness) -> None:
    """A superuser admin can see which role has no password yet, whatever the order of
    ``roles``; a CREATEROLE admin cannot, and takes the second role."""
    harness = postgres_alternating
    seeded = harness.seed(13)
    role_a, role_b = seeded.extra["roles"]
    flipped = SeededCredential(params={**seeded.params, "roles": [role_b, role_a]},
                               field=seeded.field, value=seeded.value, key_id=seeded.key_id,
                               extra=seeded.extra)
    cluster = harness.cluster
    settings = PostgresSettings(host=cluster.host, port=cluster.port, admin_user=cluster.superuser,
                                admin_password={"env": "UNUSED"}, sslmode="disable")
    superuser = PostgresProvider("pg-super", settings, lambda ref: cluster.password)
    try:
        assert role_of(superuser.generate(info(flipped), new_rotation_id())) == role_b
    finally:
        superuser.close()
    provider = harness.provider()
    try:
        assert role_of(provider.generate(info(flipped), new_rotation_id())) == role_a
    finally:
        provider.close()


# -- concurrency -------------------------------------------------------------------------------


def test_one_provider_serves_many_threads(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeds = [harness.seed(20 + i) for i in range(12)]
    keys: dict[int, NewKey] = {}
    errors: list[BaseException] = []

    def rotate(i: int) -> None:
        try:
            key = provider.generate(info(seeds[i]), new_rotation_id())
            harness.observe(seeds[i], key.secret.reveal())
            provider.apply(info(seeds[i]), key)
            provider.verify(info(seeds[i]), key.secret, key_id=key.key_id)
            keys[i] = key
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, [type(e).__name__ for e in errors]
    assert all(harness.login_ok(role_of(keys[i]), keys[i].secret.reveal()) for i in keys)


# -- errors say what to fix, never a password --------------------------------------------------


def test_wrong_admin_password_is_a_clear_permanent_error(
        postgres_single: PostgresHarness) -> None:
    harness = postgres_single
    seeded = harness.seed(30)
    wrong = Secret("wrong-admin-password-" + "x" * 12)
    remember_issued([wrong.reveal()])
    settings = PostgresSettings.model_validate(
        {k: v for k, v in harness.provider_table().items() if k != "type"})
    provider = PostgresProvider("pg-prod", settings, lambda ref: wrong)
    try:
        for call in (provider.check_access,
                     lambda: provider.find_by_rotation(info(seeded), "r1"),
                     lambda: provider.apply(info(seeded), NewKey(f"{seeded.extra['roles'][0]}@r1",
                                                                 Secret("n" * 40)))):
            with pytest.raises(PermanentError) as caught:
                call()
            message = str(caught.value)
            assert "admin_password" in message and harness.env_var in message
            assert "[providers.pg-prod]" in message and "password authentication failed" in message
            assert_no_secret_in_exception(caught.value, [wrong, "n" * 40,
                                                         harness.admin_password], "admin login")
            cause = caught.value.__cause__
            assert isinstance(cause, psycopg.Error) and cause.pgconn is None, (
                "psycopg's failed connection (whose repr shows the password) is still attached")
    finally:
        provider.close()
    assert harness.login_ok(seeded.extra["roles"][0], seeded.value or "")


def test_admin_without_createrole(postgres_cluster: PostgresCluster,
                                  postgres_single: PostgresHarness) -> None:
    harness = postgres_single
    seeded = harness.seed(31)
    weak, password = f"weak_{harness.uid}", "weak-admin-" + "y" * 20
    remember_issued([password])
    with postgres_cluster.connect_admin() as conn:
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            psycopg.sql.Identifier(weak),
            psycopg.sql.Literal(libpq_verifier(conn, weak, password))))
    settings = PostgresSettings(host=postgres_cluster.host, port=postgres_cluster.port,
                                admin_user=weak, admin_password={"env": "X"}, sslmode="disable")
    provider = PostgresProvider("pg-weak", settings, lambda ref: Secret(password))
    try:
        with pytest.raises(PermanentError, match=f"ALTER ROLE {weak} CREATEROLE"):
            provider.check_access()
        key = NewKey(f"{seeded.extra['roles'][0]}@r1", Secret("z" * 40))
        with pytest.raises(PermanentError, match="needs CREATEROLE") as caught:
            provider.apply(info(seeded), key)
        assert_no_secret_in_exception(caught.value, [key.secret, password], "apply")
    finally:
        provider.close()
    good = harness.provider()
    try:
        good.check_access()
    finally:
        good.close()


def test_verify_errors(single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    seeded = harness.seed(32)
    cred = info(seeded)
    wrong = Secret("definitely-not-the-password")
    with pytest.raises(CredentialRejected) as caught:
        provider.verify(cred, wrong)
    assert_no_secret_in_exception(caught.value, [wrong], "verify")

    table = {k: v for k, v in harness.provider_table().items() if k != "type"}
    nobody = PostgresProvider("pg-down", PostgresSettings.model_validate(
        {**table, "port": free_port()}), lambda ref: Secret("unused-admin"))
    with pytest.raises(TransientError, match="Connection refused"):
        nobody.verify(cred, Secret(seeded.value or ""))
    nodb = PostgresProvider("pg-nodb", PostgresSettings.model_validate(
        {**table, "dbname": "no_such_db"}), lambda ref: Secret(harness.admin_password))
    with pytest.raises(PermanentError, match="check dbname"):
        nodb.check_access()


def test_refuses_to_rotate_the_admin_role_or_a_missing_one(
        single: tuple[PostgresHarness, PostgresProvider]) -> None:
    harness, provider = single
    admin = CredentialInfo(name="x", agent="x", params=PostgresParams(
        strategy="single", role=harness.admin_user))
    with pytest.raises(PermanentError, match="admin_user itself"):
        provider.generate(admin, new_rotation_id())
    missing = CredentialInfo(name="x", agent="x", params=PostgresParams(
        strategy="single", role=f"missing_{harness.uid}"))
    key = provider.generate(missing, new_rotation_id())
    with pytest.raises(PermanentError, match="does not exist"):
        provider.apply(missing, key)
    provider.revoke(missing, key.key_id)  # a role that is gone: its key is gone


# -- params and settings -----------------------------------------------------------------------

BAD_PARAMS: list[tuple[dict[str, Any], str, str]] = [
    ({"strategy": "single"}, "role", 'needs role = "'),
    ({"strategy": "sometimes", "role": "app"}, "strategy", 'use "single"'),
    ({"strategy": "single", "role": "app", "roles": ["a", "b"]}, "roles", 'is for strategy'),
    ({"strategy": "single", "role": "app", "username_field": "U"}, "username_field",
     "remove it"),
    ({"strategy": "single", "role": "pg_monitor"}, "role", "PostgreSQL's own roles"),
    ({"strategy": "single", "role": "r" * 64}, "role", "63 bytes"),
    ({"strategy": "alternating", "roles": ["a"]}, "roles", "exactly two roles (got 1)"),
    ({"strategy": "alternating", "roles": ["a", "b", "c"]}, "roles", "exactly two"),
    ({"strategy": "alternating", "roles": ["a", "a"]}, "roles", "give two different roles"),
    ({"strategy": "alternating"}, "roles", 'needs roles = ["app_a", "app_b"]'),
    ({"strategy": "alternating", "roles": ["a", "b"], "role": "a"}, "role",
     'roles = ["app_a", "app_b"]'),
    ({"strategy": "alternating", "roles": ["a", "b"], "username_field": " "},
     "username_field", "is empty"),
]


@pytest.mark.parametrize(("params", "key", "fragment"), BAD_PARAMS)
def test_bad_params_say_what_to_fix(params: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        PostgresParams.model_validate(params)
    errors = {e["loc"][0]: e["msg"] for e in caught.value.errors()}
    assert key in errors and fragment in errors[key], errors


def test_good_params() -> None:
    alt = PostgresParams.model_validate({"strategy": "alternating", "roles": ["a", "b"]})
    assert alt.username_field == "PGUSER" and alt.all_roles == ("a", "b")
    one = PostgresParams.model_validate({"strategy": "single", "role": " app "})
    assert one.all_roles == ("app",) and one.username_field is None


@pytest.mark.parametrize(("settings", "key", "fragment"), [
    ({"port": 70000}, "port", "less than or equal to 65535"),
    ({"sslmode": "sometimes"}, "sslmode", "verify-full"),
    ({"admin_password": "hunter2-in-the-file"}, "admin_password", ""),
    ({"admin_user": " "}, "admin_user", "CREATEROLE"),
])
def test_bad_settings(settings: dict[str, Any], key: str, fragment: str) -> None:
    base = {"host": "db", "admin_user": "rotator", "admin_password": {"env": "PG_ADMIN"}}
    with pytest.raises(ValidationError) as caught:
        PostgresSettings.model_validate({**base, **settings})
    errors = {e["loc"][0]: e["msg"] for e in caught.value.errors()}
    assert key in errors and fragment in errors[key], errors
    assert "hunter2" not in str(caught.value)


def test_rotator_check_reports_params_with_file_and_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real policy loader (with the provider registered for the test, as the
    entry point will), each problem is printed as file:line: key: message."""
    from rotator import config, plugins
    from rotator.errors import ConfigError

    real = plugins.provider_class
    monkeypatch.setattr(plugins, "provider_types", lambda: ["postgres"])
    monkeypatch.setattr(plugins, "provider_class",
                        lambda t: PostgresProvider if t == "postgres" else real(t))
    doc = {
        "rotator": {"state_url": f"sqlite:///{tmp_path / 'state.db'}"},
        "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:8200",
                            "token_env": "VAULT_TOKEN"}},
        "providers": {"pg": {"type": "postgres", "host": "db.internal", "admin_user": "rotator",
                             "admin_password": {"env": "PG_ADMIN"}}},
        "credentials": [
            {"name": "a/pg", "agent": "a", "provider": "pg", "vault": "main", "path": "a/pg",
             "field": "PGPASSWORD", "interval": "30d",
             "params": {"strategy": "alternating", "roles": ["app_a", "app_a"]}},
        ],
    }
    path = tmp_path / "rotation-policies.toml"
    path.write_text(tomli_w.dumps(doc))
    lines = path.read_text().splitlines()
    with pytest.raises(ConfigError) as caught:
        config.load_policies(path)
    shown = [str(p) for p in caught.value.problems]
    roles_line = 1 + next(i for i, line in enumerate(lines) if line.startswith("roles"))
    assert any(s.startswith(f"{path}:{roles_line}: ") and "give two different roles" in s
               for s in shown), shown

