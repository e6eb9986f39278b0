"""Harnesses for the ``aws-iam`` provider and the ``aws-secretsmanager`` vault, on moto.

Both talk to the session's moto server (``tests/fixtures/aws.py``) with its admin key, which a
policy file reaches through ``{ env = "..." }`` references whose values ``env()`` returns.

moto authenticates every request here (``MotoServer.enable_auth``), so STS refuses a wrong
secret or a deleted key, but it still accepts an *inactive* key: ``key_accepted`` therefore asks
IAM that the key is Active as well as STS that the pair signs in as the user. With both, a
revoked key (deactivated, then deleted) is refused, so ``revoked_is_rejected`` holds.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import botocore.exceptions

from rotator.testing.moto_server import REGION, KeyPair, MotoServer
from tests.harnesses.base import ProviderHarness, SeededCredential, VaultHarness
from tests.support import remember_issued

__all__ = ["ADMIN_KEY_ENV", "ADMIN_SECRET_ENV", "AwsIamHarness", "SecretsManagerHarness",
           "admin_env"]

ADMIN_KEY_ENV = "MOTO_ADMIN_ACCESS_KEY_ID"
ADMIN_SECRET_ENV = "MOTO_ADMIN_SECRET_ACCESS_KEY"
KEY_FIELD = "AWS_SECRET_ACCESS_KEY"
ID_FIELD = "AWS_ACCESS_KEY_ID"
_WRITE_LABEL = "harness-write"


def admin_env(moto: MotoServer) -> dict[str, str]:
    """The environment a daemon needs to reach moto as its admin (and never the real AWS)."""
    assert moto.admin is not None, "moto_server fixture enables auth"
    return {ADMIN_KEY_ENV: moto.admin.access_key_id,
            ADMIN_SECRET_ENV: moto.admin.secret_access_key,
            "AWS_EC2_METADATA_DISABLED": "true"}


def admin_refs() -> dict[str, Any]:
    return {"access_key_id": {"env": ADMIN_KEY_ENV},
            "secret_access_key": {"env": ADMIN_SECRET_ENV}}


class AwsIamHarness(ProviderHarness):
    """IAM users with one legacy access key each, judged by IAM and STS directly."""

    id = "aws-iam"
    revoked_is_rejected = True

    def __init__(self, moto: MotoServer) -> None:
        self.moto = moto
        self._iam = moto.client("iam")
        self._lock = threading.Lock()
        self._issued: dict[str, str] = {}
        """access key id -> secret of the keys this harness issued (seeds)."""
        self._sts: dict[tuple[str, str], Any] = {}
        """An STS client per key pair judged (probes ask about the same key many times)."""

    def provider_table(self) -> dict[str, Any]:
        return {"type": "aws-iam", "region": REGION, "endpoint_url": self.moto.url,
                **admin_refs()}

    def env(self) -> dict[str, str]:
        return admin_env(self.moto)

    def new_user(self, label: str = "agent") -> str:
        """A fresh IAM user, unique across parallel tests."""
        name = f"{label}-{uuid.uuid4().hex[:12]}"
        self._iam.create_user(UserName=name)
        return name

    def issue_key(self, user_name: str) -> tuple[str, str]:
        """A key made behind rotator's back: ``(access key id, secret)``."""
        key = self._iam.create_access_key(UserName=user_name)["AccessKey"]
        key_id, secret = str(key["AccessKeyId"]), str(key["SecretAccessKey"])
        remember_issued([secret])
        with self._lock:
            self._issued[key_id] = secret
        return key_id, secret

    def seed(self, index: int) -> SeededCredential:
        user = self.new_user(f"agent-{index}")
        key_id, secret = self.issue_key(user)
        return SeededCredential(params={"user_name": user}, field=KEY_FIELD, value=secret,
                                key_id=key_id, companions={ID_FIELD: key_id},
                                extra={"user_name": user})

    def bad_params(self) -> tuple[dict[str, Any], str] | None:
        return {"user_name": "research agent!"}, "must be an IAM user name"

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        key_id = companions.get(ID_FIELD) or self.key_id_of(value)
        return key_id is not None and self.pair_accepted(cred.extra["user_name"], key_id, value)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        return self.active_keys(cred.extra["user_name"])

    def close(self) -> None:
        self._iam.close()
        with self._lock:
            clients, self._sts = list(self._sts.values()), {}
        for client in clients:
            client.close()

    # -- helpers for tests --------------------------------------------------------------------

    def active_keys(self, user_name: str) -> set[str]:
        keys = self._iam.list_access_keys(UserName=user_name)["AccessKeyMetadata"]
        return {k["AccessKeyId"] for k in keys if k["Status"] == "Active"}

    def key_id_of(self, secret: str) -> str | None:
        """The id of the key with this secret: seeds first, then moto's own records (keys a
        daemon created in another process)."""
        with self._lock:
            found = next((k for k, s in self._issued.items() if s == secret), None)
        if found is None:
            keys = self.moto.model_data().get("iam", {}).get("AccessKey", [])
            found = next((k["access_key_id"] for k in keys
                          if k.get("secret_access_key") == secret), None)
        return found

    def pair_accepted(self, user_name: str, key_id: str, secret: str) -> bool:
        """The key is Active in IAM, and STS accepts the pair as that user's."""
        if key_id not in self.active_keys(user_name):
            return False
        with self._lock:
            sts = self._sts.get((key_id, secret))
        if sts is None:
            sts = self.moto.client("sts", KeyPair(key_id, secret))
            with self._lock:
                self._sts[(key_id, secret)] = sts
        try:
            arn = sts.get_caller_identity()["Arn"]
        except botocore.exceptions.ClientError:
            return False
        return str(arn).endswith(f":user/{user_name}")


