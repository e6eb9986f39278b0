"""The OpenAI provider over the fake Admin API, and OpenBao as a vault, as protocol harnesses."""

from __future__ import annotations

import uuid
from typing import Any

from rotator.testing.fake_openai import FakeOpenAIServer
from rotator.testing.openbao import OpenBaoDevServer
from tests.harnesses.base import ProviderHarness, SeededCredential, VaultHarness


class OpenAIHarness(ProviderHarness):
    id = "openai"

    def __init__(self, fake: FakeOpenAIServer) -> None:
        self.fake = fake
        self.project = fake.add_project()

    def provider_table(self) -> dict[str, Any]:
        return {"type": "openai", "project_id": self.project, "base_url": self.fake.base_url,
                "admin_key": {"env": "TEST_OPENAI_ADMIN_KEY"}}

    def env(self) -> dict[str, str]:
        return {"TEST_OPENAI_ADMIN_KEY": self.fake.admin_key}

    def seed(self, index: int) -> SeededCredential:
        account = self.fake.add_service_account(self.project, name=f"agent-{index}")
        key_id, value = self.fake.seed_key(self.project, account, name="legacy")
        return SeededCredential(params={"service_account_id": account},
                                field="OPENAI_API_KEY", value=value, key_id=key_id,
                                extra={"account": account})

    def bad_params(self) -> tuple[dict[str, Any], str] | None:
        return {"service_acount_id": "svc_x"}, "service_acount_id"

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        return self.fake.is_valid(value)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        return {k["id"] for k in self.fake.live_keys(self.project)
                if k["service_account_id"] == cred.extra["account"]}


class OpenBaoHarness(VaultHarness):
    id = "openbao"

    def __init__(self, server: OpenBaoDevServer) -> None:
        self.server = server
        self.client = server.client()
        self.prefix = f"h{uuid.uuid4().hex[:10]}"

    def vault_table(self) -> dict[str, Any]:
        return {"type": "vault", "url": self.server.url, "token_env": "VAULT_TOKEN"}

    def env(self) -> dict[str, str]:
        return {"VAULT_TOKEN": self.server.root_token}

    def write(self, path: str, fields: dict[str, str]) -> None:
        self.client.secrets.kv.v2.create_or_update_secret(path=path, secret=fields,
                                                          mount_point="secret")

    def read(self, path: str) -> dict[str, str]:
        answer = self.client.secrets.kv.v2.read_secret_version(
            path=path, mount_point="secret", raise_on_deleted_version=True)
        return dict(answer["data"]["data"])
