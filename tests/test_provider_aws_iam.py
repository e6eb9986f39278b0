"""The ``aws-iam`` provider against moto: tags that survive a crash, the two-keys quota,
revocation, verification, and the messages a misconfiguration gets.

moto checks signatures here (see ``MotoServer.enable_auth``) but not a key's status: an inactive
key still signs in at STS, which is why ``verify`` also asks IAM.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

import providers.aws_iam as aws_iam
from providers.aws_iam import CREATING_TAG, AwsIamParams, AwsIamProvider, AwsIamSettings
from rotator.errors import CredentialRejected, NotFound, PermanentError, TransientError
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.moto_server import REGION, MotoServer
from rotator.testing.provider_contract import assert_no_secret_in_exception, new_rotation_id
from tests.harnesses.aws import AwsIamHarness, admin_refs
from tests.support import free_port


class Crash(BaseException):
    """Stands for the process dying at a crash point (a BaseException, like SIGKILL, is not
    caught by the provider's error handling)."""


@pytest.fixture
def provider(moto_server: MotoServer,
             aws_admin_resolver: Callable[[object], Secret]) -> Iterator[AwsIamProvider]:
    settings = AwsIamSettings(region=REGION, endpoint_url=moto_server.url, timeout=5,
                              **admin_refs())
    provider = AwsIamProvider("aws-test", settings, aws_admin_resolver)
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def iam(moto_server: MotoServer) -> Iterator[Any]:
    client = moto_server.client("iam")
    try:
        yield client
    finally:
        client.close()


def credential(user: str) -> CredentialInfo:
    return CredentialInfo(name=f"{user}/aws", agent=user, params=AwsIamParams(user_name=user))


def tags(iam: Any, user: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in iam.list_user_tags(UserName=user)["Tags"]}


def crash_before_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    def point(name: str) -> None:
        if name == "provider:aws-iam:before-tag":
            raise Crash(name)

    monkeypatch.setattr(aws_iam, "crashpoint", point)


# -- settings and params -------------------------------------------------------------------------


def test_params_need_a_valid_user_name() -> None:
    with pytest.raises(ValidationError) as missing:
        AwsIamParams.model_validate({})
    assert missing.value.errors()[0]["loc"] == ("user_name",)
    with pytest.raises(ValidationError, match="not its ARN"):
        AwsIamParams(user_name="arn:aws:iam::123456789012:user/agent")
    with pytest.raises(ValidationError, match="1 to 64 letters"):
        AwsIamParams(user_name="bad name!")
    with pytest.raises(ValidationError, match="1 to 64 letters"):
        AwsIamParams(user_name="x" * 65)
    params = AwsIamParams(user_name=" research-agent ")
    assert params.user_name == "research-agent"
    assert params.access_key_id_field == "AWS_ACCESS_KEY_ID"


def test_settings_say_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="not an AWS region name"):
        AwsIamSettings(region="useast1")
    with pytest.raises(ValidationError, match="https:// or http://"):
        AwsIamSettings(region=REGION, endpoint_url="localhost:5000")
    with pytest.raises(ValidationError, match="both access_key_id and secret_access_key"):
        AwsIamSettings(region=REGION, access_key_id={"env": "X"})
    with pytest.raises(ValidationError, match="never"):  # a literal secret in the policy file
        AwsIamSettings(region=REGION, access_key_id="AKIA", secret_access_key="s3cr3t")
    chain = AwsIamSettings(region="eu-west-2")  # no keys: boto3's default chain
    assert chain.access_key_id is None and chain.endpoint_url is None


def test_companion_is_the_access_key_id(provider: AwsIamProvider) -> None:
    cred = CredentialInfo("a/aws", "a", AwsIamParams(user_name="a", access_key_id_field="KID"))
    assert provider.companion_fields(cred) == ("KID",)
    assert provider.companions(cred, "AKIAEXAMPLE") == {"KID": "AKIAEXAMPLE"}


# -- create and find_by_rotation -----------------------------------------------------------------


def test_create_tags_the_key_with_its_rotation(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness, iam: Any) -> None:
    user = aws_iam_harness.new_user()
    rid = new_rotation_id()
    new = provider.create(credential(user), rid)
    assert tags(iam, user) == {f"rotator:{new.key_id}": rid}, "creating tag left behind"
    assert aws_iam_harness.pair_accepted(user, new.key_id, new.secret.reveal())
    provider.revoke(credential(user), new.key_id)
    assert tags(iam, user) == {}, "revoke must drop the key's tag"


