"""Anthropic API keys, for emergency revocation only (``type = "anthropic"``).

Anthropic's API cannot create keys (only the console can), so rotator cannot rotate them on a
schedule: a credential using this provider must say ``manual_only = true``, and what rotator
does for it is ``rotator rotate-now NAME --revoke-first``, which sets the key's status to
``inactive`` through the Admin API (``POST /v1/organizations/api_keys/{id}``) the moment a key is
known to be abused. An operator then makes a new key in the console and writes it to the vault.

The key to kill is the one in the vault. Its id comes from the vault's metadata, or from
``params.key_id``, or by matching the key against the ``partial_key_hint`` the Admin API lists
(``sk-ant-api03-R2D...igAA``); a match counts only when exactly one active key fits and the key
really works, because a wrong guess would kill another agent's key.

Calls go through ``httpx`` with the admin key in ``x-api-key`` and the ``anthropic-version``
header, translated into :mod:`rotator.errors` by the helpers of :mod:`providers.http.sending`.
No key (the admin key, the key checked) ever reaches a message or a log line.
"""

from __future__ import annotations

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
from rotator.errors import (
    CredentialRejected,
    PermanentError,
    RotatorError,
    UnsupportedOperation,
)
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    KeyProbe,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretRef,
    SecretResolver,
    UsageBucket,
    UsageReport,
)
from rotator.plugin_support import FOUND_KEY, accepted, params_as, remote_message

if TYPE_CHECKING:
    import httpx

__all__ = ["AnthropicParams", "AnthropicProvider", "AnthropicSettings"]

log = logging.getLogger(__name__)

_DEAD = ("inactive", "archived", "expired")
_HINT_GAP = re.compile(r"(?:\.{3}|\u2026|\*{3,})")
_KEY_LIKE = re.compile(r"sk-ant-[A-Za-z0-9_\-*.]+")
_ERROR_TYPE = re.compile(r"[a-z_]{1,40}")


class AnthropicSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "anthropic"``."""

    admin_key: SecretRef = Field(
        description="Reference to an Anthropic Admin API key (sk-ant-admin01-...): "
                    "{vault, path, field}, {env} or {file}.")
    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    timeout: float = Field(default=30, gt=0, le=600, description="Seconds per HTTP request.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return api_base_url(value, "https://api.anthropic.com")


class AnthropicParams(PluginSettings):
    """``[credentials.params]`` for an ``anthropic`` credential; both optional.

    ``key_id`` pins the key (``apikey_01...``, shown in the console); ``workspace_id``
    (``wrkspc_01...``) limits matching, and revocation, to one workspace.
    """

    key_id: str | None = None
    workspace_id: str | None = None

    @field_validator("key_id")
    @classmethod
    def _key_id(cls, value: str | None) -> str | None:
        return _prefixed(value, "apikey_", "key_id", "an API key id like apikey_01Rj2N8SVvo6...")

    @field_validator("workspace_id")
    @classmethod
    def _workspace_id(cls, value: str | None) -> str | None:
        return _prefixed(value, "wrkspc_", "workspace_id",
                         "a workspace id like wrkspc_01JwQvzr7rXL...")


def _prefixed(value: str | None, prefix: str, what: str, example: str) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value.startswith(prefix) or not re.fullmatch(r"[A-Za-z0-9_]+", value):
        raise ValueError(f"{what} must be {example} (or leave it out)")
    return value


class AnthropicProvider(Provider, KeyProbe, UsageReport):
    """Revokes (sets ``inactive``) Anthropic API keys; cannot create them.

    Thread-safe: one ``httpx.Client`` serves every thread; the admin key is resolved on first
    use and again after the Admin API refuses it (it may itself have been rotated).
    """

    type_name: ClassVar[str] = "anthropic"
    settings_model: ClassVar[type[PluginSettings]] = AnthropicSettings
    params_model: ClassVar[type[PluginSettings]] = AnthropicParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=False, identify=True, verify_revoked=True)
    list_page_size: ClassVar[int] = 100
    """Keys asked for per list request (Anthropic allows up to 1000)."""

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._session = HttpSession(name, timeout=self.config.timeout,
                                    headers={"User-Agent": "rotator"},
                                    resolve=lambda: self.resolve_secret(self.config.admin_key))

    @property
    def config(self) -> AnthropicSettings:
        return cast(AnthropicSettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        raise UnsupportedOperation(
            f"{self.name}: Anthropic's API cannot create keys, so {credential.name} cannot be "
            "rotated: make a new key in the Anthropic console and write it to the vault; rotator "
            "can only kill the old one, with rotator rotate-now --revoke-first (the credential "
            "needs manual_only = true)")

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """Always empty: rotator never creates Anthropic keys."""
        return []

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """List models with the key (one cheap call); 401/403 mean ``CredentialRejected``."""
        action = f"verifying a key of {credential.name}"
        response = self._request("GET", "/v1/models", action, key=secret, params={"limit": "1"})
        if response.is_success:
            return
        if response.status_code in (401, 403):
            # Never pass Anthropic's message on: an API may quote part of a refused key.
            raise CredentialRejected(f"{self.name}: {action}: Anthropic refused the key "
                                     f"(HTTP {response.status_code} {_error_type(response)})")
        raise self._error(response, action, admin=False)

    def found_credential(self, secret: Secret, companions: Mapping[str, str]
                         ) -> CredentialInfo | None:
        """Keys are found and revoked project-wide: no params needed."""
        return CredentialInfo(FOUND_KEY, "", AnthropicParams())

    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        """A found key is live when it can list models (the same call as ``verify``)."""
        return accepted(self, secret)

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Set ``key_id`` inactive. A key already inactive, archived, expired or unknown is
        success (after checking the admin key can read the organization's keys)."""
        action = f"revoking key {key_id}"
        key = self._get_key(key_id, action)
        if key is None:
            self._first_page(action)  # a 404 must not hide a wrong base_url or admin key
            log.info("%s: key %s does not exist; nothing to revoke", self.name, key_id)
            return
        self._same_workspace(credential, key, action)
        if key.get("status") in _DEAD:
            log.info("%s: key %s is already %s", self.name, key_id, key.get("status"))
            return
        response = self._request("POST", f"/v1/organizations/api_keys/{_segment(key_id)}",
                                 action, json={"status": "inactive"})
        if not response.is_success:
            again = self._get_key(key_id, action) if response.status_code == 400 else None
            if again is not None and again.get("status") in _DEAD:  # archived meanwhile
                return
            raise self._error(response, action, admin=True)
        log.warning("%s: key %s of %s set inactive", self.name, key_id, credential.name)

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The id of the one active key whose ``partial_key_hint`` fits ``secret`` (within
        ``params.workspace_id``, or only ``params.key_id``), once ``verify`` accepts the key;
        None otherwise."""
        params = _params(credential)
        action = f"identifying the key of {credential.name}"
        if params.key_id is not None:
            pinned = self._get_key(params.key_id, action)
            candidates = [pinned] if pinned is not None else []
        else:
            candidates = list(self._keys(action, workspace_id=params.workspace_id))
        value = secret.reveal()
        fits = [k for k in candidates
                if k.get("status") == "active"
                and (params.workspace_id is None or k.get("workspace_id") == params.workspace_id)
                and _hint_fits(k.get("partial_key_hint"), value)]
        if len(fits) != 1:
            log.info("%s: %d active keys fit the key of %s; not guessing", self.name, len(fits),
                     credential.name)
            return None
        try:
            self.verify(credential, secret)
        except CredentialRejected:
            log.info("%s: Anthropic refuses the key of %s; not identified", self.name,
                     credential.name)
            return None
        return str(fits[0]["id"])

    usage_widths: ClassVar[tuple[timedelta, ...]] = (
        timedelta(minutes=1), timedelta(hours=1), timedelta(days=1))
    usage_key_batch: ClassVar[int] = 100
    """Key ids asked for per usage request (they travel in the query string)."""

    def usage(self, key_ids: Sequence[str], start: datetime, end: datetime,
              width: timedelta) -> list[UsageBucket]:
        """Messages usage grouped by ``api_key_id`` (``GET /v1/organizations/usage_report/
        messages``), every page followed. The report counts tokens, not requests, so each
        bucket's ``requests`` is None and ``tokens`` is input (uncached, cache reads and
        writes) plus output."""
        names = {timedelta(minutes=1): ("1m", 1440), timedelta(hours=1): ("1h", 168),
                 timedelta(days=1): ("1d", 31)}
        if width not in names:
            raise PermanentError(f"{self.name}: Anthropic reports usage in 1m, 1h or 1d buckets")
        name, limit = names[width]
        action = "reading the organization's usage report"
        # The report returns buckets that *end* before ending_at: round up, so the bucket
        # still filling (the one misuse shows in first) is included.
        seconds = int(width.total_seconds())
        end = datetime.fromtimestamp(-(-int(end.timestamp()) // seconds) * seconds, UTC)
        out: list[UsageBucket] = []
        for i in range(0, len(key_ids), self.usage_key_batch):
            query: list[tuple[str, str]] = [
                ("starting_at", _rfc3339(start)), ("ending_at", _rfc3339(end)),
                ("bucket_width", name), ("limit", str(limit)), ("group_by[]", "api_key_id"),
                *(("api_key_ids[]", k) for k in key_ids[i:i + self.usage_key_batch])]
            page: str | None = None
            while True:
                response = self._request(
                    "GET", "/v1/organizations/usage_report/messages", action,
                    params=query + ([("page", page)] if page else []))
                if not response.is_success:
                    raise self._error(response, action, admin=True)
                answer = _json(response, self.name, action)
                for bucket in answer.get("data") or []:
                    begins = datetime.fromisoformat(
                        str(bucket["starting_at"]).replace("Z", "+00:00"))
                    for r in bucket.get("results") or []:
                        tokens = _tokens(r)
                        if r.get("api_key_id") and tokens:
                            out.append(UsageBucket(r["api_key_id"], begins, width, None, tokens))
                page = answer.get("next_page") if answer.get("has_more") else None
                if not page:
                    break
        return out

    def check_access(self) -> None:
        """Read one key of the organization: what revocation needs of the admin key."""
        self._first_page("listing API keys")

    def warm_up(self) -> None:
        import httpx  # noqa: F401

    def close(self) -> None:
        self._session.close()

    # -- helpers -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, action: str, *, key: Secret | None = None,
                 params: QueryParams | None = None, json: Any = None) -> httpx.Response:
        """Send with ``key``, or with the admin key (dropped from the cache if refused)."""
        credential = self._session.secrets() if key is None else key
        headers = {"x-api-key": credential.reveal(),
                   "anthropic-version": self.config.anthropic_version,
                   "accept": "application/json"}
        return self._session.request(method, self.config.base_url + path, action=action,
                                     admin=key is None, headers=headers, params=params, json=json)

    def _get_key(self, key_id: str, action: str) -> dict[str, Any] | None:
        response = self._request("GET", f"/v1/organizations/api_keys/{_segment(key_id)}", action)
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise self._error(response, action, admin=True)
        return cast(dict[str, Any], _json(response, self.name, action))

    def _keys(self, action: str, workspace_id: str | None) -> Iterator[dict[str, Any]]:
        """Every active key (of ``workspace_id``), following ``after_id`` through all pages."""
        query = {"limit": str(self.list_page_size), "status": "active"}
        if workspace_id is not None:
            query["workspace_id"] = workspace_id
        while True:
            response = self._request("GET", "/v1/organizations/api_keys", action, params=query)
            if not response.is_success:
                raise self._error(response, action, admin=True)
            page = _json(response, self.name, action)
            data = page.get("data")
            if not isinstance(data, list):
                raise PermanentError(f"{self.name}: {action}: the key listing has no data array")
            yield from (k for k in data if isinstance(k, dict))
            last = page.get("last_id")
            if not page.get("has_more") or not data or not isinstance(last, str):
                return
            query["after_id"] = last

    def _first_page(self, action: str) -> None:
        response = self._request("GET", "/v1/organizations/api_keys", action,
                                 params={"limit": "1"})
        if not response.is_success:
            raise self._error(response, action, admin=True)

    def _same_workspace(self, credential: CredentialInfo, key: Mapping[str, Any],
                        action: str) -> None:
        wanted = _params(credential).workspace_id
        if wanted is not None and key.get("workspace_id") != wanted:
            raise PermanentError(
                f"{self.name}: {action}: the key belongs to workspace {key.get('workspace_id')}, "
                f"not {wanted} (params.workspace_id of {credential.name}); not revoking it")

    def _error(self, response: httpx.Response, action: str, *, admin: bool) -> RotatorError:
        kind = _error_type(response)
        detail = kind
        if response.status_code not in (401, 403):
            message = _error_message(response)
            detail = f"{kind}: {message}" if kind and message else kind or message
        hint = (f"check that admin_key in [providers.{self.name}] refers to a valid Anthropic "
                "Admin API key (sk-ant-admin01-...)") if admin else None
        return status_error(response, who=self.name, action=action, admin_hint=hint,
                            detail=f"({detail})" if detail else "")


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tokens(result: Mapping[str, Any]) -> int:
    """Input (uncached, cache reads, cache writes of either lifetime) plus output tokens."""
    cache = result.get("cache_creation") or {}
    parts = (result.get("uncached_input_tokens"), result.get("cache_read_input_tokens"),
             result.get("output_tokens"), cache.get("ephemeral_1h_input_tokens"),
             cache.get("ephemeral_5m_input_tokens"))
    return sum(int(p) for p in parts if isinstance(p, int))


def _params(credential: CredentialInfo) -> AnthropicParams:
    return params_as(credential, AnthropicParams, "anthropic", optional=True)


def _segment(key_id: str) -> str:
    from urllib.parse import quote

    return quote(key_id, safe="")


def _hint_fits(hint: Any, value: str) -> bool:
    """Whether ``value`` could be the key shown as ``hint`` (``sk-ant-api03-R2D...igAA``)."""
    if not isinstance(hint, str):
        return False
    parts = _HINT_GAP.split(hint)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return False
    head, tail = parts
    return len(value) > len(head) + len(tail) and value.startswith(head) and value.endswith(tail)


def _json(response: httpx.Response, who: str, action: str) -> dict[str, Any]:
    return json_object(response, who, action, "Anthropic")


def _error_body(response: httpx.Response) -> Mapping[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _error_type(response: httpx.Response) -> str:
    kind = _error_body(response).get("type")
    return kind if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind) else ""


def _error_message(response: httpx.Response) -> str:
    """Anthropic's message, cut short and stripped of anything key-shaped."""
    return remote_message(_error_body(response).get("message"), _KEY_LIKE, "sk-ant-[redacted]")
