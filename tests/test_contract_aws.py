"""The ``aws-iam`` provider and the ``aws-secretsmanager`` vault run the contract suites on moto.

moto serves IAM, STS and Secrets Manager over real HTTP through the real ``boto3``, and checks
every request's signature, so the harness (IAM says Active, STS accepts the pair) is an
independent judge of whether a key works. The harnesses themselves are checked here too, since
the protocol tests rely on them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from providers.aws_iam import AwsIamParams, AwsIamProvider, AwsIamSettings
from rotator.interfaces import CredentialInfo, Secret
from rotator.testing.moto_server import REGION, MotoServer
from rotator.testing.provider_contract import KeyAccepted, LiveKeyIds, ProviderContract
from rotator.testing.vault_contract import VaultContract
from rotator.vaults.aws_secretsmanager import SecretsManagerSettings, SecretsManagerVault
from tests.harnesses.aws import (
    ADMIN_KEY_ENV,
    ADMIN_SECRET_ENV,
    AwsIamHarness,
    SecretsManagerHarness,
    admin_env,
    admin_refs,
)

# -- provider ------------------------------------------------------------------------------------


@pytest.fixture
def iam_user(aws_iam_harness: AwsIamHarness) -> str:
    # Another user's key beside it: the suite must never see or touch it.
    other = aws_iam_harness.new_user("someone-else")
    aws_iam_harness.issue_key(other)
    return aws_iam_harness.new_user("contract")


@pytest.fixture
def provider(moto_server: MotoServer,
             aws_admin_resolver: Callable[[object], Secret]) -> Iterator[AwsIamProvider]:
    settings = AwsIamSettings(region=REGION, endpoint_url=moto_server.url, timeout=5,
                              **admin_refs())
    provider = AwsIamProvider("aws-contract", settings, aws_admin_resolver)
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def credential(iam_user: str) -> CredentialInfo:
    return CredentialInfo(name="contract-agent/aws", agent="contract-agent",
                          params=AwsIamParams(user_name=iam_user))


@pytest.fixture
def key_accepted(aws_iam_harness: AwsIamHarness, iam_user: str) -> KeyAccepted:
    def accepted(secret: str) -> bool:
        key_id = aws_iam_harness.key_id_of(secret)
        return key_id is not None and aws_iam_harness.pair_accepted(iam_user, key_id, secret)

    return accepted


@pytest.fixture
def live_key_ids(aws_iam_harness: AwsIamHarness, iam_user: str) -> LiveKeyIds:
    return lambda: aws_iam_harness.active_keys(iam_user)


class TestAwsIamProviderContract(ProviderContract):
    """Every guarantee of :class:`ProviderContract`, for ``type = "aws-iam"``."""


# -- vault ---------------------------------------------------------------------------------------


@pytest.fixture
def vault(moto_server: MotoServer,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretsManagerVault]:
    for name, value in admin_env(moto_server).items():
        monkeypatch.setenv(name, value)
    settings = SecretsManagerSettings(region=REGION, endpoint_url=moto_server.url, timeout=5,
                                      **admin_refs())
    vault = SecretsManagerVault("contract", settings)
    try:
        yield vault
    finally:
        vault.close()


@pytest.fixture
def new_path() -> str:
    return f"contract/{uuid.uuid4().hex[:12]}/agent"


class TestSecretsManagerVaultContract(VaultContract):
    """Every guarantee of :class:`VaultContract`, for ``type = "aws-secretsmanager"``."""


# -- the harnesses the protocol tests use --------------------------------------------------------


def test_iam_harness_seeds_a_working_legacy_key_and_judges_keys(
        aws_iam_harness: AwsIamHarness) -> None:
    first, second = aws_iam_harness.seed(0), aws_iam_harness.seed(0)
    assert first.extra["user_name"] != second.extra["user_name"], "seed must make a new user"
    assert first.value and first.key_id and first.companions == {"AWS_ACCESS_KEY_ID":
                                                                   first.key_id}
    assert aws_iam_harness.key_accepted(first, first.value, first.companions)
    assert aws_iam_harness.key_accepted(first, first.value, {}), "key id found from the secret"
    assert not aws_iam_harness.key_accepted(first, second.value or "", second.companions), (
        "another user's key must not count as this credential's")
    assert not aws_iam_harness.key_accepted(first, "x" * 40, first.companions)
    assert aws_iam_harness.live_key_ids(first) == {first.key_id}
    table = aws_iam_harness.provider_table()
    assert table["type"] == "aws-iam" and table["access_key_id"] == {"env": ADMIN_KEY_ENV}
    assert set(aws_iam_harness.env()) >= {ADMIN_KEY_ENV, ADMIN_SECRET_ENV}


def test_iam_harness_refuses_an_inactive_key_that_moto_still_accepts(
        aws_iam_harness: AwsIamHarness, moto_server: MotoServer) -> None:
    cred = aws_iam_harness.seed(1)
    user = cred.extra["user_name"]
    iam = moto_server.client("iam")
    iam.update_access_key(UserName=user, AccessKeyId=cred.key_id, Status="Inactive")
    assert not aws_iam_harness.key_accepted(cred, cred.value or "", cred.companions)
    assert aws_iam_harness.live_key_ids(cred) == set()
    iam.close()


def test_secretsmanager_harness_writes_and_reads_like_an_operator_and_an_agent(
        secretsmanager_harness: SecretsManagerHarness) -> None:
    path = f"harness/{uuid.uuid4().hex[:12]}"
    secretsmanager_harness.write(path, {"A": "1", "B": "two"})
    assert secretsmanager_harness.read(path) == {"A": "1", "B": "two"}
    secretsmanager_harness.write(path, {"A": "3"})
    assert secretsmanager_harness.read(path) == {"A": "3"}
    assert len(secretsmanager_harness.version_ids(path)) == 2
    table = secretsmanager_harness.vault_table()
    assert table["type"] == "aws-secretsmanager" and table["region"] == REGION
