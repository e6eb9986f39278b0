"""``rotator scan --policy-out FILE``: a draft policy file from a scan's inventory.

One ``[[credentials]]`` per agent and key found in the tree (a key several agents share becomes
one credential per agent: each gets its own key at the first rotation), under the provider of
its service, with the seeds' intervals: 30 days for payment and customer-data keys, 90 for the
rest. What only the operator knows (the vault's address, a project id, the service account or
IAM user behind each key) is written as ``"FILL IN: ..."``, which ``rotator check`` refuses
until it is replaced; keys of services rotator has no provider for are listed as comments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import tomli_w

from rotator.scan import Found

__all__ = ["FILL_IN", "draft_policy"]

FILL_IN = "FILL IN"
"""Every value the draft cannot know starts with this; ``rotator check`` refuses it."""
PROVIDERS: dict[str, dict[str, Any]] = {
    "openai": {"type": "openai", "project_id": f"{FILL_IN}: the OpenAI project id (proj_...)",
               "admin_key": {"vault": "main", "path": "rotator/admin/openai", "field": "key"}},
    "anthropic": {"type": "anthropic",
                  "admin_key": {"vault": "main", "path": "rotator/admin/anthropic",
                                "field": "key"}},
    "stripe": {"type": "stripe",
               "api_key": {"vault": "main", "path": "rotator/admin/stripe", "field": "key"}},
    "aws": {"type": "aws-iam", "region": f"{FILL_IN}: the region, like us-east-1"},
}
LONG_LIVED = {"stripe": "30d", "database": "30d"}
"""Payment and customer-data keys rotate monthly; everything else every 90 days."""


def _params(service: str, found: Found) -> dict[str, Any]:
    agent = found.agent
    if service == "openai":
        return {"service_account_id": f"{FILL_IN}: the service account of {agent}'s key "
                                      "(svc_acct_...)"}
    if service == "stripe":
        return {"kind": "api_key", "key_name": f"{FILL_IN}: the name of {agent}'s Stripe API "
                                               "key (Developers > API keys)"}
    if service == "aws":
        return {"user_name": f"{FILL_IN}: the IAM user of {agent}'s access key",
                "access_key_id_field": "AWS_ACCESS_KEY_ID"}
    return {}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def draft_policy(found: Iterable[Found], scanned: str) -> str:
    """The draft as TOML text; never a value (the inventory holds none)."""
    providers: dict[str, dict[str, Any]] = {}
    credentials: list[dict[str, Any]] = []
    left_out: list[str] = []
    taken: set[tuple[str, str]] = set()
    for f in found:
        if f.commit is not None:
            continue  # history: revoke it, nothing to put in a vault
        if f.agent is None:
            left_out.append(f"{f.where}: {f.service} {f.kind} held by no agent it could tell")
            continue
        if f.service == "aws" and f.variable and "ACCESS_KEY_ID" in f.variable:
            continue  # the secret key's credential carries the id as a companion field
        if f.service == "database":
            left_out.append(f"{f.where}: {f.variable or 'a URL'} of {f.agent} holds a "
                            "password: the postgres provider rotates a role's password kept "
                            "in a field of its own (give the agent the URL without it and the "
                            "password apart), so draft that credential by hand")
            continue
        if f.service not in PROVIDERS:
            left_out.append(f"{f.where}: {f.variable or f.service} of {f.agent} ({f.service} "
                            f"{f.kind}): no built-in provider; describe its API with "
                            "type = \"http\" (docs/http-provider.md)")
            continue
        field = f.variable or f"{f.service.upper()}_KEY"
        if (f.agent, field) in taken:
            continue  # the same variable of the same agent found twice (.env and a script)
        taken.add((f.agent, field))
        providers[f.service] = PROVIDERS[f.service]
        cred: dict[str, Any] = {
            "name": f"{f.agent}/{_slug(field)}", "agent": f.agent, "provider": f.service,
            "vault": "main", "path": f"agents/{f.agent}/{f.service}", "field": field,
        }
        if f.service == "anthropic":  # no API to create keys: rotate-now --revoke-first only
            cred["manual_only"] = True
        else:
            cred["interval"] = LONG_LIVED.get(f.service, "90d")
        params = _params(f.service, f)
        if params:
            cred["params"] = params
        credentials.append(cred)
    doc = {
        "rotator": {"state_url": "sqlite:////var/lib/rotator/state.db"},
        "vaults": {"main": {"type": "vault",
                            "url": f"{FILL_IN}: your Vault or OpenBao address (https://...)",
                            "token_env": "VAULT_TOKEN"}},
        "providers": providers,
        "credentials": credentials,
    }
    head = [f"# Draft written by `rotator scan --policy-out` on "
            f"{datetime.now(UTC):%Y-%m-%d} from {scanned}.",
            f'# Replace every "{FILL_IN}: ..." (rotator check refuses them), put each admin',
            "# key at the path its provider names, then `rotator check` this file. A key several",
            "# agents shared is one credential per agent: each gets its own at the first",
            "# rotation, and the shared one is revoked once the last agent has moved."]
    tail = ["", "# Found but not drafted:"] + [f"#   {line}" for line in left_out] \
        if left_out else []
    return "\n".join(head) + "\n\n" + tomli_w.dumps(doc) + "\n".join(tail) + "\n"
