"""Stripe webhook signing secrets and Stripe API keys, rotated through the official ``stripe`` SDK.

One ``[providers.NAME]`` with ``type = "stripe"`` is one Stripe account, the one its ``api_key``
acts on (with ``stripe_context``, a connected account of it). Each credential names what it
rotates in ``params.kind``:

``kind = "webhook_secret"`` (``endpoint_url``, optional ``enabled_events``)
    Stripe shows an endpoint's signing secret (``whsec_...``) only in the response that creates
    the endpoint and cannot roll it through the API, so a rotation *creates a second endpoint*
    for the same URL, with the events and event API version of the newest existing one (or
    ``enabled_events``), ``description`` ``rotator-<rotation id>`` and metadata
    ``rotator_rotation = rotator-<rotation id>``. While both exist Stripe delivers each event to
    each, signed with that endpoint's secret: the agent gets every event twice, accepts the copy
    signed with the secret it holds (handlers must dedupe by event id, as Stripe advises) and
    refuses the other, which Stripe retries until that endpoint is deleted, so keep ``grace``
    short for these credentials. The key id is the endpoint id; ``revoke`` deletes the
    endpoint; ``find_by_rotation`` lists endpoints by URL and metadata. A signing secret cannot
    authenticate anything at Stripe, so ``verify`` checks what can be checked: the endpoint (by
    id) still exists for this URL and is enabled. ``identify`` always returns None: no Stripe API
    maps a secret to its endpoint, so the engine flags an adopted endpoint for deletion by hand
    (a wrong guess would delete another consumer's endpoint).

``kind = "api_key"`` (``key_name``, optional ``permissions`` / ``connect_permissions``)
    Through Stripe's API key management API, ``/v2/iam/api_keys`` (the SDK has no typed methods
    for it, so ``raw_request``). The credential's keys are the account's secret keys named
    ``key_name``. ``create`` makes a *new* key (``POST /v2/iam/api_keys``, ``type =
    "secret_key"``, ``note = "rotator-<rotation id>"``) with the permissions of the current
    ones (or ``permissions``), and reads its secret from ``secret_key.encrypted_secret``: a
    compact JWE encrypted to an RSA-2048 key pair generated for that one call
    (``public_key.pem_key = {algorithm: "RSA", data: <PEM>}``), unwrapped with RSA-OAEP-256 (or
    RSA-OAEP) and decrypted with A256GCM. The private key never leaves that call. A test-mode
    account answers with the plaintext ``secret_key.token`` instead, which is used if no
    encrypted form came back. ``revoke`` expires the key now (``/expire``); ``verify`` reads the
    balance with the key (401 means dead; a 403 means the key authenticated but may not read
    balances, so it is alive).

    Why create-then-expire and not Stripe's ``/rotate``: rotate copies the old key's name and
    note, so the new key cannot carry the rotation id from the moment it exists, and a crash
    right after rotate returned would leave a key that ``find_by_rotation`` can never tell from
    its predecessor; it also schedules the old key's expiry irrevocably (at most 7 days ahead,
    and no API can cancel it), which breaks rollback (the old key must keep working when the
    agent fails its health check) and the no-outage invariant whenever a rotation stalls or
    ``grace`` is long. With create, a crash at any step is safe: until the engine recorded the
    new key it is only a stray, found by its note and expired, while the old key is untouched;
    the old key dies only when the engine revokes it after grace. The cost: create cannot set an
    IP allowlist, so a key whose siblings have one is refused rather than widened silently.

Documented shapes followed: Stripe's API reference for webhook endpoints (``url``,
``enabled_events``, ``secret`` only at creation, ``description``, ``metadata``, ``api_version``,
``status``, delete returns ``deleted``) and the generated v2 IAM SDK types (``ApiKeyCreateParams``
``type/name/note/permissions/connect_permissions/public_key{id, pem_key{algorithm, data}}``,
``ApiKey.secret_key{encrypted_secret{ciphertext, format, recipient_key_id},
secret_token_redacted, token}``, ``status`` ``active|expired``, list ``next_page_url``).
Assumptions where the docs are silent: the JWE's ``alg``/``enc`` (RSA-OAEP-256 or RSA-OAEP with
A128/192/256GCM are accepted, anything else is refused by name); ``ciphertext`` is the compact JWE
itself or its base64; a key already expired is left alone; the v2 calls need no particular
``Stripe-Version`` beyond the SDK's (``api_version`` overrides it for them). Reported by others
against a sandbox, not documented (so handled, not relied on): test-mode listings carry every
key's plaintext token; ``expire`` takes some seconds to bite; ``/rotate`` may kill the old key
at once; minting keys may need a Stripe App's key holding ``api_key_write`` plus
``stripe_context`` (a 403 says which key is needed).

The SDK is imported inside methods, its own retries are off (the engine retries the
:class:`~rotator.errors.TransientError` raised here), and its DEBUG log records, which carry whole
response bodies (signing secrets, test-mode tokens), are dropped.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast
from urllib.parse import quote

from pydantic import Field, field_validator, model_validator

from rotator import redaction
from rotator.config import SecretRef
from rotator.errors import (
    CredentialRejected,
    NotFound,
    PermanentError,
    RotatorError,
    TransientError,
)
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretResolver,
    key_name_for,
)

if TYPE_CHECKING:
    import stripe
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["StripeParams", "StripeProvider", "StripeSettings", "quiet_sdk_debug_logs"]

log = logging.getLogger(__name__)

META_ROTATION = "rotator_rotation"
"""Webhook endpoint metadata key holding ``rotator-<rotation id>``."""
META_CREDENTIAL = "rotator_credential"
_KEY_LIKE = re.compile(r"(?:sk|rk|pk|whsec)_[A-Za-z0-9_*.]{4,}")
_REDACTION_GAP = re.compile(r"(?:\*+|\.{3}|\u2026)+")
_EVENT = re.compile(r"\*|[a-z0-9_]+(?:\.[a-z0-9_]+)+")
_MAX_REMOTE_MESSAGE = 200
_GCM_KEY_BYTES = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}


class StripeSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "stripe"``."""

    api_key: SecretRef = Field(
        description="Reference to the Stripe key rotator acts with: {vault, path, field}, {env} "
        "or {file}. Webhook endpoints need a secret key (or a restricted key that may write "
        "webhook endpoints); API keys need a key allowed to manage API keys."
    )
    api_base: str = "https://api.stripe.com"
    stripe_context: str | None = Field(
        default=None, description="Account (acct_...) the key acts on, sent as Stripe-Context."
    )
    api_version: str | None = Field(
        default=None, description="Stripe-Version for the /v2/iam/api_keys calls."
    )
    timeout: float = Field(default=30, gt=0, description="Seconds per HTTP request.")

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                f"api_base must start with https:// or http:// (got {value!r}); "
                "the default is https://api.stripe.com"
            )
        if re.search(r"/v\d+$", value):
            raise ValueError(
                f"api_base is Stripe's address without a version path (got {value!r}): drop the "
                f"trailing {value.rsplit('/', 1)[1]!r}; the default is https://api.stripe.com"
            )
        return value

    @field_validator("stripe_context", "api_version")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or re.search(r"\s", value.strip())):
            raise ValueError("must be a non-empty value without spaces, or left out")
        return value.strip() if value is not None else None


