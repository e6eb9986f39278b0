"""The ``aws-secretsmanager`` vault against moto: the staging labels exactly as AWS documents
them, ClientRequestToken idempotence, fields kept, concurrent writers, and clear errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from rotator.errors import NotFound, PermanentError, RotatorError, TransientError
from rotator.interfaces import Secret
from rotator.testing.moto_server import REGION, MotoServer
from rotator.testing.provider_contract import assert_no_secret_in_exception, new_rotation_id
from rotator.vaults.aws_secretsmanager import (
    SecretsManagerSettings,
    SecretsManagerVault,
    _escape,
    _unescape,
    version_id,
)
from tests.harnesses.aws import AwsIamHarness, SecretsManagerHarness, admin_env, admin_refs
from tests.support import free_port

FIELD, ID = "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"


@pytest.fixture
def vault(moto_server: MotoServer,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretsManagerVault]:
    for name, value in admin_env(moto_server).items():
        monkeypatch.setenv(name, value)
    vault = SecretsManagerVault("sm", SecretsManagerSettings(
        region=REGION, endpoint_url=moto_server.url, timeout=5, **admin_refs()))
    try:
        yield vault
    finally:
        vault.close()


@pytest.fixture
def sm(secretsmanager_harness: SecretsManagerHarness) -> SecretsManagerHarness:
    return secretsmanager_harness


@pytest.fixture
def path(sm: SecretsManagerHarness) -> str:
    """A secret an operator wrote: an old key, its id, and a field rotator must keep."""
    name = f"agents/{uuid.uuid4().hex[:12]}/aws"
    sm._sm.create_secret(Name=name, SecretString=json.dumps(
        {FIELD: "old-secret-0123456789", ID: "AKIAOLD", "OTHER": "keep-me", "PORT": 5432}))
    return name


def meta(key_id: str, rid: str) -> dict[str, str]:
    return {"key_id": key_id, "rotation_id": rid, "rotated_at": "2026-11-23T13:15:00+00:00"}


def labels_of(sm: SecretsManagerHarness, path: str) -> dict[str, set[str]]:
    """label -> the versions carrying it (each should carry one)."""
    found: dict[str, set[str]] = {}
    for vid, stages in sm.stages(path).items():
        for stage in stages:
            found.setdefault(stage, set()).add(vid)
    return found


# -- the staging-label protocol ------------------------------------------------------------------


def test_stage_promote_and_rollback_move_the_aws_labels(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    (old,) = labels_of(sm, path)["AWSCURRENT"]
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("new-secret-0123456789"), rid, {ID: "AKIANEW"})
    staged = version_id(rid, 0)
    labels = labels_of(sm, path)
    assert labels["AWSPENDING"] == {staged}, "the new key must be AWSPENDING"
    assert labels["AWSCURRENT"] == {old} and "AWSPREVIOUS" not in labels
    assert labels[f"rotator:{rid}"] == {staged}
    assert sm.read(path)[FIELD] == "old-secret-0123456789", "agents must not see it yet"

    promoted = vault.promote(path, FIELD, rid, meta("AKIANEW", rid))
    assert promoted == staged, "promote moves AWSCURRENT to the staged version itself"
    labels = labels_of(sm, path)
    assert labels["AWSCURRENT"] == {staged} and labels["AWSPREVIOUS"] == {old}
    assert "AWSPENDING" not in labels and f"rotator:{rid}" not in labels
    assert sm.read(path) == {FIELD: "new-secret-0123456789", ID: "AKIANEW", "OTHER": "keep-me",
                             "PORT": "5432"}

    undo = f"{rid}/rollback"
    restored = vault.restore(path, FIELD, old, undo, meta("AKIAOLD", undo), (ID,))
    assert restored == old, "rollback moves AWSCURRENT back to the old version"
    labels = labels_of(sm, path)
    assert labels["AWSCURRENT"] == {old} and labels["AWSPREVIOUS"] == {staged}
    value = vault.read(path, FIELD, (ID,))
    assert value.secret == Secret("old-secret-0123456789") and value.companions == {ID: "AKIAOLD"}
    assert value.metadata["rotation_id"] == undo
    assert len(sm.version_ids(path)) == 2, "neither promote nor rollback wrote a version"


def test_client_request_token_makes_stage_idempotent(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    rid = new_rotation_id()
    for _ in range(3):
        vault.stage(path, FIELD, Secret("new-secret-0123456789"), rid, {ID: "AKIANEW"})
    assert set(sm.version_ids(path)) == {next(iter(labels_of(sm, path)["AWSCURRENT"])),
                                         version_id(rid, 0)}
    # A retry after a timeout that had in fact succeeded sends the same token: AWS ignores it.
    answer = sm._sm.put_secret_value(
        SecretId=path, ClientRequestToken=version_id(rid, 0),
        SecretString=sm._sm.get_secret_value(SecretId=path, VersionId=version_id(rid, 0))
        ["SecretString"], VersionStages=["AWSPENDING", f"rotator:{rid}"])
    assert answer["VersionId"] == version_id(rid, 0) and len(sm.version_ids(path)) == 2


def test_restaging_after_a_discard_is_a_new_version_of_the_same_rotation(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    """An engine re-running create after a crash discards, creates another key and stages it
    under the same rotation id: versions cannot change, so it takes the next derived id."""
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("first-try-0123456789"), rid, {ID: "AKIA1"})
    vault.discard_staged(path, rid)
    assert vault.read_staged(path, FIELD, rid) is None
    assert "AWSPENDING" not in labels_of(sm, path)
    vault.stage(path, FIELD, Secret("second-try-0123456789"), rid, {ID: "AKIA2"})
    assert vault.read_staged(path, FIELD, rid) == Secret("second-try-0123456789")
    assert labels_of(sm, path)["AWSPENDING"] == {version_id(rid, 1)}
    version = vault.promote(path, FIELD, rid, meta("AKIA2", rid))
    assert version == version_id(rid, 1)
    assert sm.read(path)[ID] == "AKIA2"


def test_a_secret_that_does_not_exist_is_created_empty_at_the_first_stage(
        vault: SecretsManagerVault, sm: SecretsManagerHarness) -> None:
    path = f"new/{uuid.uuid4().hex[:12]}"
    with pytest.raises(NotFound):
        vault.read(path, FIELD)
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("brand-new-0123456789"), rid)
    assert sm.read(path) == {}, "AWS makes a first version current: it must be empty"
    assert vault.read(path, FIELD).secret is None
    vault.promote(path, FIELD, rid, meta("k1", rid))
    assert sm.read(path) == {FIELD: "brand-new-0123456789"}


# -- other writers -------------------------------------------------------------------------------


def test_two_fields_of_one_secret_rotating_at_once_both_land(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    """AWSPENDING can sit on one version only, and the second promote must not undo the
    first: each rotation keeps its own label, and promote rebuilds on the current JSON."""
    first, second = new_rotation_id(), new_rotation_id()
    vault.stage(path, FIELD, Secret("aws-new-0123456789"), first, {ID: "AKIANEW"})
    vault.stage(path, "OPENAI_API_KEY", Secret("sk-new-0123456789"), second)
    assert vault.read_staged(path, FIELD, first) == Secret("aws-new-0123456789")
    assert vault.read_staged(path, "OPENAI_API_KEY", second) == Secret("sk-new-0123456789")
    v1 = vault.promote(path, FIELD, first, meta("AKIANEW", first))
    v2 = vault.promote(path, "OPENAI_API_KEY", second, meta("key_2", second))
    assert v2 != v1
    assert sm.read(path) == {FIELD: "aws-new-0123456789", ID: "AKIANEW", "OTHER": "keep-me",
                             "PORT": "5432", "OPENAI_API_KEY": "sk-new-0123456789"}
    assert vault.read(path, FIELD).metadata["rotation_id"] == first
    assert vault.read(path, "OPENAI_API_KEY").metadata["rotation_id"] == second
    assert "AWSPENDING" not in labels_of(sm, path)
    again = vault.promote(path, FIELD, first, meta("AKIANEW", first))
    assert again == v2, "a repeated promote returns the current version and writes nothing"


def test_an_edit_between_stage_and_promote_is_kept(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("new-secret-0123456789"), rid, {ID: "AKIANEW"})
    sm.write(path, {**sm.read(path), "OTHER": "edited"})
    vault.promote(path, FIELD, rid, meta("AKIANEW", rid))
    assert sm.read(path)["OTHER"] == "edited"
    assert sm.read(path)[FIELD] == "new-secret-0123456789"


def test_rollback_keeps_what_changed_in_other_fields_since(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    (old,) = labels_of(sm, path)["AWSCURRENT"]
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("new-secret-0123456789"), rid, {ID: "AKIANEW"})
    vault.promote(path, FIELD, rid, meta("AKIANEW", rid))
    other = new_rotation_id()  # another credential of the same secret rotates meanwhile
    vault.stage(path, "OTHER", Secret("other-new-0123456789"), other)
    vault.promote(path, "OTHER", other, meta("o2", other))

    undo = f"{rid}/rollback"
    restored = vault.restore(path, FIELD, old, undo, meta("AKIAOLD", undo), (ID,))
    assert restored != old, "moving AWSCURRENT back would also undo the other rotation"
    assert sm.read(path) == {FIELD: "old-secret-0123456789", ID: "AKIAOLD",
                             "OTHER": "other-new-0123456789", "PORT": "5432"}
    assert vault.restore(path, FIELD, old, undo, meta("AKIAOLD", undo), (ID,)) == restored


def test_a_key_written_by_hand_after_rotator_reads_as_adopted(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("new-secret-0123456789"), rid)
    vault.promote(path, FIELD, rid, meta("AKIANEW", rid))
    sm.write(path, {**sm.read(path), "OTHER": "edited"})
    assert vault.read(path, FIELD).metadata["key_id"] == "AKIANEW", "field unchanged: still ours"
    sm.write(path, {**sm.read(path), FIELD: "pasted-by-hand-0123456789"})
    assert dict(vault.read(path, FIELD).metadata) == {}


def test_tags_hold_no_secret(vault: SecretsManagerVault, sm: SecretsManagerHarness,
                             path: str) -> None:
    rid = new_rotation_id()
    vault.stage(path, FIELD, Secret("new-secret-0123456789"), rid, {ID: "AKIANEW"})
    staged_tags = sm._sm.describe_secret(SecretId=path)["Tags"]
    vault.promote(path, FIELD, rid, meta("AKIANEW", rid))
    tags = staged_tags + sm._sm.describe_secret(SecretId=path)["Tags"]
    assert tags and not any("new-secret" in t["Key"] + t["Value"] for t in tags)


def test_tag_escaping_round_trips() -> None:
    for text in ("PLAIN_FIELD", "with space", "a=b", "ünïcødé", "quote\"s", ""):
        assert _unescape(_escape(text)) == text


# -- errors --------------------------------------------------------------------------------------


def test_a_secret_that_is_not_a_json_object_is_refused_clearly(
        vault: SecretsManagerVault, sm: SecretsManagerHarness) -> None:
    plain = f"plain/{uuid.uuid4().hex[:12]}"
    sm._sm.create_secret(Name=plain, SecretString="bare-key-0123456789abcdef")
    for call in (lambda: vault.read(plain, FIELD),
                 lambda: vault.stage(plain, FIELD, Secret("new-0123456789"), new_rotation_id())):
        with pytest.raises(PermanentError, match="is not a JSON object; rotator keeps fields in "
                                                 "a JSON object") as caught:
            call()
        assert_no_secret_in_exception(caught.value, ["bare-key-0123456789abcdef"], "non-JSON")
    binary = f"binary/{uuid.uuid4().hex[:12]}"
    sm._sm.create_secret(Name=binary, SecretBinary=b"\x00\x01")
    with pytest.raises(PermanentError, match="holds binary data"):
        vault.read(binary, FIELD)
    listed = f"list/{uuid.uuid4().hex[:12]}"
    sm._sm.create_secret(Name=listed, SecretString='["a"]')
    with pytest.raises(PermanentError, match="not a JSON object"):
        vault.read(listed, FIELD)


def test_misuse_is_permanent(vault: SecretsManagerVault, path: str) -> None:
    with pytest.raises(PermanentError, match="no key staged"):
        vault.promote(path, FIELD, new_rotation_id(), meta("k", "r"))
    with pytest.raises(NotFound, match="no version"):
        vault.read_version(path, FIELD, str(uuid.uuid4()))
    with pytest.raises(PermanentError, match="refused the parameters"):
        vault.read_version(path, FIELD, "short")
    with pytest.raises(PermanentError, match="rotation id"):
        vault.stage(path, FIELD, Secret("x" * 20), "")


def test_a_secret_scheduled_for_deletion_says_so(
        vault: SecretsManagerVault, sm: SecretsManagerHarness, path: str) -> None:
    sm._sm.delete_secret(SecretId=path)
    with pytest.raises(PermanentError, match="scheduled for deletion"):
        vault.read(path, FIELD)


def test_health_and_refused_credentials(
        vault: SecretsManagerVault, moto_server: MotoServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    vault.health()
    vault.warm_up()
    monkeypatch.setenv("BAD_KEY", "AKIA" + "Q" * 16)
    monkeypatch.setenv("BAD_SECRET", "not-the-secret-0123456789")
    bad = SecretsManagerVault("sm-bad", SecretsManagerSettings(
        region=REGION, endpoint_url=moto_server.url, access_key_id={"env": "BAD_KEY"},
        secret_access_key={"env": "BAD_SECRET"}))
    with pytest.raises(PermanentError, match=r"refused the vault's credentials.*vaults\.sm-bad"
                       ) as caught:
        bad.health()
    assert not isinstance(caught.value, TransientError)
    assert_no_secret_in_exception(caught.value, ["not-the-secret-0123456789"], "bad creds")
    monkeypatch.delenv("BAD_SECRET")
    unset = SecretsManagerVault("sm-unset", bad.cfg)
    with pytest.raises(PermanentError, match=r"BAD_SECRET .* not set"):
        unset.read("anything", FIELD)


def test_an_unreachable_endpoint_is_transient(monkeypatch: pytest.MonkeyPatch,
                                              moto_server: MotoServer) -> None:
    for name, value in admin_env(moto_server).items():
        monkeypatch.setenv(name, value)
    down = SecretsManagerVault("sm-down", SecretsManagerSettings(
        region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=2,
        **admin_refs()))
    with pytest.raises(TransientError, match="could not reach AWS"):
        down.read("anything", FIELD)
    with pytest.raises(TransientError):
        down.health()


def test_settings_say_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="not an AWS region name"):
        SecretsManagerSettings(region="Virginia")
    with pytest.raises(ValidationError, match="cannot read its own credentials from a vault"):
        SecretsManagerSettings(region=REGION, access_key_id={"vault": "v", "path": "p",
                                                             "field": "f"},
                               secret_access_key={"env": "S"})
    with pytest.raises(ValidationError, match="both access_key_id and secret_access_key"):
        SecretsManagerSettings(region=REGION, secret_access_key={"env": "S"})
    assert SecretsManagerSettings(region="ap-southeast-1").endpoint_url is None


def test_errors_never_quote_a_value(vault: SecretsManagerVault, path: str) -> None:
    values: list[Any] = ["old-secret-0123456789"]
    with pytest.raises(RotatorError) as caught:
        vault.restore(path, "NO_SUCH_FIELD", str(uuid.uuid4()), "r/rollback", meta("k", "r"))
    assert_no_secret_in_exception(caught.value, values, "restore of a missing version")


def test_health_accepts_a_denied_listing_but_reads_need_their_permission(
        moto_server: MotoServer, aws_iam_harness: AwsIamHarness, path: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An identity allowed only on its own secrets may not list secrets: health still passes
    (AWS did authenticate it), while a read it may not do says what to grant."""
    iam = moto_server.client("iam")
    user = aws_iam_harness.new_user("reader")
    iam.put_user_policy(UserName=user, PolicyName="describe-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*",
                                                "Action": ["secretsmanager:DescribeSecret"]}]}))
    key_id, secret = aws_iam_harness.issue_key(user)
    monkeypatch.setenv("LIMITED_KEY", key_id)
    monkeypatch.setenv("LIMITED_SECRET", secret)
    limited = SecretsManagerVault("sm-limited", SecretsManagerSettings(
        region=REGION, endpoint_url=moto_server.url, access_key_id={"env": "LIMITED_KEY"},
        secret_access_key={"env": "LIMITED_SECRET"}))
    limited.health()
    with pytest.raises(PermanentError, match="may not do this: reading the AWSCURRENT version"):
        limited.read(path, FIELD)
    iam.close()