def test_a_crash_between_create_and_tag_still_finds_the_key(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness, iam: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    user = aws_iam_harness.new_user()
    legacy, _ = aws_iam_harness.issue_key(user)  # created in the same second as the rotation
    cred, rid = credential(user), new_rotation_id()
    crash_before_tag(monkeypatch)
    with pytest.raises(Crash):
        provider.create(cred, rid)
    monkeypatch.undo()
    orphan = aws_iam_harness.active_keys(user) - {legacy}
    assert len(orphan) == 1 and f"rotator:{next(iter(orphan))}" not in tags(iam, user)

    assert provider.find_by_rotation(cred, rid) == list(orphan)
    assert provider.find_by_rotation(cred, new_rotation_id()) == []
    assert legacy not in provider.find_by_rotation(cred, rid), (
        "a key older than the rotation's create must never be taken for its key")
    provider.revoke(cred, next(iter(orphan)))  # what the engine does with what it finds
    assert aws_iam_harness.active_keys(user) == {legacy}
    assert provider.find_by_rotation(cred, rid) == []


def test_a_later_rotation_turns_a_crashed_create_into_tags(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness, iam: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pending record of a crashed create is replaced by the next rotation's, so it is
    first written onto the key it made: that key stays findable by its own rotation id."""
    user = aws_iam_harness.new_user()
    cred, crashed = credential(user), new_rotation_id()
    crash_before_tag(monkeypatch)
    with pytest.raises(Crash):
        provider.create(cred, crashed)
    monkeypatch.undo()
    (orphan,) = aws_iam_harness.active_keys(user)
    later = provider.create(cred, new_rotation_id())
    assert tags(iam, user)[f"rotator:{orphan}"] == crashed
    assert provider.find_by_rotation(cred, crashed) == [orphan]
    assert CREATING_TAG not in tags(iam, user)
    for key_id in (orphan, later.key_id):
        provider.revoke(cred, key_id)


def test_an_untagged_key_made_long_before_the_rotation_is_not_its_key(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness) -> None:
    """Even with the pending record, the key must also be younger than the rotation id (less
    a clock-skew margin)."""
    user = aws_iam_harness.new_user()
    key = aws_iam._Key("AKIAOLDKEY0000000000", True, datetime.now(UTC) - timedelta(hours=2))
    rid = new_rotation_id()
    record = aws_iam._User(user, [key], {CREATING_TAG: rid})
    assert not record.belongs(key, rid)
    young = aws_iam._Key("AKIANEWKEY0000000000", True, datetime.now(UTC))
    assert aws_iam._User(user, [young], {CREATING_TAG: rid}).belongs(young, rid)
    assert not aws_iam._User(user, [young], {CREATING_TAG: f"{rid} {young.id}"}).belongs(
        young, rid), "a key listed before the create is not the create's"


# -- the two-keys quota --------------------------------------------------------------------------


def test_a_leftover_of_the_same_rotation_makes_room(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that timed out after AWS made the key (here: crashed before tagging it) leaves
    the user at two keys; the retry deletes that leftover and creates the key it returns."""
    user = aws_iam_harness.new_user()
    current, _ = aws_iam_harness.issue_key(user)
    cred, rid = credential(user), new_rotation_id()
    crash_before_tag(monkeypatch)
    with pytest.raises(Crash):
        provider.create(cred, rid)
    monkeypatch.undo()
    (leftover,) = aws_iam_harness.active_keys(user) - {current}

    new = provider.create(cred, rid)
    assert aws_iam_harness.active_keys(user) == {current, new.key_id}
    assert leftover != new.key_id
    assert provider.find_by_rotation(cred, rid) == [new.key_id]
    provider.revoke(cred, new.key_id)


def test_an_interrupted_revocation_makes_room(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness, iam: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A revoke that deactivated the old key and died before deleting it leaves an inactive
    key rotator tagged: the next create deletes it, and only it."""
    user = aws_iam_harness.new_user()
    cred = credential(user)
    old, _ = aws_iam_harness.issue_key(user)  # adopted: rotator never tagged it
    current = provider.create(cred, new_rotation_id())

    def die(**kwargs: Any) -> None:
        raise Crash("killed between deactivate and delete")

    real = provider._admin_clients()[0]
    monkeypatch.setattr(real, "delete_access_key", die)
    with pytest.raises(Crash):
        provider.revoke(cred, old)
    monkeypatch.undo()
    assert tags(iam, user)[f"rotator:{old}"] == "revoking"
    assert aws_iam_harness.active_keys(user) == {current.key_id}

    newer = provider.create(cred, new_rotation_id())
    keys = {k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]}
    assert keys == {current.key_id, newer.key_id}
    assert f"rotator:{old}" not in tags(iam, user)
    for key_id in keys:
        provider.revoke(cred, key_id)


def test_two_keys_in_use_are_never_guessed_at(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness) -> None:
    """Two active keys, neither from this rotation: either may be the one agents use, so
    create deletes nothing and says which keys exist and what to do."""
    user = aws_iam_harness.new_user()
    cred = credential(user)
    legacy, _ = aws_iam_harness.issue_key(user)
    current = provider.create(cred, new_rotation_id())
    with pytest.raises(PermanentError) as caught:
        provider.create(cred, new_rotation_id())
    message = str(caught.value)
    assert legacy in message and current.key_id in message
    assert "not made by rotator" in message and "made by rotation r" in message
    assert "aws iam delete-access-key" in message and "grace period" in message
    assert aws_iam_harness.active_keys(user) == {legacy, current.key_id}
    provider.revoke(cred, current.key_id)


# -- revoke --------------------------------------------------------------------------------------


def test_revoke_is_idempotent(provider: AwsIamProvider, aws_iam_harness: AwsIamHarness,
                              iam: Any) -> None:
    user = aws_iam_harness.new_user()
    cred = credential(user)
    kept, _ = aws_iam_harness.issue_key(user)
    doomed = provider.create(cred, new_rotation_id())
    provider.revoke(cred, doomed.key_id)
    provider.revoke(cred, doomed.key_id)
    provider.revoke(cred, "AKIA" + "Z" * 16)
    assert aws_iam_harness.active_keys(user) == {kept}
    assert iam.list_access_keys(UserName=user)["AccessKeyMetadata"][0]["AccessKeyId"] == kept
    assert tags(iam, user) == {}


def test_revoke_of_another_users_key_is_refused(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness) -> None:
    """A wrong user_name must not make revocation a silent success."""
    mine, theirs = aws_iam_harness.new_user(), aws_iam_harness.new_user("other")
    their_key, _ = aws_iam_harness.issue_key(theirs)
    with pytest.raises(PermanentError, match=f"belongs to IAM user {theirs}"):
        provider.revoke(credential(mine), their_key)
    assert aws_iam_harness.active_keys(theirs) == {their_key}


# -- verify and identify -------------------------------------------------------------------------


def test_verify_refuses_an_inactive_key_that_moto_accepts(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness, iam: Any,
        moto_server: MotoServer) -> None:
    user = aws_iam_harness.new_user()
    cred = credential(user)
    new = provider.create(cred, new_rotation_id())
    provider.verify(cred, new.secret, key_id=new.key_id)
    iam.update_access_key(UserName=user, AccessKeyId=new.key_id, Status="Inactive")
    sts = moto_server.client("sts", _pair(new))
    assert sts.get_caller_identity()["Arn"].endswith(f"user/{user}"), (
        "moto now refuses inactive keys: revisit the harness and this provider's notes")
    sts.close()
    with pytest.raises(CredentialRejected, match="inactive") as caught:
        provider.verify(cred, new.secret, key_id=new.key_id)
    assert_no_secret_in_exception(caught.value, [new.secret], "verify of an inactive key")
    provider.revoke(cred, new.key_id)


def _pair(new: Any) -> Any:
    from rotator.testing.moto_server import KeyPair

    return KeyPair(new.key_id, new.secret.reveal())


def test_verify_refuses_a_wrong_secret_and_another_users_key(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness) -> None:
    user, other = aws_iam_harness.new_user(), aws_iam_harness.new_user("other")
    cred = credential(user)
    new = provider.create(cred, new_rotation_id())
    wrong = Secret(new.secret.reveal()[:-4] + "AAAA")
    with pytest.raises(CredentialRejected, match="refused the key") as caught:
        provider.verify(cred, wrong, key_id=new.key_id)
    assert_no_secret_in_exception(caught.value, [wrong, new.secret], "verify of a wrong secret")
    their_key, their_secret = aws_iam_harness.issue_key(other)
    with pytest.raises(CredentialRejected, match="does not exist"):
        provider.verify(cred, Secret(their_secret), key_id=their_key)
    with pytest.raises(PermanentError, match="without its access key id"):
        provider.verify(cred, new.secret)
    provider.revoke(cred, new.key_id)


def test_identify_uses_the_companion_access_key_id(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness) -> None:
    user = aws_iam_harness.new_user()
    cred = credential(user)
    legacy, secret = aws_iam_harness.issue_key(user)
    assert provider.identify(cred, Secret(secret), {"AWS_ACCESS_KEY_ID": legacy}) == legacy
    assert provider.identify(cred, Secret(secret), {}) is None, "no id beside it: no guess"
    assert provider.identify(cred, Secret(secret)) is None
    other = aws_iam_harness.new_user("other")
    their_key, their_secret = aws_iam_harness.issue_key(other)
    assert provider.identify(cred, Secret(their_secret), {"AWS_ACCESS_KEY_ID": their_key}) \
        is None, "another user's key is not this credential's"
    assert provider.identify(cred, Secret("x" * 40), {"AWS_ACCESS_KEY_ID": legacy}) is None


# -- errors --------------------------------------------------------------------------------------


def test_unknown_user_is_a_clear_permanent_error(provider: AwsIamProvider) -> None:
    cred = credential("no-such-user-anywhere")
    with pytest.raises(NotFound, match=r"IAM user no-such-user-anywhere does not exist: check "
                                       r"params\.user_name"):
        provider.create(cred, new_rotation_id())
    with pytest.raises(NotFound, match=r"check params\.user_name"):
        provider.revoke(cred, "AKIA" + "Z" * 16)


def test_refused_admin_credentials_are_permanent_and_name_the_settings(
        moto_server: MotoServer, aws_iam_harness: AwsIamHarness) -> None:
    settings = AwsIamSettings(region=REGION, endpoint_url=moto_server.url, **admin_refs())
    wrong = Secret("wrong-secret-access-key-0123456789abcdef")
    provider = AwsIamProvider("aws-bad", settings, lambda ref: wrong)
    user = aws_iam_harness.new_user()
    with pytest.raises(PermanentError, match=r"refused the admin credentials.*providers\.aws-bad"
                       ) as caught:
        provider.create(credential(user), new_rotation_id())
    assert not isinstance(caught.value, TransientError)
    assert_no_secret_in_exception(caught.value, [wrong], "refused admin credentials")
    with pytest.raises(PermanentError, match="refused the admin credentials"):
        provider.check_access()
    provider.close()


def test_an_unreachable_endpoint_is_transient(
        aws_admin_resolver: Callable[[object], Secret]) -> None:
    settings = AwsIamSettings(region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}",
                              timeout=2, **admin_refs())
    provider = AwsIamProvider("aws-down", settings, aws_admin_resolver)
    with pytest.raises(TransientError, match="could not reach AWS"):
        provider.find_by_rotation(credential("anyone"), new_rotation_id())
    provider.close()


def test_check_access_and_warm_up(provider: AwsIamProvider) -> None:
    provider.warm_up()
    provider.check_access()


def test_a_missing_permission_names_the_action_to_grant(
        moto_server: MotoServer, aws_iam_harness: AwsIamHarness, iam: Any) -> None:
    """moto evaluates IAM policies: an admin identity that may only list keys is told which
    permission creating one needs."""
    admin = aws_iam_harness.new_user("limited-admin")
    iam.put_user_policy(UserName=admin, PolicyName="list-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
            "iam:ListAccessKeys", "iam:ListUserTags", "iam:TagUser", "iam:UntagUser"]}]}))
    key_id, secret = aws_iam_harness.issue_key(admin)
    values = {"K": key_id, "S": secret}
    settings = AwsIamSettings(region=REGION, endpoint_url=moto_server.url,
                              access_key_id={"env": "K"}, secret_access_key={"env": "S"})
    provider = AwsIamProvider("aws-limited", settings,
                              lambda ref: Secret(values[ref.env]))  # type: ignore[attr-defined]
    user = aws_iam_harness.new_user()
    with pytest.raises(PermanentError, match=f"grant it iam:CreateAccessKey on user {user}"):
        provider.create(credential(user), new_rotation_id())
    assert provider.find_by_rotation(credential(user), new_rotation_id()) == []
    provider.close()


def test_a_quota_error_after_making_room_is_retried(
        provider: AwsIamProvider, aws_iam_harness: AwsIamHarness,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """IAM is eventually consistent: right after a delete it may still count two keys. The
    create is then transient, and the retry lists the keys again."""
    user = aws_iam_harness.new_user()
    for _ in range(2):
        aws_iam_harness.issue_key(user)
    monkeypatch.setattr(provider, "_make_room", lambda *args: None)  # as if it deleted one
    with pytest.raises(TransientError, match="IAM still counts 2 access keys"):
        provider.create(credential(user), new_rotation_id())
    monkeypatch.undo()
    with pytest.raises(PermanentError, match="already has 2 access keys"):
        provider.create(credential(user), new_rotation_id())
