"""Any service with create and revoke endpoints, described in the policy file (``type = "http"``).

Many services (SendGrid, Cloudflare, in-house APIs) manage keys with two or three plain JSON
calls. Rather than a plugin per service, ``[providers.NAME]`` describes the calls: where they go,
what they send (templates), and where the new key's id and value are in the answer. See
``docs/http-provider.md`` for complete examples.

Templates use ``{placeholders}``: ``{secrets.NAME}`` (a value from ``[providers.NAME.secrets]``,
headers only), ``{vars.NAME}`` (``[credentials.params.vars]``), ``{key_name}`` and
``{rotation_id}`` (create), ``{key_id}`` (revoke) and ``{key}`` (the key itself, verify headers
only, so that no secret is ever part of a URL or body that a proxy or the service might log).
The settings model checks every template when the policy file is loaded, so ``rotator check``
reports a misspelt placeholder with its file and line.

Nothing here puts a header value, a rendered template or a response body into a message or a
log line: any of them may hold a secret. ``httpx`` is imported when a call is first made.
"""

from __future__ import annotations

import difflib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast
from urllib.parse import quote, urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

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
    import httpx

__all__ = ["HttpParams", "HttpProvider", "HttpSettings", "send", "status_error"]

log = logging.getLogger(__name__)

# -- templates -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCOPED = re.compile(r"(vars|secrets)\.([A-Za-z_][A-Za-z0-9_]*)")
_FIXED = ("key", "key_id", "key_name", "rotation_id")
_WHERE_ALLOWED = {
    "key": "verify headers",
    "secrets": "the provider's headers",
    "key_id": "revoke",
    "key_name": "create",
    "rotation_id": "create",
}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CREDENTIAL_HEADER_WORDS = {"authorization", "key", "apikey", "token", "secret", "password",
                            "cookie"}
_JSON_PATH = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
_SAFE_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _MissingVar(Exception):
    """A template used ``{vars.NAME}`` that the credential's params do not define."""