class StripeParams(PluginSettings):
    """``[credentials.params]`` of a credential rotated by a ``stripe`` provider."""

    kind: Literal["webhook_secret", "api_key"] = Field(
        description='"webhook_secret" (a webhook endpoint\'s signing secret) or "api_key".'
    )
    endpoint_url: str | None = Field(
        default=None, description="webhook_secret: the URL Stripe sends the events to."
    )
    enabled_events: list[str] | None = Field(
        default=None,
        description="webhook_secret: events of the new endpoint (default: the current one's).",
    )
    connect: bool = Field(
        default=False, description="webhook_secret: a Connect endpoint (connected accounts)."
    )
    key_name: str | None = Field(
        default=None, description="api_key: the name the credential's Stripe API keys carry."
    )
    permissions: list[str] | None = Field(
        default=None,
        description="api_key: permissions of the new key (default: the current keys').",
    )
    connect_permissions: list[str] | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(
                f"endpoint_url must be the http(s) URL Stripe delivers the events to, as shown "
                f"under Developers > Webhooks (got {value!r})"
            )
        return value

    @field_validator("enabled_events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "enabled_events is empty: list Stripe event types such as \"charge.succeeded\" "
                "(or \"*\"), or leave it out to copy the current endpoint's"
            )
        bad = [event for event in value if not _EVENT.fullmatch(event)]
        if bad:
            raise ValueError(
                f"enabled_events has {bad[0]!r}, which is not a Stripe event type: use names "
                "like \"charge.succeeded\" or \"invoice.paid\", or \"*\" for all"
            )
        return value

    @field_validator("key_name")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError(
                "key_name is empty: give the name of the credential's Stripe API key, as shown "
                "under Developers > API keys"
            )
        return value

    @field_validator("permissions", "connect_permissions")
    @classmethod
    def _permissions(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise ValueError(
                "must list Stripe permission names (non-empty strings), or be left out to copy "
                "the permissions of the credential's current key"
            )
        return [p.strip() for p in value]

    @model_validator(mode="after")
    def _fits_kind(self) -> StripeParams:
        given = self.model_fields_set
        if self.kind == "webhook_secret":
            if self.endpoint_url is None:
                raise ValueError(
                    'kind = "webhook_secret" needs endpoint_url: the URL of the Stripe webhook '
                    "endpoint whose signing secret is rotated"
                )
            wrong = [k for k in ("key_name", "permissions", "connect_permissions") if k in given]
            other = "api_key"
        else:
            if self.key_name is None:
                raise ValueError(
                    'kind = "api_key" needs key_name: the name of the credential\'s Stripe API '
                    "key, as shown under Developers > API keys"
                )
            wrong = [k for k in ("endpoint_url", "enabled_events", "connect") if k in given]
            other = "webhook_secret"
        if wrong:
            raise ValueError(
                f'{", ".join(wrong)} only appl{"ies" if len(wrong) == 1 else "y"} to kind = '
                f'"{other}": remove {"it" if len(wrong) == 1 else "them"} or change kind'
            )
        return self


@dataclass(frozen=True)
class _Endpoint:
    """A webhook endpoint as listed (the secret is never in a listing)."""

    id: str
    url: str
    status: str
    enabled_events: tuple[str, ...]
    metadata: Mapping[str, str]
    api_version: str | None


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


class _Undecryptable(Exception):
    """The create response's secret could not be read; the message holds no secret."""


class StripeProvider(Provider):
    """Rotates webhook signing secrets and API keys of one Stripe account.

    Thread-safe: one cached admin client and one HTTP client (a ``requests`` session per
    thread) serve every thread; a 401 on an admin call drops the admin client so that the next
    call resolves ``api_key`` again (it may itself have been rotated).
    """

    type_name: ClassVar[str] = "stripe"
    settings_model: ClassVar[type[PluginSettings]] = StripeSettings
    params_model: ClassVar[type[PluginSettings]] = StripeParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True
    )
    """``identify`` works for API keys; for webhook secrets it returns None (see module doc)."""
    list_page_size: ClassVar[int] = 100
    """Objects asked for per list request (Stripe's maximum)."""
    rsa_key_bits: ClassVar[int] = 2048
    """Size of the throw-away key pair a new API key's secret is encrypted to."""

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._lock = threading.Lock()
        self._admin: stripe.StripeClient | None = None
        self._http: Any = None

    @property
    def config(self) -> StripeSettings:
        return cast(StripeSettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """A new endpoint or key carrying ``rotator-<rotation_id>``; see the module doc.

        A timeout may still have created it: the engine finds it with :meth:`find_by_rotation`.
        """
        params = _params(credential)
        if params.kind == "webhook_secret":
            return self._create_endpoint(credential, params, rotation_id)
        return self._create_api_key(credential, params, rotation_id)

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """API key: read the balance with it. Webhook secret: its endpoint is still live."""
        params = _params(credential)
        if params.kind == "webhook_secret":
            self._verify_endpoint(credential, params, secret, key_id)
        else:
            self._verify_api_key(credential, secret)

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Delete the endpoint / expire the key; already gone is success. Refuses an id that
        belongs to another URL or key name, which would be some other consumer's."""
        params = _params(credential)
        if params.kind == "webhook_secret":
            self._revoke_endpoint(params, key_id)
        else:
            self._revoke_api_key(credential, params, key_id)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """Live endpoints/keys of this credential carrying exactly ``rotator-<rotation_id>``."""
        params = _params(credential)
        wanted = key_name_for(rotation_id)
        if params.kind == "webhook_secret":
            return [
                e.id
                for e in self._all_endpoints()
                if e.url == params.endpoint_url and e.metadata.get(META_ROTATION) == wanted
            ]
        return [
            k.id
            for k in self._all_api_keys()
            if k.active and k.name == params.key_name and k.note == wanted
        ]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The id of the one live key of ``key_name`` with that secret; None for webhook secrets.

        A test-mode listing carries each key's token, compared exactly; a live-mode one only a
        prefix and the last four characters, so two keys can look alike: then this returns
        None rather than guess.
        """
        params = _params(credential)
        if params.kind == "webhook_secret":
            return None
        value = secret.reveal()
        exact: list[str] = []
        fitting: list[str] = []
        for item in self._api_key_objects():
            key = _api_key(item)
            if not key.active or key.name != params.key_name:
                continue
            token = (item.get("secret_key") or {}).get("token")
            if isinstance(token, str) and token:
                if hmac.compare_digest(token.encode(), value.encode()):
                    exact.append(key.id)
            elif _redaction_fits(key.redacted, value):
                fitting.append(key.id)
        matches = exact or fitting
        if len(matches) == 1:
            return matches[0]
        log.info("%s: %d API keys named %r look like the current key of %s; not guessing",
                 self.name, len(matches), params.key_name, credential.name)
        return None

    def check_access(self) -> None:
        """List webhook endpoints, then API keys: the calls rotation depends on.

        A refusal of the API key listing is only logged: the account may rotate webhook
        secrets alone, and this check does not know which kinds its credentials use.
        """
        client = self._admin_client()
        with self._boundary("listing webhook endpoints", client=client):
            client.v1.webhook_endpoints.list(params={"limit": 1})
        try:
            self._v2("get", "/v2/iam/api_keys", action="listing API keys", limit=1)
        except TransientError:
            raise
        except RotatorError as exc:
            log.warning("%s: api_key credentials cannot be rotated with this key: %s",
                        self.name, exc)

    def warm_up(self) -> None:
        import stripe  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: F401

        quiet_sdk_debug_logs()

    def close(self) -> None:
        with self._lock:
            self._admin = None
            http, self._http = self._http, None
        if http is not None:
            http.close()

    # -- webhook endpoints ---------------------------------------------------------------------

    def _create_endpoint(
        self, credential: CredentialInfo, params: StripeParams, rotation_id: str
    ) -> NewKey:
        url = cast(str, params.endpoint_url)
        existing = [e for e in self._all_endpoints() if e.url == url]  # newest first
        template = next((e for e in existing if e.status == "enabled"), None) or (
            existing[0] if existing else None
        )
        events = params.enabled_events or (list(template.enabled_events) if template else None)
        if not events:
            raise PermanentError(
                f"{self.name}: {credential.name}: no webhook endpoint for {url} at Stripe to "
                "copy enabled_events from: create the endpoint first, or set "
                "params.enabled_events"
            )
        wanted = key_name_for(rotation_id)
        metadata = {
            k: v for k, v in (template.metadata if template else {}).items()
            if k not in (META_ROTATION, META_CREDENTIAL)
        }
        metadata.update({META_ROTATION: wanted, META_CREDENTIAL: credential.name[:500]})
        payload: dict[str, Any] = {
            "url": url,
            "enabled_events": list(events),
            "description": wanted,
            "metadata": metadata,
        }
        if template is not None and template.api_version:
            payload["api_version"] = template.api_version
        if params.connect:
            payload["connect"] = True
        client = self._admin_client()
        with self._boundary(f"creating a webhook endpoint for {credential.name}", client=client):
            created = client.v1.webhook_endpoints.create(params=cast(Any, payload))
        data = created.to_dict(recursive=False)
        endpoint_id = str(data.get("id"))
        value = data.get("secret")
        if not isinstance(value, str) or not value:
            self._delete_quietly(endpoint_id)
            raise PermanentError(
                f"{self.name}: Stripe created webhook endpoint {endpoint_id} without returning "
                "its signing secret; the endpoint was deleted again"
            )
        log.info("%s: created webhook endpoint %s for %s", self.name, endpoint_id,
                 credential.name)
        return NewKey(key_id=endpoint_id, secret=Secret(value))

    def _verify_endpoint(
        self, credential: CredentialInfo, params: StripeParams, secret: Secret,
        key_id: str | None,
    ) -> None:
        if not secret.reveal().startswith("whsec_"):
            raise CredentialRejected(
                f"{self.name}: the value of {credential.name} is not a Stripe webhook signing "
                "secret (whsec_...)"
            )
        if key_id is None:
            raise PermanentError(
                f"{self.name}: a webhook signing secret can only be checked through its "
                f"endpoint, and the endpoint of {credential.name}'s secret is not known"
            )
        client = self._admin_client()
        try:
            with self._boundary(f"reading webhook endpoint {key_id}", client=client):
                endpoint = _endpoint(client.v1.webhook_endpoints.retrieve(key_id))
        except NotFound as exc:
            raise CredentialRejected(
                f"{self.name}: webhook endpoint {key_id} no longer exists, so its signing "
                "secret signs nothing"
            ) from exc
        if endpoint.url != params.endpoint_url:
            raise CredentialRejected(
                f"{self.name}: webhook endpoint {key_id} is not the endpoint of "
                f"{credential.name} (its URL is not params.endpoint_url)"
            )
        if endpoint.status != "enabled":
            raise CredentialRejected(
                f"{self.name}: webhook endpoint {key_id} is {endpoint.status}: Stripe sends it "
                "no events"
            )

    def _revoke_endpoint(self, params: StripeParams, key_id: str) -> None:
        client = self._admin_client()
        try:
            with self._boundary(f"reading webhook endpoint {key_id}", client=client):
                endpoint = _endpoint(client.v1.webhook_endpoints.retrieve(key_id))
        except NotFound:
            log.info("%s: webhook endpoint %s was already deleted", self.name, key_id)
            return
        if endpoint.url != params.endpoint_url:
            raise PermanentError(
                f"{self.name}: webhook endpoint {key_id} does not send to params.endpoint_url "
                f"({params.endpoint_url}); refusing to delete an endpoint of another URL"
            )
        with suppress(NotFound), self._boundary(f"deleting webhook endpoint {key_id}",
                                                client=client):
            client.v1.webhook_endpoints.delete(key_id)
        log.info("%s: deleted webhook endpoint %s", self.name, key_id)

    def _delete_quietly(self, endpoint_id: str) -> None:
        client = self._admin_client()
        try:
            with self._boundary(f"deleting webhook endpoint {endpoint_id}", client=client):
                client.v1.webhook_endpoints.delete(endpoint_id)
        except RotatorError as exc:
            log.error("%s: could not delete webhook endpoint %s: %s; delete it by hand",
                      self.name, endpoint_id, exc)

    def _all_endpoints(self) -> list[_Endpoint]:
        client = self._admin_client()
        with self._boundary("listing webhook endpoints", client=client):
            page = client.v1.webhook_endpoints.list(params={"limit": self.list_page_size})
            return [_endpoint(e) for e in page.auto_paging_iter()]

    # -- API keys ------------------------------------------------------------------------------

    def _create_api_key(
        self, credential: CredentialInfo, params: StripeParams, rotation_id: str
    ) -> NewKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

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
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=self.rsa_key_bits)
        pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
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
        created = self._v2("post", "/v2/iam/api_keys",
                           action=f"creating an API key for {credential.name}", **body)
        key_id = created.get("id")
        if not isinstance(key_id, str) or not key_id:
            raise PermanentError(
                f"{self.name}: Stripe's answer to creating an API key has no id; the key named "
                f"{params.key_name!r} with note {wanted!r} may exist and is cleaned up by the "
                "engine"
            )
        try:
            token = _token_from(created, private_key, wanted)
        except _Undecryptable as exc:
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

    def _verify_api_key(self, credential: CredentialInfo, secret: Secret) -> None:
        import stripe

        client = stripe.StripeClient(
            secret.reveal(),
            base_addresses={"api": self.config.api_base},
            max_network_retries=0,
            http_client=self._http_client(),
        )
        with self._boundary(f"verifying a key of {credential.name}", admin=False):
            try:
                client.v1.balance.retrieve()
            except stripe.PermissionError:
                # Stripe authenticated the key; it only may not read balances (restricted key).
                log.debug("%s: key of %s authenticated (no balance permission)", self.name,
                          credential.name)

    def _revoke_api_key(
        self, credential: CredentialInfo, params: StripeParams, key_id: str
    ) -> None:
        path = f"/v2/iam/api_keys/{quote(key_id, safe='')}"
        try:
            key = _api_key(self._v2("get", path, action=f"reading API key {key_id}"))
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
            self._v2("post", f"{path}/expire", action=f"expiring API key {key_id}")
        log.info("%s: expired API key %s", self.name, key_id)

    def _expire_quietly(self, key_id: str) -> None:
        try:
            self._v2("post", f"/v2/iam/api_keys/{quote(key_id, safe='')}/expire",
                     action=f"expiring API key {key_id}")
        except RotatorError as exc:
            log.error("%s: could not expire API key %s: %s; expire it by hand", self.name,
                      key_id, exc)

    def _all_api_keys(self) -> list[_ApiKey]:
        return [_api_key(item) for item in self._api_key_objects()]

    def _api_key_objects(self) -> Iterator[dict[str, Any]]:
        """Every key object of every page. Test-mode listings carry tokens: callers keep none."""
        page = self._v2("get", "/v2/iam/api_keys", action="listing API keys",
                        limit=self.list_page_size)
        seen: set[str] = set()
        while True:
            for item in page.get("data") or []:
                if isinstance(item, dict):
                    yield item
            next_url = page.get("next_page_url")
            if not next_url or next_url in seen:
                return
            seen.add(next_url)
            page = self._v2("get", str(next_url), action="listing API keys")

    def _v2(self, method: str, path: str, *, action: str, **params: Any) -> dict[str, Any]:
        """One ``/v2`` request with the admin key (JSON), its answer as a dict."""
        client = self._admin_client()
        if self.config.api_version:
            params["stripe_version"] = self.config.api_version
        with self._boundary(action, client=client):
            response = client.raw_request(method, path, **params)
        data = getattr(response, "data", None)
        if not isinstance(data, dict):
            raise TransientError(f"{self.name}: {action}: Stripe's answer is not a JSON object")
        return data

    # -- clients and errors --------------------------------------------------------------------

    def _http_client(self) -> Any:
        with self._lock:
            return self._http_locked()

    def _http_locked(self) -> Any:
        if self._http is None:
            import stripe

            quiet_sdk_debug_logs()
            self._http = stripe.RequestsClient(timeout=self.config.timeout)
        return self._http

    def _admin_client(self) -> stripe.StripeClient:
        """The cached admin client, built (and ``api_key`` resolved) on first use."""
        with self._lock:
            if self._admin is None:
                import stripe

                http = self._http_locked()
                admin_key = self.resolve_secret(self.config.api_key)
                self._admin = stripe.StripeClient(
                    admin_key.reveal(),
                    stripe_context=self.config.stripe_context,
                    base_addresses={"api": self.config.api_base},
                    max_network_retries=0,
                    http_client=http,
                )
            return self._admin

    def _forget_admin_client(self, client: stripe.StripeClient) -> None:
        with self._lock:
            if self._admin is client:
                self._admin = None

    @contextmanager
    def _boundary(
        self, action: str, *, admin: bool = True, client: stripe.StripeClient | None = None
    ) -> Iterator[None]:
        """Translate SDK exceptions raised inside into :mod:`rotator.errors`, chained."""
        import stripe

        try:
            yield
        except stripe.APIConnectionError as exc:
            raise TransientError(
                f"{self.name}: {action}: could not reach Stripe at {self.config.api_base} "
                f"({type(exc.__cause__ or exc).__name__})"
            ) from exc
        except stripe.StripeError as exc:
            status = exc.http_status
            if status is None or status < 400:
                # An answer the SDK could not parse: its message quotes the body, which may
                # hold a secret, so it is not chained.
                raise TransientError(
                    f"{self.name}: {action}: Stripe sent an answer that could not be read "
                    f"(HTTP {status})"
                ) from None
            if admin and status == 401 and client is not None:
                self._forget_admin_client(client)
            raise self._status_error(exc, status, action, admin=admin) from exc

    def _status_error(
        self, exc: stripe.StripeError, status: int, action: str, *, admin: bool
    ) -> RotatorError:
        import stripe

        code = exc.code
        where = f"HTTP {status}" + (f" {code}" if code else "")
        if exc.request_id:
            where += f", request id {exc.request_id}"
        prefix = f"{self.name}: {action}"
        if status in (401, 403):
            # Stripe quotes part of the refused key in these messages: never pass them on.
            if not admin:
                return CredentialRejected(f"{prefix}: Stripe refused the key ({where})")
            if status == 401:
                return PermanentError(
                    f"{prefix}: Stripe refused the provider's key ({where}); check that api_key "
                    f"in [providers.{self.name}] refers to a live Stripe secret key"
                )
            return PermanentError(
                f"{prefix}: the provider's key may not do this ({where}); webhook endpoints "
                "need a secret key or a restricted key with webhook write access, API keys a "
                f"key allowed to manage API keys (see stripe_context in [providers.{self.name}])"
            )
        detail = f"{where}: {_remote_message(exc)}"
        retry_after = _retry_after(exc.headers or {})
        if isinstance(exc, stripe.RateLimitError) or status == 429:
            return TransientError(f"{prefix}: rate limited ({detail})", retry_after=retry_after)
        if status >= 500 or status in (408, 409):
            return TransientError(
                f"{prefix}: Stripe is unavailable ({detail})", retry_after=retry_after
            )
        if status == 404:
            return NotFound(f"{prefix}: not found ({detail})")
        return PermanentError(f"{prefix}: Stripe refused the request ({detail})")


# -- helpers ---------------------------------------------------------------------------------------


class _NoSdkDebug(logging.Filter):
    """Drops the SDK's DEBUG records: they hold whole request and response bodies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO


_SDK_FILTER = _NoSdkDebug()


def quiet_sdk_debug_logs() -> None:
    """Keep response bodies (signing secrets, test-mode tokens) out of every log.

    The SDK logs them at DEBUG through the ``stripe`` logger, and prints them to stderr when
    ``STRIPE_LOG=debug``; the first is filtered, the second lowered to ``info``.
    """
    import stripe

    logger = logging.getLogger("stripe")
    if _SDK_FILTER not in logger.filters:
        logger.addFilter(_SDK_FILTER)
    if getattr(stripe, "log", None) == "debug":
        stripe.log = "info"
    util = getattr(stripe, "_util", None)
    if util is not None and getattr(util, "STRIPE_LOG", None) == "debug":
        util.STRIPE_LOG = "info"


def _params(credential: CredentialInfo) -> StripeParams:
    params = credential.params
    if isinstance(params, StripeParams):
        return params
    if isinstance(params, Mapping):
        return StripeParams.model_validate(dict(params))
    raise PermanentError(
        f"{credential.name}: params are not Stripe provider params ({type(params).__name__})"
    )


def _endpoint(obj: Any) -> _Endpoint:
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return _Endpoint(
        id=str(data.get("id")),
        url=str(data.get("url") or ""),
        status=str(data.get("status") or ""),
        enabled_events=tuple(data.get("enabled_events") or ()),
        metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
        api_version=data.get("api_version") or None,
    )


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


def _token_from(created: Mapping[str, Any], private_key: RSAPrivateKey, recipient: str) -> str:
    """The new key's secret from a create response: decrypted, or test mode's plaintext."""
    secret_key = created.get("secret_key") or {}
    encrypted = secret_key.get("encrypted_secret")
    if encrypted:
        fmt = encrypted.get("format")
        if fmt not in (None, "jwe_compact"):
            raise _Undecryptable(f"encrypted_secret.format {str(fmt)[:40]!r} is not jwe_compact")
        echoed = encrypted.get("recipient_key_id")
        if echoed not in (None, recipient):
            raise _Undecryptable("the secret is encrypted to some other public key")
        return _decrypt_jwe(encrypted.get("ciphertext"), private_key)
    token = secret_key.get("token")
    if isinstance(token, str) and token:
        return token
    raise _Undecryptable("the answer has neither secret_key.encrypted_secret nor .token")


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _decrypt_jwe(ciphertext: Any, private_key: RSAPrivateKey) -> str:
    """Decrypt a compact JWE (RFC 7516): RSA-OAEP(-256) key wrap, AES-GCM content."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not isinstance(ciphertext, str) or not ciphertext.strip():
        raise _Undecryptable("encrypted_secret.ciphertext is empty")
    compact = ciphertext.strip()
    if compact.count(".") != 4:
        try:  # "in base64 format": maybe the compact form, base64-encoded once more
            compact = base64.b64decode(compact, validate=True).decode("ascii").strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise _Undecryptable("encrypted_secret.ciphertext is not a compact JWE") from None
        if compact.count(".") != 4:
            raise _Undecryptable("encrypted_secret.ciphertext is not a compact JWE")
    protected, wrapped, iv, body, tag = compact.split(".")
    try:
        header = json.loads(_b64url(protected))
        parts = [_b64url(p) for p in (wrapped, iv, body, tag)]
    except (binascii.Error, ValueError):
        raise _Undecryptable("the JWE is not well-formed") from None
    if not isinstance(header, dict):
        raise _Undecryptable("the JWE header is not a JSON object")
    alg, enc = header.get("alg"), header.get("enc")
    digests = {"RSA-OAEP-256": hashes.SHA256, "RSA-OAEP": hashes.SHA1}
    if alg not in digests:
        raise _Undecryptable(f"JWE alg {str(alg)[:40]!r} is not RSA-OAEP-256 or RSA-OAEP")
    if enc not in _GCM_KEY_BYTES:
        raise _Undecryptable(f"JWE enc {str(enc)[:40]!r} is not A128GCM, A192GCM or A256GCM")
    if header.get("zip") or header.get("crit"):
        raise _Undecryptable("the JWE uses zip or crit, which are not supported")
    wrapped_key, nonce, encrypted, auth_tag = parts
    digest = digests[alg]()
    try:
        cek = private_key.decrypt(
            wrapped_key, padding.OAEP(mgf=padding.MGF1(algorithm=digest), algorithm=digest,
                                      label=None)
        )
        if len(cek) != _GCM_KEY_BYTES[enc]:
            raise _Undecryptable(f"the JWE content key does not fit {enc}")
        plaintext = AESGCM(cek).decrypt(nonce, encrypted + auth_tag, protected.encode("ascii"))
    except (InvalidTag, ValueError):
        raise _Undecryptable("the JWE does not decrypt with this rotation's key pair") from None
    try:
        token = plaintext.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _Undecryptable("the decrypted secret is not text") from None
    if not token:
        raise _Undecryptable("the decrypted secret is empty")
    return token


def _redaction_fits(redacted: str, value: str) -> bool:
    """Whether ``value`` could be the key Stripe shows as ``redacted`` (``rk_live_...abcd``)."""
    parts = _REDACTION_GAP.split(redacted)
    if len(parts) != 2 or not parts[1]:
        return False
    head, tail = parts
    return len(value) > len(head) + len(tail) and value.startswith(head) and value.endswith(tail)


def _remote_message(exc: stripe.StripeError) -> str:
    """Stripe's own error message, cut short and stripped of anything key-shaped."""
    body = exc.json_body
    error = body.get("error") if isinstance(body, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    if not isinstance(message, str) or not message:
        return "no message"
    message = _KEY_LIKE.sub("[redacted]", redaction.scrub(message))
    if len(message) > _MAX_REMOTE_MESSAGE:
        message = message[:_MAX_REMOTE_MESSAGE] + "..."
    return message


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``Retry-After`` (seconds or an HTTP date), whatever the header's case."""
    raw = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
