"""Stripe API keys of an account (``kind = "api_key"``), through ``/v2/iam/api_keys``.

The SDK has no typed methods for Stripe's API key management API, so these are ``raw_request``
calls. The credential's keys are the account's secret keys named ``key_name``. ``create`` makes
a *new* key (``POST /v2/iam/api_keys``, ``type = "secret_key"``, ``note = "rotator-<rotation
id>"``) with the permissions of the current ones (or ``permissions``), and reads its secret from
``secret_key.encrypted_secret`` (:mod:`providers.stripe.jwe`; a test-mode account answers with
the plaintext ``secret_key.token`` instead). ``revoke`` expires the key now (``/expire``);
``verify`` reads the balance with the key (401 means dead; a 403 means the key authenticated
but may not read balances, so it is alive).

Why create-then-expire and not Stripe's ``/rotate``: rotate copies the old key's name and note,
so the new key cannot carry the rotation id from the moment it exists, and a crash right after
rotate returned would leave a key that ``find_by_rotation`` can never tell from its
predecessor; it also schedules the old key's expiry irrevocably (at most 7 days ahead, and no
API can cancel it), which breaks rollback (the old key must keep working when the agent fails
its health check) and the no-outage invariant whenever a rotation stalls or ``grace`` is long.
With create, a crash at any step is safe: until the engine recorded the new key it is only a
stray, found by its note and expired, while the old key is untouched; the old key dies only
when the engine revokes it after grace. The cost: create cannot set an IP allowlist, so a key
whose siblings have one is refused rather than widened silently.

Documented shapes followed: the generated v2 IAM SDK types (``ApiKeyCreateParams``
``type/name/note/permissions/connect_permissions/public_key{id, pem_key{algorithm, data}}``,
``ApiKey.secret_key{encrypted_secret{ciphertext, format, recipient_key_id},
secret_token_redacted, token}``, ``status`` ``active|expired``, list ``next_page_url``).
Assumptions where the docs are silent: a key already expired is left alone; the v2 calls need no
particular ``Stripe-Version`` beyond the SDK's (``api_version`` overrides it for them). Reported
by others against a sandbox, not documented (so handled, not relied on): test-mode listings
carry every key's plaintext token; ``expire`` takes some seconds to bite; ``/rotate`` may kill
the old key at once; minting keys may need a Stripe App's key holding ``api_key_write`` plus
``stripe_context`` (a 403 says which key is needed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from providers.stripe.client import StripeAccount
from providers.stripe.jwe import Undecryptable, key_pair, token_from
from providers.stripe.settings import StripeParams
from rotator.errors import NotFound, PermanentError, RotatorError
from rotator.interfaces import CredentialInfo, NewKey, Secret, key_name_for
from rotator.plugin_support import same_text

__all__ = ["ApiKeys", "redaction_fits"]

log = logging.getLogger(__name__)

_REDACTION_GAP = re.compile(r"(?:\*+|\.{3}|\u2026)+")


@dataclass(frozen=True)
class _ApiKey:
    """An API key as listed, without any token."""

    id: str
    name: str | None
    note: str | None
    type: str
    active: bool
    permissions: tuple[str, ...] | None
    connect_permissions: tuple[str, ...] | None
    ip_allowlist: tuple[str, ...]
    redacted: str


class ApiKeys:
    """The secret keys of one account, each credential's found by its ``key_name``."""

    def __init__(self, account: StripeAccount, *, page_size: int, rsa_key_bits: int) -> None:
        self.account = account
        self.name = account.name
        self.page_size = page_size
        self.rsa_key_bits = rsa_key_bits

    def create(self, credential: CredentialInfo, params: StripeParams,
               rotation_id: str) -> NewKey:
        """A new key named ``key_name`` with note ``rotator-<rotation_id>``."""
        current = [
            k for k in self._all_api_keys()
            if k.active and k.type == "secret_key" and k.name == params.key_name
        ]
        fenced = [k.id for k in current if k.ip_allowlist]
        if fenced:
            raise PermanentError(
                f"{self.name}: {credential.name}: Stripe API key {fenced[0]} has an IP "
                "allowlist, which Stripe's API cannot give a new key; rotating would widen "
                "access, so it is refused (remove the allowlist, or rotate this key by hand)"
            )
        permissions, connect_permissions = self._permissions_for(credential, params, current)
        wanted = key_name_for(rotation_id)
        private_key, pem = key_pair(self.rsa_key_bits)
        body: dict[str, Any] = {
            "type": "secret_key",
            "name": params.key_name,
            "note": wanted,
            "public_key": {"id": wanted, "pem_key": {"algorithm": "RSA", "data": pem}},
        }
        if permissions is not None:
            body["permissions"] = list(permissions)
        if connect_permissions is not None:
            body["connect_permissions"] = list(connect_permissions)
        created = self.account.v2("post", "/v2/iam/api_keys",
                                  action=f"creating an API key for {credential.name}", **body)
        key_id = created.get("id")
        if not isinstance(key_id, str) or not key_id:
            raise PermanentError(
                f"{self.name}: Stripe's answer to creating an API key has no id; the key named "
                f"{params.key_name!r} with note {wanted!r} may exist and is cleaned up by the "
                "engine"
            )
        try:
            token = token_from(created, private_key, wanted)
        except Undecryptable as exc:
            self._expire_quietly(key_id)
            raise PermanentError(
                f"{self.name}: Stripe created API key {key_id} but its secret could not be "
                f"read ({exc}); the key was expired again"
            ) from None
        log.info("%s: created API key %s for %s", self.name, key_id, credential.name)
        return NewKey(key_id=key_id, secret=Secret(token))

    def _permissions_for(
        self, credential: CredentialInfo, params: StripeParams, current: list[_ApiKey]
    ) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
        """``params.permissions`` if set, else the permissions all current keys share."""
        if params.permissions is not None:
            connect = params.connect_permissions
            return tuple(params.permissions), tuple(connect) if connect is not None else None
        if not current:
            raise PermanentError(
                f"{self.name}: {credential.name}: no live Stripe API key is named "
                f"{params.key_name!r} to copy permissions from: check params.key_name, or set "
                "params.permissions"
            )
        sets = {(_sorted(k.permissions), _sorted(k.connect_permissions)) for k in current}
        if len(sets) > 1:
            raise PermanentError(
                f"{self.name}: {credential.name}: the API keys named {params.key_name!r} "
                f"({', '.join(k.id for k in current)}) have different permissions: set "
                "params.permissions to those the new key should have"
            )
        return sets.pop()

    def verify(self, credential: CredentialInfo, params: StripeParams, secret: Secret,
               key_id: str | None) -> None:
        """Read the balance with the key."""
        import stripe

        client = stripe.StripeClient(
            secret.reveal(),
            base_addresses={"api": self.account.config.api_base},
            max_network_retries=0,
            http_client=self.account.http_client(),
        )
        with self.account.boundary(f"verifying a key of {credential.name}", admin=False):
            try:
                client.v1.balance.retrieve()
            except stripe.PermissionError:
                # Stripe authenticated the key; it only may not read balances (restricted key).
                log.debug("%s: key of %s authenticated (no balance permission)", self.name,
                          credential.name)

    def revoke(self, credential: CredentialInfo, params: StripeParams, key_id: str) -> None:
        """Expire the key now; already gone or expired is success. Refuses a key of another
        name."""
        path = f"/v2/iam/api_keys/{quote(key_id, safe='')}"
        try:
            key = _api_key(self.account.v2("get", path, action=f"reading API key {key_id}"))
        except NotFound:
            log.info("%s: API key %s does not exist (already gone)", self.name, key_id)
            return
        if not key.active:
            log.info("%s: API key %s was already expired", self.name, key_id)
            return
        if key.name != params.key_name:
            raise PermanentError(
                f"{self.name}: API key {key_id} is not named {params.key_name!r} "
                f"(params.key_name of {credential.name}); refusing to expire another "
                "credential's key"
            )
        with suppress(NotFound):
            self.account.v2("post", f"{path}/expire", action=f"expiring API key {key_id}")
        log.info("%s: expired API key %s", self.name, key_id)

    def find_by_rotation(self, params: StripeParams, rotation_id: str) -> list[str]:
        """Live keys named ``key_name`` whose note is exactly ``rotator-<rotation_id>``."""
        wanted = key_name_for(rotation_id)
        return [
            k.id
            for k in self._all_api_keys()
            if k.active and k.name == params.key_name and k.note == wanted
        ]

    def identify(self, credential: CredentialInfo, params: StripeParams,
                 secret: Secret) -> str | None:
        """The id of the one live key of ``key_name`` with that secret, else None.

        A test-mode listing carries each key's token, compared exactly; a live-mode one only a
        prefix and the last four characters, so two keys can look alike: then this returns
        None rather than guess.
        """
        value = secret.reveal()
        exact: list[str] = []
        fitting: list[str] = []
        for item in self._api_key_objects():
            key = _api_key(item)
            if not key.active or key.name != params.key_name:
                continue
            token = (item.get("secret_key") or {}).get("token")
            if isinstance(token, str) and token:
                if same_text(token, value):
                    exact.append(key.id)
            elif redaction_fits(key.redacted, value):
                fitting.append(key.id)
        matches = exact or fitting
        if len(matches) == 1:
            return matches[0]
        log.info("%s: %d API keys named %r look like the current key of %s; not guessing",
                 self.name, len(matches), params.key_name, credential.name)
        return None

    def check_access(self) -> None:
        """List one key: the call every rotation starts with."""
        self.account.v2("get", "/v2/iam/api_keys", action="listing API keys", limit=1)

    def _expire_quietly(self, key_id: str) -> None:
        try:
            self.account.v2("post", f"/v2/iam/api_keys/{quote(key_id, safe='')}/expire",
                            action=f"expiring API key {key_id}")
        except RotatorError as exc:
            log.error("%s: could not expire API key %s: %s; expire it by hand", self.name,
                      key_id, exc)

    def _all_api_keys(self) -> list[_ApiKey]:
        return [_api_key(item) for item in self._api_key_objects()]

    def _api_key_objects(self) -> Iterator[dict[str, Any]]:
        """Every key object of every page. Test-mode listings carry tokens: callers keep none."""
        page = self.account.v2("get", "/v2/iam/api_keys", action="listing API keys",
                               limit=self.page_size)
        seen: set[str] = set()
        while True:
            for item in page.get("data") or []:
                if isinstance(item, dict):
                    yield item
            next_url = page.get("next_page_url")
            if not next_url or next_url in seen:
                return
            seen.add(next_url)
            page = self.account.v2("get", str(next_url), action="listing API keys")


def _api_key(item: Mapping[str, Any]) -> _ApiKey:
    secret_key = item.get("secret_key") or {}
    return _ApiKey(
        id=str(item.get("id")),
        name=item.get("name"),
        note=item.get("note"),
        type=str(item.get("type") or ""),
        active=item.get("status") == "active",
        permissions=_tuple(item.get("permissions")),
        connect_permissions=_tuple(item.get("connect_permissions")),
        ip_allowlist=tuple(item.get("ip_allowlist") or ()),
        redacted=str(secret_key.get("secret_token_redacted") or ""),
    )


def _tuple(value: Any) -> tuple[str, ...] | None:
    return tuple(str(v) for v in value) if isinstance(value, list) else None


def _sorted(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return tuple(sorted(value)) if value else None


def redaction_fits(redacted: str, value: str) -> bool:
    """Whether ``value`` could be the key Stripe shows as ``redacted`` (``rk_live_...abcd``)."""
    parts = _REDACTION_GAP.split(redacted)
    if len(parts) != 2 or not parts[1]:
        return False
    head, tail = parts
    return len(value) > len(head) + len(tail) and value.startswith(head) and value.endswith(tail)