class SecretsManagerHarness(VaultHarness):
    """Secrets Manager on moto: JSON secrets, read the way agents read them (AWSCURRENT)."""

    id = "aws-secretsmanager"

    def __init__(self, moto: MotoServer) -> None:
        self.moto = moto
        self._sm = moto.client("secretsmanager")

    def vault_table(self) -> dict[str, Any]:
        return {"type": "aws-secretsmanager", "region": REGION, "endpoint_url": self.moto.url,
                **admin_refs()}

    def env(self) -> dict[str, str]:
        return admin_env(self.moto)

    def write(self, path: str, fields: dict[str, str]) -> None:
        """A new AWSCURRENT version holding ``fields``, as ``put-secret-value`` makes one.

        Done as a labelled put plus a move of AWSCURRENT, because moto mishandles a plain put
        once AWSCURRENT was moved by UpdateSecretVersionStage (it forgets the move and leaves
        AWSCURRENT on two versions, reading back the older one); AWS does not.
        """
        text = json.dumps(fields)
        try:
            self._sm.create_secret(Name=path, SecretString=text)
            return
        except self._sm.exceptions.ResourceExistsException:
            pass
        current = next(v for v, s in self.stages(path).items() if "AWSCURRENT" in s)
        new = self._sm.put_secret_value(SecretId=path, SecretString=text,
                                        VersionStages=[_WRITE_LABEL])["VersionId"]
        self._sm.update_secret_version_stage(SecretId=path, VersionStage="AWSCURRENT",
                                             MoveToVersionId=new, RemoveFromVersionId=current)
        self._sm.update_secret_version_stage(SecretId=path, VersionStage=_WRITE_LABEL,
                                             RemoveFromVersionId=new)

    def read(self, path: str) -> dict[str, str]:
        # Always with the label: moto's unlabelled read can return a stale version.
        answer = self._sm.get_secret_value(SecretId=path, VersionStage="AWSCURRENT")
        return {k: str(v) for k, v in json.loads(answer["SecretString"]).items()}

    def stages(self, path: str) -> dict[str, list[str]]:
        """VersionIdsToStages of the secret (which version carries which label)."""
        return dict(self._sm.describe_secret(SecretId=path).get("VersionIdsToStages") or {})

    def version_ids(self, path: str) -> list[str]:
        """Every version id of the secret, labelled or not."""
        answer = self._sm.list_secret_version_ids(SecretId=path, IncludeDeprecated=True)
        return [v["VersionId"] for v in answer["Versions"]]

    def close(self) -> None:
        self._sm.close()
