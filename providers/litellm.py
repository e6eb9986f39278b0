"""Virtual keys of a LiteLLM proxy, rotated with its master key (``type = "litellm"``).

The open-source proxy makes a key with ``POST /key/generate`` (``key_alias``, and the terms
rotator gives every key it makes: ``max_budget`` in USD with its ``budget_duration``, and a
``duration`` after which the key expires) and deletes it with ``POST /key/delete``; it has no
regenerate, so a rotation is generate, then delete the old key after grace. A key's id is its
hashed token (the SHA-256 the proxy stores it under), so an adopted key is identified without
guessing. ``verify`` lists models with the key; usage comes from ``GET /spend/logs``, each
call's spend and tokens, put into buckets of any width here.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, cast

from pydantic import Field, field_validator

from providers.http.sending import (
    HttpSession,
    QueryParams,
    api_base_url,
    json_object,
    status_error,
)
from rotator.errors import CredentialRejected, NotFound, PermanentError, RotatorError
from rotator.interfaces import (
    Budget,
    Capabilities,
    CredentialInfo,
    KeyProbe,
    KeyTerms,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretRef,
    SecretResolver,
    UsageBucket,
    UsageReport,
    key_name_for,
)
from rotator.plugin_support import FOUND_KEY, accepted

if TYPE_CHECKING:
    import httpx

__all__ = ["LiteLLMProvider", "LiteLLMSettings"]

log = logging.getLogger("rotator.providers.litellm")

_PERIODS = {"day": "1d", "week": "7d", "month": "30d"}
PAGE_SIZE = 100


class LiteLLMSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "litellm"``."""

    base_url: str = Field(description="The proxy's address, like http://litellm:4000.")
    master_key: SecretRef = Field(
        description="Reference to the proxy's master key (or an admin key that may manage "
                    "keys): {vault, path, field}, {env} or {file}.")
    timeout: float = Field(default=30, gt=0, le=600, description="Seconds per HTTP request.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return api_base_url(value, "http://litellm:4000")


class LiteLLMParams(PluginSettings):
    """``[credentials.params]`` for a ``litellm`` credential; all optional."""

    models: list[str] | None = Field(default=None, description="Models the key may call.")
    metadata: dict[str, str] = Field(default_factory=dict,
                                     description="Metadata every key carries (team, owner).")


class LiteLLMProvider(Provider, KeyProbe, UsageReport, KeyTerms):
    """Generates, verifies and deletes a LiteLLM proxy's virtual keys; reports their spend."""

    type_name: ClassVar[str] = "litellm"
    settings_model: ClassVar[type[PluginSettings]] = LiteLLMSettings
    params_model: ClassVar[type[PluginSettings]] = LiteLLMParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True)
    expires: ClassVar[bool] = True
    budget_periods: ClassVar[tuple[str | None, ...]] = (None, "day", "week", "month")
    usage_widths: ClassVar[tuple[timedelta, ...]] = (
        timedelta(minutes=1), timedelta(hours=1), timedelta(days=1))

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._session = HttpSession(name, timeout=self.config.timeout,
                                    headers={"User-Agent": "rotator"},
                                    resolve=lambda: self.resolve_secret(self.config.master_key))

    @property
    def config(self) -> LiteLLMSettings:
        return cast(LiteLLMSettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        return self.create_with_terms(credential, rotation_id, ttl=None, budget=None)

    def create_with_terms(self, credential: CredentialInfo, rotation_id: str, *,
                          ttl: timedelta | None, budget: Budget | None) -> NewKey:
        """``/key/generate`` with ``key_alias = rotator-<rotation_id>``, the credential's
        models and metadata, ``max_budget``/``budget_duration`` and ``duration``."""
        params = _params(credential)
        body: dict[str, Any] = {
            "key_alias": key_name_for(rotation_id),
            "metadata": {**params.metadata, "rotator_credential": credential.name,
                         "rotator_agent": credential.agent}}
        if params.models:
            body["models"] = params.models
        if budget is not None:
            body["max_budget"] = budget.usd
            if budget.per:
                body["budget_duration"] = _PERIODS[budget.per]
        if ttl is not None:
            body["duration"] = f"{int(ttl.total_seconds())}s"
        action = f"generating a key for {credential.name}"
        response = self._request("POST", "/key/generate", action, json=body)
        if not response.is_success:
            raise self._error(response, action, admin=True)
        answer = _json(response, self.name, action)
        value = answer.get("key")
        if not isinstance(value, str):
            raise PermanentError(f"{self.name}: {action}: the proxy answered without the key; "
                                 f"delete the key aliased {body['key_alias']} by hand")
        token = _hashed(value)
        log.info("%s: generated key %s for %s", self.name, token[:12], credential.name)
        return NewKey(key_id=token, secret=Secret(value))

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """List models with the key; 401/403 mean ``CredentialRejected``."""
        action = f"verifying a key of {credential.name}"
        response = self._request("GET", "/v1/models", action, key=secret)
        if response.status_code in (401, 403):
            raise CredentialRejected(f"{self.name}: {action}: the proxy refused the key "
                                     f"(HTTP {response.status_code})")
        if not response.is_success:
            raise self._error(response, action, admin=False)

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """``/key/delete`` by hashed token; a key already gone is success (once the master
        key is known to work)."""
        action = f"revoking key {key_id[:12]}"
        response = self._request("POST", "/key/delete", action, json={"keys": [key_id]})
        if response.status_code in (400, 404) and self._gone(key_id, action):
            log.info("%s: key %s does not exist; nothing to revoke", self.name, key_id[:12])
            return
        if not response.is_success:
            raise self._error(response, action, admin=True)
        log.warning("%s: key %s of %s deleted", self.name, key_id[:12], credential.name)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        alias = key_name_for(rotation_id)
        return [str(k["token"]) for k in self._keys(f"finding the keys of {rotation_id}")
                if k.get("key_alias") == alias]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The key's hashed token, once the proxy knows it and accepts the key: no guess."""
        action = f"identifying the key of {credential.name}"
        token = _hashed(secret.reveal())
        if self._gone(token, action):
            return None
        try:
            self.verify(credential, secret)
        except CredentialRejected:
            return None
        return token

    def found_credential(self, secret: Secret, companions: Mapping[str, str]
                         ) -> CredentialInfo | None:
        return CredentialInfo(FOUND_KEY, "", LiteLLMParams())

    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        return accepted(self, secret)

    def usage(self, key_ids: Sequence[str], start: datetime, end: datetime,
              width: timedelta) -> list[UsageBucket]:
        """Each call's spend and tokens from ``/spend/logs`` (asked per key and day range),
        summed into buckets of ``width``."""
        if width not in self.usage_widths:
            raise PermanentError(f"{self.name}: usage buckets are 1m, 1h or 1d")
        seconds = int(width.total_seconds())
        totals: dict[tuple[str, int], list[float]] = {}
        action = "reading the proxy's spend logs"
        for token in key_ids:
            response = self._request("GET", "/spend/logs", action, params={
                "api_key": token, "start_date": start.astimezone(UTC).strftime("%Y-%m-%d"),
                "end_date": end.astimezone(UTC).strftime("%Y-%m-%d")})
            if not response.is_success:
                raise self._error(response, action, admin=True)
            logs = response.json()
            for entry in logs if isinstance(logs, list) else []:
                try:
                    at = datetime.fromisoformat(str(entry["startTime"]).replace("Z", "+00:00"))
                except (KeyError, ValueError):
                    continue
                if at.tzinfo is None:
                    at = at.replace(tzinfo=UTC)
                if not start <= at < end:
                    continue
                slot = int(at.timestamp()) // seconds * seconds
                t = totals.setdefault((token, slot), [0, 0, 0.0])
                t[0] += 1
                t[1] += int(entry.get("total_tokens") or 0)
                t[2] += float(entry.get("spend") or 0.0)
        return [UsageBucket(token, datetime.fromtimestamp(slot, UTC), width, int(t[0]),
                            int(t[1]), round(t[2], 6))
                for (token, slot), t in sorted(totals.items())]

    def check_access(self) -> None:
        """List one page of keys: what rotation needs of the master key."""
        self._page(1, "listing keys", size=1)

    def warm_up(self) -> None:
        import httpx  # noqa: F401

    def close(self) -> None:
        self._session.close()

    # -- helpers -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, action: str, *, key: Secret | None = None,
                 params: QueryParams | None = None, json: Any = None) -> httpx.Response:
        return self._session.bearer(method, self.config.base_url + path, action=action,
                                    key=key, params=params, json=json)

    def _gone(self, token: str, action: str) -> bool:
        """Whether the proxy does not know ``token`` (asked with the master key)."""
        response = self._request("GET", "/key/info", action, params={"key": token})
        if response.status_code == 404:
            return True
        if not response.is_success:
            raise self._error(response, action, admin=True)
        return False

    def _page(self, page: int, action: str, size: int = PAGE_SIZE) -> list[dict[str, Any]]:
        response = self._request("GET", "/key/list", action, params={
            "page": str(page), "size": str(size), "return_full_object": "true"})
        if not response.is_success:
            raise self._error(response, action, admin=True)
        keys = _json(response, self.name, action).get("keys")
        if not isinstance(keys, list):
            raise PermanentError(f"{self.name}: {action}: the key listing has no keys array")
        return [k for k in keys if isinstance(k, dict)]

    def _keys(self, action: str) -> Iterator[dict[str, Any]]:
        page = 1
        while True:
            keys = self._page(page, action)
            yield from keys
            if len(keys) < PAGE_SIZE:
                return
            page += 1

    def _error(self, response: httpx.Response, action: str, *, admin: bool) -> RotatorError:
        hint = (f"check that master_key in [providers.{self.name}] refers to the proxy's "
                "master key (or an admin key allowed to manage keys)") if admin else None
        error = status_error(response, who=self.name, action=action, admin_hint=hint,
                             detail=f"({_error_type(response)})" if _error_type(response)
                             else "")
        return error if not isinstance(error, NotFound) else PermanentError(str(error))


def _params(credential: CredentialInfo) -> LiteLLMParams:
    params = credential.params
    return params if isinstance(params, LiteLLMParams) else LiteLLMParams()


def _hashed(value: str) -> str:
    """The proxy's id of a key: the SHA-256 of the key (never the key itself)."""
    return hashlib.sha256(value.encode()).hexdigest()


def _json(response: httpx.Response, who: str, action: str) -> dict[str, Any]:
    return json_object(response, who, action, "the proxy")


def _error_type(response: httpx.Response) -> str:
    """The error's ``type``, if it is a short word (never the message: it may quote a key)."""
    try:
        kind = str((response.json().get("error") or {}).get("type", ""))
    except (ValueError, AttributeError):
        return ""
    return kind if re.fullmatch(r"[a-z_]{1,40}", kind) else ""
