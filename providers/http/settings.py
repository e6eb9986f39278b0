"""The policy-file models of the ``http`` provider: ``[providers.NAME]`` and the params.

``[providers.NAME]`` describes the service's calls (where they go, what they send, where the new
key's id and value are in the answer); every template in it is checked when the policy file is
loaded (:mod:`providers.http.templates`), so ``rotator check`` reports a misspelt placeholder
with its file and line. See ``docs/http-provider.md`` for complete examples.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from providers.http.templates import (
    IDENT,
    check_json_path,
    check_template,
    json_strings,
    parse_header,
    shown,
    template_placeholders,
    vars_used,
)
from rotator.interfaces import PluginSettings, SecretRef

__all__ = [
    "Call",
    "CreateCall",
    "HttpParams",
    "HttpSettings",
    "IdentifyBy",
    "ListCall",
    "Method",
    "RevokeCall",
    "UsageCall",
    "VerifyCall",
]

_CREDENTIAL_HEADER_WORDS = {"authorization", "key", "apikey", "token", "secret", "password",
                            "cookie"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
_Strings = list[str]
_Statuses = list[int]


def _check_headers(lines: list[str], allowed: frozenset[str], secrets: set[str] | None,
                   secret_kind: str) -> list[str]:
    """Headers parse, their templates are valid, and a credential-bearing header (by its
    name) takes its value from a placeholder: a literal there is a secret pasted in the file."""
    for line in lines:
        name, value = parse_header(line)
        check_template(value, allowed, secrets)
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


class Call(PluginSettings):
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
        check_template(value, cls.context, None)
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: dict[str, str]) -> dict[str, str]:
        for template in value.values():
            check_template(template, cls.context, None)
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for where, text in json_strings(value):
            try:
                check_template(text, cls.context, None)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return value

    def templates(self) -> Iterator[str]:
        yield from (template for _, template in self.placed_templates())

    def placed_templates(self) -> Iterator[tuple[str, str]]:
        """``(key, template)`` for each template of the call, keyed as in the policy file."""
        yield "path", self.path
        for name, template in self.query.items():
            yield f"query.{name}", template
        yield from json_strings(self.body)


class CreateCall(Call):
    """``[providers.NAME.create]``: makes a key named with ``{key_name}``; any 2xx is success."""

    context = frozenset({"vars", "key_name", "rotation_id"})
    method: Method = "POST"
    id_path: str
    secret_path: str

    @field_validator("id_path", "secret_path")
    @classmethod
    def _paths(cls, value: str, info: ValidationInfo) -> str:
        return check_json_path(value, str(info.field_name))

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


class RevokeCall(Call):
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


class VerifyCall(Call):
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
        if not any("key" in template_placeholders(parse_header(h)[1]) for h in value):
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

    def placed_templates(self) -> Iterator[tuple[str, str]]:
        yield from super().placed_templates()
        for line in self.headers:
            yield "headers", parse_header(line)[1]


class ListCall(Call):
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
        return check_json_path(value, str(info.field_name), info.field_name == "items_path")


USAGE_WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}


class UsageCall(Call):
    """``[providers.NAME.usage]``: the service's usage records, for misuse monitoring and
    ``rotator usage``. The answer holds an array (``items_path``) of records, each naming its
    key (``key_id_path``), when (``start_path``: RFC 3339 or Unix seconds) and what it counted
    (``requests_path``, ``tokens_path``, ``cost_path``: any of the three); records are summed
    into buckets of the widths asked; ``requests_path = ""`` counts each record as one request.
    With ``{key_id}`` in the call it is made once per key, else once for all keys (it names
    no ``{vars}``: it serves every credential of the provider). Placeholders: ``{start}``/
    ``{end}`` (RFC 3339), ``{start_unix}``/``{end_unix}``, ``{start_date}``/``{end_date}``
    (YYYY-MM-DD, UTC) and ``{width}``."""

    context = frozenset({"key_id", "start", "end", "start_unix", "end_unix",
                         "start_date", "end_date", "width"})
    method: Method = "GET"
    items_path: str = ""
    key_id_path: str = "key_id"
    start_path: str = "start"
    requests_path: str | None = None
    tokens_path: str | None = None
    cost_path: str | None = None
    widths: list[Literal["1m", "1h", "1d"]] = Field(default_factory=lambda: ["1h"])
    """Bucket widths the records can fill (the finest the service's records allow)."""

    @field_validator("items_path", "key_id_path", "start_path", "requests_path",
                     "tokens_path", "cost_path")
    @classmethod
    def _paths(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        return check_json_path(value, str(info.field_name),
                               info.field_name in ("items_path", "requests_path"))

    @field_validator("widths")
    @classmethod
    def _widths(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('widths names at least one of "1m", "1h", "1d"')
        return sorted(set(value), key=USAGE_WIDTHS.__getitem__)

    @model_validator(mode="after")
    def _counts_something(self) -> UsageCall:
        if self.requests_path is None and self.tokens_path is None and self.cost_path is None:
            raise ValueError("usage needs requests_path, tokens_path or cost_path: what each "
                             "record counts")
        return self

    def per_key(self) -> bool:
        return any("key_id" in template_placeholders(t) for t in self.templates())


class IdentifyBy(PluginSettings):
    """``[providers.NAME.identify]``: how to learn the id of a key rotator did not create.
    Either the verify answer names the key (``verify_id_path``), or the id is part of the key
    (``id_pattern``, a regular expression whose one group is the id)."""

    verify_id_path: str | None = None
    id_pattern: str | None = None

    @field_validator("verify_id_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else check_json_path(value, "verify_id_path")

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
    usage: UsageCall | None = None

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
        bad = [name for name in value if not IDENT.fullmatch(name)]
        if bad:
            raise ValueError(f'secret name "{shown(bad[0])}" must be letters, digits and _ '
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

    def vars_used(self) -> dict[str, list[str]]:
        """Each ``{vars.NAME}`` the calls use, with the keys that use it (``headers``,
        ``create.path``...): every call renders them, so a credential needs all of them."""
        places: dict[str, list[str]] = {}
        for where, template in self._placed_templates():
            for name in vars_used(template):
                found = places.setdefault(name, [])
                if where not in found:
                    found.append(where)
        return places

    def _placed_templates(self) -> Iterator[tuple[str, str]]:
        for line in self.headers:
            yield "headers", parse_header(line)[1]
        calls = {"create": self.create, "revoke": self.revoke, "verify": self.verify,
                 "list": self.list, "usage": self.usage}
        for call_name, call in calls.items():
            if call is not None:
                for where, template in call.placed_templates():
                    yield f"{call_name}.{where}", template


class HttpParams(PluginSettings):
    """``[credentials.params]`` for an ``http`` provider: ``vars``, the values of the
    ``{vars.NAME}`` placeholders (a subuser, an account or zone id...)."""

    vars: dict[str, str] = Field(default_factory=dict)

    @field_validator("vars")
    @classmethod
    def _vars(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not IDENT.fullmatch(name):
                raise ValueError(f'vars name "{shown(name)}" must be letters, digits and _ '
                                 "(it is used as {vars.NAME})")
            if _CONTROL.search(text):
                raise ValueError(f"vars.{name} must not contain control characters (line "
                                 "breaks, tabs, NUL)")
        return value
