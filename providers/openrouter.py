"""OpenRouter API keys, rotated with a management key (``type = "openrouter"``).

OpenRouter's management API creates a key with ``POST /api/v1/keys`` (a ``name``, and the terms
rotator gives every key it makes: a spending ``limit`` in USD with its ``limit_reset`` period,
and an ``expires_at``), lists, reads and deletes keys by their ``hash`` (the key id rotator
stores). A key reads itself with ``GET /api/v1/key``: that is ``verify``. Each key reports what
it spent (``usage_daily`` and friends), which is the usage report: one bucket per key for the
current UTC day, in USD.

An agent's keys are told apart by name: rotator names each key ``rotator-<rotation id>``; an
adopted key is identified by its ``label`` (``sk-or-v1-abc...123``), counted only when exactly
one key fits and the key works. Nothing secret reaches a message or a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import quote

from pydantic import Field, field_validator

from providers.http.sending import (
    HttpSession,
    QueryParams,
    api_base_url,
    json_object,
    status_error,
)
from rotator.errors import CredentialRejected, PermanentError, RotatorError
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

__all__ = ["OpenRouterProvider", "OpenRouterSettings"]

log = logging.getLogger("rotator.providers.openrouter")

_RESETS = {"day": "daily", "week": "weekly", "month": "monthly"}
PAGE_SIZE = 100
"""Keys OpenRouter lists per page (``offset`` moves on)."""


class OpenRouterSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "openrouter"``."""

    management_key: SecretRef = Field(
        description="Reference to an OpenRouter management key: {vault, path, field}, {env} "
                    "or {file}. It can create and delete keys, never call models.")
    base_url: str = "https://openrouter.ai/api/v1"
    timeout: float = Field(default=30, gt=0, le=600, description="Seconds per HTTP request.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return api_base_url(value, "https://openrouter.ai/api/v1")


class OpenRouterParams(PluginSettings):
    """``[credentials.params]`` for an ``openrouter`` credential: nothing is needed (keys
    are told apart by name), ``name_prefix`` only labels keys in the dashboard."""

    name_prefix: str | None = Field(default=None, max_length=60)


class OpenRouterProvider(Provider, KeyProbe, UsageReport, KeyTerms):
    """Creates, verifies and deletes OpenRouter keys; reports each key's daily spend.

    Thread-safe: one ``httpx.Client`` serves every thread; the management key is resolved on
    first use and again after OpenRouter refuses it.
    """

    type_name: ClassVar[str] = "openrouter"
    settings_model: ClassVar[type[PluginSettings]] = OpenRouterSettings
    params_model: ClassVar[type[PluginSettings]] = OpenRouterParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True)
    expires: ClassVar[bool] = True
    budget_periods: ClassVar[tuple[str | None, ...]] = (None, "day", "week", "month")
    usage_widths: ClassVar[tuple[timedelta, ...]] = (timedelta(days=1),)

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._session = HttpSession(name, timeout=self.config.timeout,
                                    headers={"User-Agent": "rotator"},
                                    resolve=lambda: self.resolve_secret(
                                        self.config.management_key))

    @property
    def config(self) -> OpenRouterSettings:
        return cast(OpenRouterSettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """A key named ``rotator-<rotation_id>``; a timeout may have made it anyway, which the
        engine finds by name with :meth:`find_by_rotation`."""
        return self.create_with_terms(credential, rotation_id, ttl=None, budget=None)

    def create_with_terms(self, credential: CredentialInfo, rotation_id: str, *,
                          ttl: timedelta | None, budget: Budget | None) -> NewKey:
        """``create`` with ``limit``/``limit_reset`` from ``budget`` and ``expires_at`` from
        ``ttl``: OpenRouter refuses the key's calls past either."""
        body: dict[str, Any] = {"name": self._name(credential, rotation_id)}
        if budget is not None:
            body["limit"] = budget.usd
            body["limit_reset"] = _RESETS[budget.per] if budget.per else None
        if ttl is not None:
            expires = datetime.now(UTC) + ttl
            body["expires_at"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        action = f"creating a key for {credential.name}"
        response = self._request("POST", "/keys", action, json=body)
        if not response.is_success:
            raise self._error(response, action, admin=True)
        answer = _json(response, self.name, action)
        data, value = answer.get("data") or {}, answer.get("key")
        if not isinstance(value, str) or not isinstance(data.get("hash"), str):
            raise PermanentError(f"{self.name}: {action}: OpenRouter answered without the key "
                                 "or its hash; check for a key named "
                                 f"{body['name']} in the dashboard and delete it")
        log.info("%s: created key %s for %s", self.name, data["hash"], credential.name)
        return NewKey(key_id=data["hash"], secret=Secret(value))

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """The key reads itself (``GET /key``); 401/403 mean ``CredentialRejected``."""
        self._current(secret, f"verifying a key of {credential.name}")

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Delete the key; one already gone is success (once the management key is known to
        work, so a 404 cannot hide a wrong base_url)."""
        action = f"revoking key {key_id}"
        response = self._request("DELETE", f"/keys/{quote(key_id, safe='')}", action)
        if response.status_code == 404:
            self._page(0, action)
            log.info("%s: key %s does not exist; nothing to revoke", self.name, key_id)
            return
        if not response.is_success:
            raise self._error(response, action, admin=True)
        log.warning("%s: key %s of %s deleted", self.name, key_id, credential.name)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        name = self._name(credential, rotation_id)
        return [k["hash"] for k in self._keys(f"finding the keys of rotation {rotation_id}")
                if k.get("name") == name]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The hash of the one listed key whose ``label`` is the key's own (as the key reads
        it of itself); None when none or several fit."""
        action = f"identifying the key of {credential.name}"
        try:
            label = self._current(secret, action).get("label")
        except CredentialRejected:
            return None
        fits = [k for k in self._keys(action) if label and k.get("label") == label]
        if len(fits) != 1:
            log.info("%s: %d keys fit the key of %s; not guessing", self.name, len(fits),
                     credential.name)
            return None
        return str(fits[0]["hash"])

    def found_credential(self, secret: Secret, companions: Mapping[str, str]
                         ) -> CredentialInfo | None:
        return CredentialInfo(FOUND_KEY, "", OpenRouterParams())

    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        return accepted(self, secret)

    def usage(self, key_ids: Sequence[str], start: datetime, end: datetime,
              width: timedelta) -> list[UsageBucket]:
        """Each key's spend today (UTC), from the key listing's ``usage_daily``: OpenRouter
        keeps no history per bucket, so earlier days are what rotator stored as they ended."""
        if width != timedelta(days=1):
            raise PermanentError(f"{self.name}: OpenRouter reports usage per day only")
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if not start <= today < end:
            return []
        wanted = set(key_ids)
        out = []
        for key in self._keys("reading the keys' usage", include_disabled=True):
            spent = key.get("usage_daily")
            if key.get("hash") in wanted and isinstance(spent, int | float) and spent > 0:
                out.append(UsageBucket(key["hash"], today, width, None, None, float(spent)))
        return out

    def check_access(self) -> None:
        """List one page of keys: what rotation needs of the management key."""
        self._page(0, "listing API keys")

    def warm_up(self) -> None:
        import httpx  # noqa: F401

    def close(self) -> None:
        self._session.close()

    # -- helpers -------------------------------------------------------------------------------

    def _name(self, credential: CredentialInfo, rotation_id: str) -> str:
        prefix = cast(OpenRouterParams, credential.params).name_prefix \
            if isinstance(credential.params, OpenRouterParams) else None
        return f"{prefix}-{key_name_for(rotation_id)}" if prefix else key_name_for(rotation_id)

    def _request(self, method: str, path: str, action: str, *, key: Secret | None = None,
                 params: QueryParams | None = None, json: Any = None) -> httpx.Response:
        return self._session.bearer(method, self.config.base_url + path, action=action,
                                    key=key, params=params, json=json)

    def _current(self, secret: Secret, action: str) -> dict[str, Any]:
        response = self._request("GET", "/key", action, key=secret)
        if response.status_code in (401, 403):
            raise CredentialRejected(f"{self.name}: {action}: OpenRouter refused the key "
                                     f"(HTTP {response.status_code})")
        if not response.is_success:
            raise self._error(response, action, admin=False)
        return cast(dict[str, Any], _json(response, self.name, action).get("data") or {})

    def _page(self, offset: int, action: str, include_disabled: bool = False
              ) -> list[dict[str, Any]]:
        params = {"offset": str(offset)}
        if include_disabled:
            params["include_disabled"] = "true"
        response = self._request("GET", "/keys", action, params=params)
        if not response.is_success:
            raise self._error(response, action, admin=True)
        data = _json(response, self.name, action).get("data")
        if not isinstance(data, list):
            raise PermanentError(f"{self.name}: {action}: the key listing has no data array")
        return [k for k in data if isinstance(k, dict)]

    def _keys(self, action: str, include_disabled: bool = False) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self._page(offset, action, include_disabled)
            yield from page
            if len(page) < PAGE_SIZE:
                return
            offset += len(page)

    def _error(self, response: httpx.Response, action: str, *, admin: bool) -> RotatorError:
        hint = (f"check that management_key in [providers.{self.name}] refers to a valid "
                "OpenRouter management key") if admin else None
        message = _error_message(response)
        return status_error(response, who=self.name, action=action, admin_hint=hint,
                            detail=f"({message})" if message else "")


def _json(response: httpx.Response, who: str, action: str) -> dict[str, Any]:
    return json_object(response, who, action, "OpenRouter")


def _error_message(response: httpx.Response) -> str:
    """OpenRouter's error message, if short and free of anything key-like."""
    try:
        error = response.json().get("error") or {}
        message = str(error.get("message", ""))[:200]
    except (ValueError, AttributeError):
        return ""
    return "" if "sk-" in message else message
