"""The limit for bench/rotate_now.py: the same external calls, no bookkeeping.

For each credential, with the same concurrency as rotator, it makes the calls a rotation makes
(read the current secret and its metadata, create a key, stage it, read it back, verify it,
promote it with check-and-set and record metadata, drop the staged copy, revoke the old key,
read the old version and confirm the old key is refused) through the same SDKs, and records
nothing anywhere else.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import hvac
import openai

FIELD = "OPENAI_API_KEY"


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.loads(fh.read())
    local = threading.local()

    def vault() -> hvac.Client:
        if not hasattr(local, "client"):
            local.client = hvac.Client(url=spec["vault_url"], token=os.environ["VAULT_TOKEN"])
        return local.client

    kv = lambda: vault().secrets.kv.v2  # noqa: E731
    admin_key = kv().read_secret_version(path=spec["admin_path"],
                                         raise_on_deleted_version=True)["data"]["data"]["key"]
    admin = openai.OpenAI(api_key="", admin_api_key=admin_key, base_url=spec["base_url"],
                          max_retries=0)
    shared = openai.DefaultHttpxClient()  # one transport for every verify, as rotator does

    def verify(key: str) -> None:
        openai.OpenAI(api_key=key, base_url=spec["base_url"], max_retries=0,
                      http_client=shared).models.list()

    def rotate(cred: dict[str, Any]) -> None:
        path = cred["path"]
        current = kv().read_secret_version(path=path, raise_on_deleted_version=True)["data"]
        meta = kv().read_secret_metadata(path=path)["data"]["custom_metadata"]
        old_id, old_version = meta[f"{FIELD}.key_id"], current["metadata"]["version"]
        key = admin.admin.organization.projects.service_accounts.api_keys.create(
            cred["service_account_id"], project_id=spec["project_id"], name="bare")
        staged = f"rotator/pending/{path}/bare"
        kv().create_or_update_secret(path=staged, secret={"value": key.value, "field": FIELD})
        value = kv().read_secret_version(path=staged,
                                         raise_on_deleted_version=True)["data"]["data"]["value"]
        verify(value)
        live = kv().read_secret_version(path=path, raise_on_deleted_version=True)["data"]
        data = {**live["data"], FIELD: value}
        version = kv().create_or_update_secret(path=path, secret=data,
                                               cas=live["metadata"]["version"])["data"]["version"]
        vault().adapter.request(
            "PATCH", f"/v1/secret/metadata/{path}",
            json={"custom_metadata": {f"{FIELD}.key_id": key.id,
                                      f"{FIELD}.version": str(version)}},
            headers={"Content-Type": "application/merge-patch+json"})
        kv().delete_metadata_and_all_versions(path=staged)
        admin.admin.organization.projects.api_keys.delete(old_id, project_id=spec["project_id"])
        old = kv().read_secret_version(path=path, version=old_version,
                                       raise_on_deleted_version=True)["data"]["data"][FIELD]
        try:
            verify(old)
        except openai.AuthenticationError:
            return
        raise SystemExit("old key still accepted")

    with ThreadPoolExecutor(spec["concurrency"]) as pool:
        list(pool.map(rotate, spec["credentials"]))


if __name__ == "__main__":
    main()