def _shown(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def template_placeholders(template: str) -> list[str]:
    """The placeholders of ``template``; ``ValueError`` for a brace that opens nothing.

    Messages quote the offending placeholder, never the template (it might hold a pasted key).
    """
    found = []
    for match in _TOKEN.finditer(template):
        if match.group(0) in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise ValueError(f'a lone "{match.group(0)}" in a template: placeholders look like '
                             "{vars.NAME}; write {{ or }} for a literal brace")
        found.append(match.group(1))
    return found


def _check_template(template: str, allowed: frozenset[str], secrets: set[str] | None) -> None:
    """Raise ``ValueError`` naming each unknown placeholder and what is allowed here."""
    for name in template_placeholders(template):
        scoped = _SCOPED.fullmatch(name)
        kind = scoped.group(1) if scoped else name
        if kind in allowed and (kind in _FIXED or scoped):
            if kind == "secrets" and secrets is not None and scoped.group(2) not in secrets:
                defined = ", ".join(sorted(secrets)) or "none"
                raise ValueError(f"{{{name}}} names no secret of [providers.NAME.secrets] "
                                 f"(defined: {defined})")
            continue
        if kind in _WHERE_ALLOWED and (kind in _FIXED or scoped):
            raise ValueError(f"{{{name}}} is not allowed here: it may appear only in "
                             f"{_WHERE_ALLOWED[kind]}")
        raise ValueError(f"unknown placeholder {{{_shown(name)}}}{_suggest(name, allowed)}; "
                         f"placeholders here: {_known(allowed)}")


def _known(allowed: frozenset[str]) -> str:
    order = ["secrets", "vars", *_FIXED]
    return ", ".join("{" + (f"{k}.NAME" if k in ("vars", "secrets") else k) + "}"
                     for k in order if k in allowed)


def _suggest(name: str, allowed: frozenset[str]) -> str:
    _, dot, tail = name.partition(".")
    if dot and _IDENT.fullmatch(tail) and "vars" in allowed:
        return f" (did you mean {{vars.{tail}}}?)"
    close = difflib.get_close_matches(name, [k for k in _FIXED if k in allowed], n=1)
    return f" (did you mean {{{close[0]}}}?)" if close else ""


def render(template: str, values: Mapping[str, str],
           encode: Callable[[str], str] | None = None) -> str:
    """``template`` with each placeholder replaced by its value (``encode``d if given)."""
    def substitute(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        name = match.group(1)
        if name not in values:
            raise _MissingVar(name)
        return encode(values[name]) if encode else values[name]

    return _TOKEN.sub(substitute, template)


def _render_json(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return render(node, values)
    if isinstance(node, dict):
        return {render(k, values): _render_json(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_render_json(v, values) for v in node]
    return node


def _json_strings(node: Any, where: str = "body") -> Iterator[tuple[str, str]]:
    """``(where, text)`` for every key and string value of a JSON template."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield f"{where}.{key}", key
            yield from _json_strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _json_strings(value, f"{where}[{index}]")


def json_at(document: Any, path: str) -> Any:
    """The value at dotted ``path`` (``result.id``, ``data.0.id``); ``""`` is the document.
    ``LookupError`` if absent."""
    node = document
    for part in path.split(".") if path else ():
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise LookupError(path)
    return node


def _check_json_path(value: str, what: str, empty_ok: bool = False) -> str:
    if (value == "" and empty_ok) or _JSON_PATH.fullmatch(value):
        return value
    raise ValueError(f'{what} is a dotted path into the JSON answer, like "result.id" or '
                     '"data.0.id"' + (' ("" for the answer itself)' if empty_ok else ""))


# -- settings ------------------------------------------------------------------------------------

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
_Strings = list[str]
_Statuses = list[int]


def _parse_header(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    if not colon or not _HEADER_NAME.fullmatch(name.strip()):
        raise ValueError('each header is one string "Name: value", like '
                         '"Authorization: Bearer {secrets.admin}"')
    return name.strip(), value.strip()


def _check_headers(lines: list[str], allowed: frozenset[str], secrets: set[str] | None,
                   secret_kind: str) -> list[str]:
    """Headers parse, their templates are valid, and a credential-bearing header (by its
    name) takes its value from a placeholder: a literal there is a secret pasted in the file."""
    for line in lines:
        name, value = _parse_header(line)
        _check_template(value, allowed, secrets)
        words = set(re.split(r"[-_]", name.lower()))
        used = {p.partition(".")[0] for p in template_placeholders(value)}
        if words & _CREDENTIAL_HEADER_WORDS and secret_kind not in used:
            hint = ("{secrets.NAME} with the value in [providers.NAME.secrets]"
                    if secret_kind == "secrets" else "{key}")
            raise ValueError(f"header {name} carries a credential, so its value must come from "
                             f"{hint}: secrets never go in the policy file")
    return lines


def _check_statuses(values: list[int]) -> list[int]:
    if not values or any(not 100 <= v <= 599 for v in values):
        raise ValueError("statuses are HTTP status codes between 100 and 599, like [200, 204]")
    return values


class _Call(PluginSettings):
    """One HTTP call: ``method`` and ``path`` (under ``base_url``), ``query`` parameters and a
    JSON ``body``, each a template checked against the placeholders of ``context``."""

    context: ClassVar[frozenset[str]] = frozenset({"vars"})

    method: Method = "GET"
    path: str
    query: dict[str, str] = Field(default_factory=dict)
    body: dict[str, Any] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError('path starts with / and has no query string (put parameters in '
                             'query = { name = "value" }), like "/v3/api_keys/{key_id}"')
        _check_template(value, cls.context, None)
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            _check_template(template, cls.context, None)
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for where, text in _json_strings(value):
            try:
                _check_template(text, cls.context, None)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return value

    def templates(self) -> Iterator[str]:
        yield self.path
        yield from self.query.values()
        yield from (text for _, text in _json_strings(self.body))


class CreateCall(_Call):
    """``[providers.NAME.create]``: makes a key named with ``{key_name}``; any 2xx is success."""

    context = frozenset({"vars", "key_name", "rotation_id"})
    method: Method = "POST"
    id_path: str
    secret_path: str

    @field_validator("id_path", "secret_path")
    @classmethod
    def _paths(cls, value: str, info: ValidationInfo) -> str:
        return _check_json_path(value, str(info.field_name))

    @model_validator(mode="after")
    def _names_the_key(self) -> CreateCall:
        if self.id_path == self.secret_path:
            raise ValueError("id_path and secret_path must differ: the id is stored and logged, "
                             "the secret never is")
        if not any("key_name" in template_placeholders(t) for t in self.templates()):
            raise ValueError("create must name the key with {key_name} (in body, path or "
                             "query), so a key made by an interrupted rotation can be found "
                             "and revoked")
        return self


class RevokeCall(_Call):
    """``[providers.NAME.revoke]``: kills ``{key_id}``. ``gone_statuses`` mean "already gone",
    which is success."""

    context = frozenset({"vars", "key_id"})
    method: Method = "DELETE"
    ok_statuses: _Statuses = Field(default_factory=lambda: [200, 202, 204])
    gone_statuses: _Statuses = Field(default_factory=lambda: [404, 410])

    @field_validator("ok_statuses", "gone_statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        return _check_statuses(value)

    @model_validator(mode="after")
    def _names_the_key(self) -> RevokeCall:
        if not any("key_id" in template_placeholders(t) for t in self.templates()):
            raise ValueError("revoke must name the key with {key_id} (usually in path)")
        if set(self.ok_statuses) & set(self.gone_statuses):
            raise ValueError("a status cannot be in both ok_statuses and gone_statuses")
        return self


class VerifyCall(_Call):
    """``[providers.NAME.verify]``: one cheap call made with the key itself (in ``headers``,
    never the admin headers)."""

    method: Method = "GET"
    headers: _Strings
    ok_statuses: _Statuses = Field(default_factory=lambda: [200, 204])
    rejected_statuses: _Statuses = Field(default_factory=lambda: [401, 403])

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        _check_headers(value, frozenset({"vars", "key"}), None, "key")
        if not any("key" in template_placeholders(_parse_header(h)[1]) for h in value):
            raise ValueError('verify sends the key in a header: add one such as '
                             '"Authorization: Bearer {key}"')
        return value

    @field_validator("ok_statuses", "rejected_statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        return _check_statuses(value)

    @model_validator(mode="after")
    def _disjoint(self) -> VerifyCall:
        if set(self.ok_statuses) & set(self.rejected_statuses):
            raise ValueError("a status cannot be in both ok_statuses and rejected_statuses")
        return self


class ListCall(_Call):
    """``[providers.NAME.list]``: the keys (id and name) that ``find_by_rotation`` searches.
    With ``page_param``, pages ``first_page``, ``first_page + 1``... until one is empty."""

    method: Method = "GET"
    items_path: str = ""
    id_path: str = "id"
    name_path: str = "name"
    page_param: str | None = None
    first_page: int = Field(default=1, ge=0)
    max_pages: int = Field(default=100, ge=1, le=10_000)

    @field_validator("items_path", "id_path", "name_path")
    @classmethod
    def _paths(cls, value: str, info: ValidationInfo) -> str:
        return _check_json_path(value, str(info.field_name), info.field_name == "items_path")


class IdentifyBy(PluginSettings):
    """``[providers.NAME.identify]``: how to learn the id of a key rotator did not create.
    Either the verify answer names the key (``verify_id_path``), or the id is part of the key
    (``id_pattern``, a regular expression whose one group is the id)."""

    verify_id_path: str | None = None
    id_pattern: str | None = None

    @field_validator("verify_id_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else _check_json_path(value, "verify_id_path")

    @field_validator("id_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            groups = re.compile(value).groups
        except re.error as exc:
            raise ValueError(f"id_pattern is not a regular expression: {exc.msg}") from None
        if groups != 1:
            raise ValueError("id_pattern needs exactly one group (...) around the id")
        return value

    @model_validator(mode="after")
    def _one(self) -> IdentifyBy:
        if (self.verify_id_path is None) == (self.id_pattern is None):
            raise ValueError("identify takes verify_id_path or id_pattern, exactly one")
        return self


class HttpSettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "http"``: the service's key calls."""

    base_url: str
    secrets: dict[str, SecretRef] = Field(default_factory=dict)
    """Credentials the daemon itself uses (an admin key), as references: ``{secrets.NAME}``."""
    headers: _Strings = Field(default_factory=list)
    """``"Name: value"`` sent with create, revoke and list (never with verify)."""
    timeout: float = Field(default=30, gt=0, le=600)
    create: CreateCall
    revoke: RevokeCall
    verify: VerifyCall | None = None
    list: ListCall | None = None
    identify: IdentifyBy | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        split = urlsplit(value)
        if split.scheme not in ("http", "https") or not split.netloc or split.query \
                or "@" in split.netloc:
            raise ValueError('base_url is the service\'s http:// or https:// address, like '
                             '"https://api.sendgrid.com" (no user, password or query)')
        return value.rstrip("/")

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: dict[str, SecretRef]) -> dict[str, SecretRef]:
        bad = [name for name in value if not _IDENT.fullmatch(name)]
        if bad:
            raise ValueError(f'secret name "{_shown(bad[0])}" must be letters, digits and _ '
                             "(it is used as {secrets.NAME})")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        defined = info.data.get("secrets")
        return _check_headers(value, frozenset({"vars", "secrets"}),
                              set(defined) if isinstance(defined, dict) else None, "secrets")

    @model_validator(mode="after")
    def _identify_needs_verify(self) -> HttpSettings:
        if self.identify is not None and self.verify is None:
            raise ValueError("identify needs a [verify] call: an adopted key is identified "
                             "only once the service has accepted it")
        return self


class HttpParams(PluginSettings):
    """``[credentials.params]`` for an ``http`` provider: ``vars``, the values of the
    ``{vars.NAME}`` placeholders (a subuser, an account or zone id...)."""

    vars: dict[str, str] = Field(default_factory=dict)

    @field_validator("vars")
    @classmethod
    def _vars(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _IDENT.fullmatch(name):
                raise ValueError(f'vars name "{_shown(name)}" must be letters, digits and _ '
                                 "(it is used as {vars.NAME})")
            if _CONTROL.search(text):
                raise ValueError(f"vars.{name} must not contain control characters (line "
                                 "breaks, tabs, NUL)")
        return value


# -- HTTP helpers (shared with the anthropic provider) -------------------------------------------


def _origin(url: str) -> str:
    split = urlsplit(url)
    return f"{split.scheme}://{split.netloc}"


def send(client: httpx.Client, method: str, url: str, *, who: str, action: str,
         headers: Mapping[str, str], params: Mapping[str, str] | None = None,
         json: Any = None) -> httpx.Response:
    """One request, with transport failures translated into :mod:`rotator.errors`.

    A failure that may quote a header value (an illegal character, an encoding error) is
    raised without its cause, so no secret rides along in the exception chain.
    """
    import httpx

    failure = ""
    try:
        return client.request(method, url, headers=dict(headers), params=params, json=json)
    except httpx.TimeoutException as exc:
        raise TransientError(f"{who}: {action}: timed out talking to {_origin(url)}") from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise TransientError(f"{who}: {action}: could not reach {_origin(url)} "
                             f"({type(exc).__name__})") from exc
    except Exception as exc:
        failure = type(exc).__name__
    raise PermanentError(f"{who}: {action}: the request could not be sent ({failure}); check "
                         "base_url and the values the headers use")


_REQUEST_ID = re.compile(r"[A-Za-z0-9_\-:.]{1,100}")


def status_error(response: httpx.Response, *, who: str, action: str,
                 admin_hint: str | None = None, not_found: str | None = None,
                 detail: str = "") -> RotatorError:
    """The error for an unexpected status: 401/403 blame the admin credential (when
    ``admin_hint`` says how to fix it), 429/5xx/408/409 are transient, 404 is ``NotFound``.
    Never quotes the body: only ``detail``, which the caller has made safe."""
    status = response.status_code
    where = f"HTTP {status}" + (f" {detail}" if detail else "")
    request_id = response.headers.get("request-id") or response.headers.get("x-request-id")
    if request_id and _REQUEST_ID.fullmatch(request_id):
        where += f", request id {request_id}"
    prefix = f"{who}: {action}"
    if status in (401, 403) and admin_hint:
        return PermanentError(f"{prefix}: the service refused the admin credential ({where}); "
                              f"{admin_hint}")
    if status == 429:
        return TransientError(f"{prefix}: rate limited ({where})",
                              retry_after=retry_after(response.headers))
    if status >= 500 or status in (408, 409, 425):
        return TransientError(f"{prefix}: the service is unavailable ({where})",
                              retry_after=retry_after(response.headers))
    if 300 <= status < 400:
        return PermanentError(f"{prefix}: the service redirected ({where}); point base_url at "
                              "the final address")
    if status == 404:
        return NotFound(f"{prefix}: not found ({where})" + (f"; {not_found}" if not_found else ""))
    return PermanentError(f"{prefix}: the service refused the request ({where})")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date)."""
    raw = headers.get("retry-after")
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


def _json_body(response: httpx.Response) -> Any:
    """The decoded body, or None: never an exception that might carry the body."""
    try:
        return response.json()
    except ValueError:
        return None


def _text_at(document: Any, path: str) -> str | None:
    try:
        value = json_at(document, path)
    except LookupError:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None
    return str(value)


# -- the provider --------------------------------------------------------------------------------


class HttpProvider(Provider):
    """Creates, verifies and revokes keys through the calls ``[providers.NAME]`` describes.

    ``capabilities`` is per instance: ``identify`` needs an ``[identify]`` table and
    ``verify_revoked`` a ``[verify]`` call. Thread-safe: one ``httpx.Client`` for every call,
    and the resolved ``secrets``, dropped when the service refuses them.
    """

    type_name: ClassVar[str] = "http"
    settings_model: ClassVar[type[PluginSettings]] = HttpSettings
    params_model: ClassVar[type[PluginSettings]] = HttpParams
    capabilities: ClassVar[Capabilities] = Capabilities(create=True, identify=True,
                                                        verify_revoked=True)

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        cfg = self.config
        self.capabilities = Capabilities(  # type: ignore[misc]
            create=True, identify=cfg.identify is not None, verify_revoked=cfg.verify is not None)
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._secrets: dict[str, Secret] | None = None

    @property
    def config(self) -> HttpSettings:
        return cast(HttpSettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """Run the create call; a timeout may still have made the key, which the engine then
        finds by name with :meth:`find_by_rotation` (if a list call is configured)."""
        name = key_name_for(rotation_id)
        action = f"creating key {name} for {credential.name}"
        values = self._values(credential, admin=True, key_name=name, rotation_id=rotation_id)
        response = self._call(self.config.create, credential, values, action, admin=True)
        if not response.is_success:
            raise self._status_error(
                response, action, admin=True,
                not_found=f"check base_url and create.path in [providers.{self.name}] and the "
                          "vars they use")
        body = _json_body(response)
        key_id = _text_at(body, self.config.create.id_path)
        value = _text_at(body, self.config.create.secret_path)
        if key_id is not None and value is not None and value in key_id:
            key_id = None  # never store or log a secret as an id
        if key_id is None or value is None:
            missing = "id_path" if key_id is None else "secret_path"
            raise PermanentError(
                f"{self.name}: {action}: the answer (HTTP {response.status_code}) has nothing at "
                f"create.{missing}; a key may have been made: find it by its name {name} and "
                "revoke it by hand, then fix the path")
        log.info("%s: created key %s for %s", self.name, key_id, credential.name)
        return NewKey(key_id=key_id, secret=Secret(value))

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """Run the verify call with the key; without one configured there is nothing to ask."""
        if self.config.verify is None:
            log.debug("%s: no verify call configured; %s not checked", self.name, credential.name)
            return
        self._verify(credential, secret)

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Run the revoke call; a ``gone_statuses`` answer is success once a list call (if
        configured) shows the service really is where base_url and the paths say."""
        action = f"revoking key {key_id}"
        values = self._values(credential, admin=True, key_id=key_id)
        response = self._call(self.config.revoke, credential, values, action, admin=True)
        status = response.status_code
        if status in self.config.revoke.ok_statuses:
            log.info("%s: revoked key %s", self.name, key_id)
            return
        if status in self.config.revoke.gone_statuses:
            if self.config.list is not None:
                next(iter(self._pages(credential, f"{action} (HTTP {status}: checking the "
                                                  "service is there)")), None)
            log.info("%s: key %s was already gone (HTTP %d)", self.name, key_id, status)
            return
        raise self._status_error(response, action, admin=True)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """Ids of the listed keys whose name carries ``rotator-<rotation_id>`` as a whole word;
        ``[]`` without a list call (a crash right after create may then orphan a key)."""
        if self.config.list is None:
            return []
        wanted = re.compile(r"(?<![A-Za-z0-9_\-])" + re.escape(key_name_for(rotation_id))
                            + r"(?![A-Za-z0-9_\-])")
        return [key_id for key_id, name in self._listing(credential, "finding keys of rotation "
                                                                     f"{rotation_id}")
                if name is not None and wanted.search(name)]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The key's id from the verify answer or from the key itself, once the service has
        accepted the key and (with a list call) lists that id; otherwise None, never a guess."""
        spec = self.config.identify
        if spec is None or self.config.verify is None:
            return None
        key_id: str | None = None
        if spec.id_pattern is not None:
            match = re.search(spec.id_pattern, secret.reveal())
            if match is None:
                log.info("%s: the key of %s does not fit identify.id_pattern", self.name,
                         credential.name)
                return None
            key_id = match.group(1)
            if not key_id or len(key_id) * 2 > len(secret.reveal()):
                log.warning("%s: identify.id_pattern captures most of the key itself, not an "
                            "id within it; not identified", self.name)
                return None
        try:
            response = self._verify(credential, secret)
        except CredentialRejected:
            log.info("%s: the service refuses the key of %s; not identified", self.name,
                     credential.name)
            return None
        if spec.verify_id_path is not None:
            key_id = _text_at(_json_body(response), spec.verify_id_path)
        if not key_id:
            log.info("%s: the verify answer has no id at identify.verify_id_path", self.name)
            return None
        if self.config.list is not None and key_id not in {
                i for i, _ in self._listing(credential, "identifying a key")}:
            log.info("%s: key %s of %s is not among the keys the list call shows; not "
                     "identified", self.name, key_id, credential.name)
            return None
        return key_id

    def check_access(self) -> None:
        """Resolve every secret, and run the list call's first page if it needs no
        ``{vars.*}`` in its path or query (headers that need them are left out)."""
        self._resolved_secrets()
        call = self.config.list
        if call is None or any(t.startswith("vars.") for tmpl in call.templates()
                               for t in template_placeholders(tmpl)):
            return
        action = "listing keys (check --online)"
        values = self._values(None, admin=True)
        response = self._call(call, None, values, action, admin=True)
        if not response.is_success:
            raise self._status_error(response, action, admin=True)

    def warm_up(self) -> None:
        import httpx  # noqa: F401

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- helpers -------------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(
                    timeout=self.config.timeout, follow_redirects=False,
                    headers={"User-Agent": "rotator", "Accept": "application/json"})
            return self._client

    def _resolved_secrets(self) -> dict[str, Secret]:
        with self._lock:
            cached = self._secrets
        if cached is None:
            cached = {name: self.resolve_secret(ref)
                      for name, ref in self.config.secrets.items()}
            with self._lock:
                self._secrets = cached
        return cached

    def _values(self, credential: CredentialInfo | None, *, admin: bool,
                **fixed: str) -> dict[str, str]:
        values = dict(fixed)
        if credential is not None:
            values.update({f"vars.{k}": v for k, v in _params(credential).vars.items()})
        if admin:
            values.update({f"secrets.{k}": s.reveal()
                           for k, s in self._resolved_secrets().items()})
        return values

    def _call(self, call: _Call, credential: CredentialInfo | None, values: Mapping[str, str],
              action: str, *, admin: bool, page: int | None = None) -> httpx.Response:
        """Render ``call`` and send it with the admin headers, or the verify headers."""
        header_lines = self.config.headers if admin else cast(VerifyCall, call).headers
        headers: dict[str, str] = {}
        missing = ""
        try:
            url = self.config.base_url + render(call.path, values,
                                                lambda v: quote(v, safe=""))
            query = {k: render(v, values) for k, v in call.query.items()}
            body = None if call.body is None else _render_json(call.body, values)
            for line in header_lines:
                name, template = _parse_header(line)
                try:
                    headers[name] = render(template, values)
                except _MissingVar:
                    if credential is not None:
                        raise
        except _MissingVar as exc:
            missing = str(exc)
        if missing:
            raise PermanentError(
                f"{self.name}: {action}: credential {credential.name if credential else '?'} "
                f"has no {missing} in [credentials.params.vars], which [providers.{self.name}] "
                "uses")
        bad = [name for name, value in headers.items() if not _SAFE_HEADER_VALUE.fullmatch(value)]
        if bad:
            raise PermanentError(
                f"{self.name}: {action}: header {bad[0]} would hold a line break or a non-ASCII "
                "character; check the secret or variable it uses")
        if page is not None and isinstance(call, ListCall) and call.page_param:
            query[call.page_param] = str(page)
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        response = send(self._http(), call.method, url, who=self.name, action=action,
                        headers=headers, params=query, json=body)
        if admin and response.status_code in (401, 403):
            with self._lock:
                self._secrets = None  # resolve again next time: the admin key may be rotated
        return response

    def _verify(self, credential: CredentialInfo, secret: Secret) -> httpx.Response:
        call = cast(VerifyCall, self.config.verify)
        action = f"verifying a key of {credential.name}"
        values = self._values(credential, admin=False, key=secret.reveal())
        response = self._call(call, credential, values, action, admin=False)
        if response.status_code in call.ok_statuses:
            return response
        if response.status_code in call.rejected_statuses:
            raise CredentialRejected(f"{self.name}: {action}: the service refused the key "
                                     f"(HTTP {response.status_code})")
        raise self._status_error(response, action, admin=False)

    def _pages(self, credential: CredentialInfo, action: str) -> Iterator[list[Any]]:
        """Each page of the list call's items, until an empty page (or the only page)."""
        call = cast(ListCall, self.config.list)
        values = self._values(credential, admin=True)
        page = call.first_page if call.page_param else None
        previous: list[Any] | None = None
        for _ in range(call.max_pages):
            response = self._call(call, credential, values, action, admin=True, page=page)
            if not response.is_success:
                raise self._status_error(
                    response, action, admin=True,
                    not_found=f"check base_url and list.path in [providers.{self.name}]")
            try:
                items = json_at(_json_body(response), call.items_path)
            except LookupError:
                items = None
            if not isinstance(items, list):
                raise PermanentError(f"{self.name}: {action}: the list answer has no array at "
                                     f'list.items_path "{call.items_path}"')
            if page is None or not items:
                yield items
                return
            if items == previous:
                raise PermanentError(f"{self.name}: {action}: page {page} repeats the page "
                                     f"before it; does the service take list.page_param "
                                     f'"{call.page_param}"?')
            yield items
            previous, page = items, page + 1
        raise PermanentError(f"{self.name}: {action}: more than {call.max_pages} pages of keys; "
                             "raise list.max_pages")

    def _listing(self, credential: CredentialInfo, action: str
                 ) -> Iterator[tuple[str, str | None]]:
        call = cast(ListCall, self.config.list)
        for items in self._pages(credential, action):
            for item in items:
                key_id = _text_at(item, call.id_path)
                if key_id is None:
                    raise PermanentError(f"{self.name}: {action}: a listed key has nothing at "
                                         f'list.id_path "{call.id_path}"')
                yield key_id, _text_at(item, call.name_path)

    def _status_error(self, response: httpx.Response, action: str, *, admin: bool,
                      not_found: str | None = None) -> RotatorError:
        hint = (f"check the secrets and headers of [providers.{self.name}] (the admin "
                "credential needs the right to manage keys)") if admin else None
        return status_error(response, who=self.name, action=action, admin_hint=hint,
                            not_found=not_found)


def _params(credential: CredentialInfo) -> HttpParams:
    params = credential.params
    if isinstance(params, HttpParams):
        return params
    if isinstance(params, Mapping):
        return HttpParams.model_validate(dict(params))
    if type(params) is PluginSettings:  # a credential given no [credentials.params]
        return HttpParams()
    raise PermanentError(f"{credential.name}: params are not http provider params "
                         f"({type(params).__name__})")
