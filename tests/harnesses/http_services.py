"""Provider harnesses for the ``http`` provider (SendGrid, Cloudflare) and ``anthropic``.

The ``http`` harnesses take their ``[providers.NAME]`` table from the complete examples in
``docs/http-provider.md`` (only ``base_url`` and the admin secret's reference are changed to
point at the fakes), so the protocol tests run the documented configuration itself.

Each credential gets its own slice of the service, so tests sharing a harness do not see each
other's keys: a SendGrid subuser (``on-behalf-of``), a Cloudflare zone in the token's policy, an
Anthropic workspace.
"""

from __future__ import annotations

import copy
import re
import secrets
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from providers.anthropic_admin import AnthropicProvider
from providers.http.provider import HttpProvider
from rotator.interfaces import Provider, Secret
from rotator.testing.fake_anthropic import FakeAnthropicAdmin
from rotator.testing.fake_http_services import FakeCloudflare, FakeSendGrid
from tests.harnesses.base import ProviderHarness, SeededCredential

__all__ = ["DOC", "AnthropicHarness", "CloudflareHarness", "SendGridHarness", "doc_examples",
           "toml_blocks"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-provider.md"
_BLOCK = re.compile(r"^```toml\n(.*?)^```", re.S | re.M)
_EXAMPLE = re.compile(r"#\s*example:\s*([\w-]+)")


def toml_blocks(text: str | None = None) -> list[str]:
    """Every ```toml block of ``docs/http-provider.md`` (or of ``text``)."""
    return _BLOCK.findall(DOC.read_text() if text is None else text)


@cache
def doc_examples() -> dict[str, str]:
    """The complete policy files of the doc, by the name on their ``# example: NAME`` line."""
    out = {}
    for block in toml_blocks():
        first = block.splitlines()[0] if block else ""
        match = _EXAMPLE.fullmatch(first.strip())
        if match:
            out[match.group(1)] = block
    return out


def _doc_provider_table(example: str, provider: str) -> dict[str, Any]:
    return copy.deepcopy(tomllib.loads(doc_examples()[example])["providers"][provider])


class _Harness(ProviderHarness):
    """Builds the provider under test in process too (for tests that do not need a daemon)."""

    admin_env: ClassVar[str] = ""
    manual_only: ClassVar[bool] = False
    """True when the provider cannot create keys: its credentials need manual_only = true and
    only ``rotate-now --revoke-first`` applies."""
    provider_class: ClassVar[type[Provider]]

    def _admin_value(self) -> str:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {self.admin_env: self._admin_value()}

    def make_provider(self, name: str | None = None) -> Provider:
        """The provider of :meth:`provider_table`, resolving ``{ env = ... }`` from ``env``."""
        table = {k: v for k, v in self.provider_table().items() if k != "type"}
        settings = self.provider_class.settings_model.model_validate(table)
        env = self.env()
        return self.provider_class(name or self.id, settings,
                                   lambda ref: Secret(env[ref.env]))


class SendGridHarness(_Harness):
    """SendGrid API keys through ``type = "http"``: one subuser per credential."""

    id = "http-sendgrid"
    admin_env = "SENDGRID_ADMIN_KEY"
    provider_class = HttpProvider

    def __init__(self, fake: FakeSendGrid) -> None:
        self.fake = fake

    def _admin_value(self) -> str:
        return self.fake.admin_key

    def provider_table(self) -> dict[str, Any]:
        table = _doc_provider_table("sendgrid", "sendgrid")
        table["base_url"] = self.fake.url
        table["secrets"] = {"admin": {"env": self.admin_env}}
        return table

    def seed(self, index: int) -> SeededCredential:
        subuser = self.fake.add_subuser(f"agent-{index}-{secrets.token_hex(4)}")
        key_id, value = self.fake.seed_key(subuser, name="legacy")
        return SeededCredential(params={"vars": {"subuser": subuser}}, field="SENDGRID_API_KEY",
                                value=value, key_id=key_id, extra={"subuser": subuser})

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        return self.fake.is_valid(value)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        return {k["id"] for k in self.fake.live_keys(cred.extra["subuser"])}


class CloudflareHarness(_Harness):
    """Cloudflare user API tokens through ``type = "http"``: one zone per credential."""

    id = "http-cloudflare"
    admin_env = "CLOUDFLARE_TOKENS_ADMIN"
    provider_class = HttpProvider

    def __init__(self, fake: FakeCloudflare) -> None:
        self.fake = fake

    def _admin_value(self) -> str:
        return self.fake.admin_token

    def provider_table(self) -> dict[str, Any]:
        table = _doc_provider_table("cloudflare", "cloudflare")
        table["base_url"] = self.fake.api_url
        table["secrets"] = {"admin": {"env": self.admin_env}}
        return table

    def seed(self, index: int) -> SeededCredential:
        zone = secrets.token_hex(16)
        key_id, value = self.fake.seed_token(name=f"legacy-{index}", zone_id=zone)
        return SeededCredential(params={"vars": {"zone_id": zone}}, field="CLOUDFLARE_API_TOKEN",
                                value=value, key_id=key_id, extra={"zone_id": zone})

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        return self.fake.is_valid(value)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        return {t["id"] for t in self.fake.live_tokens(f".zone.{cred.extra['zone_id']}")}


class AnthropicHarness(_Harness):
    """Anthropic keys (emergency revocation only): one workspace per credential. Its
    credentials must be ``manual_only``; only ``rotate-now --revoke-first`` applies."""

    id = "anthropic"
    admin_env = "ANTHROPIC_ADMIN_KEY"
    manual_only = True
    provider_class = AnthropicProvider

    def __init__(self, fake: FakeAnthropicAdmin) -> None:
        self.fake = fake

    def _admin_value(self) -> str:
        return self.fake.admin_key

    def provider_table(self) -> dict[str, Any]:
        return {"type": "anthropic", "admin_key": {"env": self.admin_env},
                "base_url": self.fake.url}

    def seed(self, index: int) -> SeededCredential:
        workspace = self.fake.add_workspace(f"agent-{index}")
        key_id, value = self.fake.seed_key(name=f"agent-{index}", workspace_id=workspace)
        return SeededCredential(params={"workspace_id": workspace}, field="ANTHROPIC_API_KEY",
                                value=value, key_id=key_id, extra={"workspace_id": workspace})

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        return self.fake.is_valid(value)

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        return self.fake.live_key_ids(cred.extra["workspace_id"])
