"""Any service with create and revoke endpoints, described in the policy file (``type = "http"``).

Many services (SendGrid, Cloudflare, in-house APIs) manage keys with two or three plain JSON
calls. Rather than a plugin per service, ``[providers.NAME]`` describes the calls: where they go,
what they send (templates), and where the new key's id and value are in the answer. See
``docs/http-provider.md`` for complete examples.

The settings and params models are in :mod:`providers.http.settings`, the template language
(``{vars.NAME}``, ``{secrets.NAME}``, ``{key_name}``...) in :mod:`providers.http.templates`: the
settings model checks every template when the policy file is loaded, and :meth:`check_params`
every credential's ``vars`` against them, so ``rotator check`` reports a misspelt placeholder or
a missing variable with its file and line. This module runs the calls.

Nothing here puts a header value, a rendered template or a response body into a message or a
log line: any of them may hold a secret. ``httpx`` is imported when a call is first made.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import quote

from providers.http.sending import HttpSession, send, status_error
from providers.http.settings import (
    USAGE_WIDTHS,
    Call,
    HttpParams,
    HttpSettings,
    ListCall,
    VerifyCall,
)
from providers.http.templates import (
    MissingVar,
    json_at,
    parse_header,
    render,
    render_json,
    template_placeholders,
)
from rotator.errors import CredentialRejected, PermanentError, RotatorError
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretResolver,
    UsageBucket,
    UsageReport,
    key_name_for,
)
from rotator.plugin_support import params_as

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpParams", "HttpProvider", "HttpSettings", "send", "status_error"]

log = logging.getLogger(__name__)

_SAFE_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


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


class HttpProvider(Provider, UsageReport):
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
        self.usage_widths = self.usage_widths_for(cfg)  # type: ignore[misc]
        self._session: HttpSession[dict[str, Secret]] = HttpSession(
            name, timeout=cfg.timeout,
            headers={"User-Agent": "rotator", "Accept": "application/json"},
            resolve=lambda: {key: self.resolve_secret(ref)
                             for key, ref in self.config.secrets.items()})

    @property
    def config(self) -> HttpSettings:
        return cast(HttpSettings, self.settings)

    @classmethod
    def usage_widths_for(cls, settings: PluginSettings) -> tuple[timedelta, ...]:
        """The widths of ``[usage]`` (none without one: no usage to report)."""
        usage = settings.usage if isinstance(settings, HttpSettings) else None
        return () if usage is None else tuple(timedelta(seconds=USAGE_WIDTHS[w])
                                              for w in usage.widths)

    @classmethod
    def check_params(cls, settings: PluginSettings, params: PluginSettings) -> list[str]:
        """One problem per ``{vars.NAME}`` the calls use that ``params.vars`` lacks: every
        call renders them all, so without one the credential could never be rotated."""
        if not isinstance(settings, HttpSettings) or not isinstance(params, HttpParams):
            return []
        problems = []
        for name, places in settings.vars_used().items():
            if name not in params.vars:
                used_by = " and ".join([", ".join(places[:-1]), places[-1]] if len(places) > 1
                                       else places)
                problems.append(f"missing {{vars.{name}}}, used by the provider's {used_by}: "
                                f'add {name} = "..." under [credentials.params.vars]')
        return problems

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

    def usage(self, key_ids: Sequence[str], start: datetime, end: datetime,
              width: timedelta) -> list[UsageBucket]:
        """The ``[usage]`` call's records summed into buckets of ``width``: once per key when
        the call names ``{key_id}``, else once (records of other keys are left out)."""
        call = self.config.usage
        if call is None or width not in self.usage_widths:
            raise PermanentError(f"{self.name}: [providers.{self.name}.usage] does not report "
                                 f"buckets of {int(width.total_seconds())}s")
        names = {60: "1m", 3600: "1h", 86400: "1d"}
        times = {"start": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "end": end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "start_unix": str(int(start.timestamp())), "end_unix": str(int(end.timestamp())),
                 "start_date": start.astimezone(UTC).strftime("%Y-%m-%d"),
                 "end_date": end.astimezone(UTC).strftime("%Y-%m-%d"),
                 "width": names[int(width.total_seconds())]}
        wanted = set(key_ids)
        rounds = [{"key_id": k} for k in key_ids] if call.per_key() else [{}]
        action = "reading the service's usage records"
        seconds = int(width.total_seconds())
        totals: dict[tuple[str, int], list[float | None]] = {}
        for extra in rounds:
            values = self._values(None, admin=True, **times, **extra)
            response = self._call(call, None, values, action, admin=True)
            if not response.is_success:
                raise self._status_error(response, action, admin=True)
            for record in self._array(response, call.items_path, "usage", action):
                key_id = extra.get("key_id") or _text_at(record, call.key_id_path)
                at = _when(record, call.start_path)
                if key_id not in wanted or at is None or not start <= at < end:
                    continue
                slot = int(at.timestamp()) // seconds * seconds
                t = totals.setdefault((key_id, slot), [None, None, None])
                for i, path in enumerate((call.requests_path, call.tokens_path,
                                          call.cost_path)):
                    figure = 1.0 if path == "" else _number_at(record, path)
                    if figure is not None:
                        t[i] = (t[i] or 0) + figure
        return [UsageBucket(key_id, datetime.fromtimestamp(slot, UTC), width,
                            None if t[0] is None else int(t[0]),
                            None if t[1] is None else int(t[1]), t[2])
                for (key_id, slot), t in sorted(totals.items())]

    def check_access(self) -> None:
        """Resolve every secret, and run the list call's first page if it needs no
        ``{vars.*}`` in its path or query (headers that need them are left out)."""
        self._session.secrets()
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
        self._session.close()

    # -- helpers -------------------------------------------------------------------------------

    def _values(self, credential: CredentialInfo | None, *, admin: bool,
                **fixed: str) -> dict[str, str]:
        values = dict(fixed)
        if credential is not None:
            values.update({f"vars.{k}": v for k, v in _params(credential).vars.items()})
        if admin:
            values.update({f"secrets.{k}": s.reveal()
                           for k, s in self._session.secrets().items()})
        return values

    def _call(self, call: Call, credential: CredentialInfo | None, values: Mapping[str, str],
              action: str, *, admin: bool, page: int | None = None) -> httpx.Response:
        """Render ``call`` and send it with the admin headers, or the verify headers."""
        header_lines = self.config.headers if admin else cast(VerifyCall, call).headers
        headers: dict[str, str] = {}
        missing = ""
        try:
            url = self.config.base_url + render(call.path, values,
                                                lambda v: quote(v, safe=""))
            query = {k: render(v, values) for k, v in call.query.items()}
            body = None if call.body is None else render_json(call.body, values)
            for line in header_lines:
                name, template = parse_header(line)
                try:
                    headers[name] = render(template, values)
                except MissingVar:
                    if credential is not None:
                        raise
        except MissingVar as exc:
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
        # A refused admin call drops the secrets: the admin key may have been rotated.
        return self._session.request(call.method, url, action=action, admin=admin,
                                     headers=headers, params=query, json=body)

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
            items = self._array(response, call.items_path, "list", action)
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

    def _array(self, response: httpx.Response, path: str, call: str, action: str) -> list[Any]:
        """The array at ``path`` of the answer to the ``call`` call, or a clear error."""
        try:
            items = json_at(_json_body(response), path)
        except LookupError:
            items = None
        if not isinstance(items, list):
            raise PermanentError(f"{self.name}: {action}: the {call} answer has no array at "
                                 f'{call}.items_path "{path}"')
        return items

    def _status_error(self, response: httpx.Response, action: str, *, admin: bool,
                      not_found: str | None = None) -> RotatorError:
        hint = (f"check the secrets and headers of [providers.{self.name}] (the admin "
                "credential needs the right to manage keys)") if admin else None
        return status_error(response, who=self.name, action=action, admin_hint=hint,
                            not_found=not_found)


def _when(record: Any, path: str) -> datetime | None:
    """A record's time: RFC 3339 text or Unix seconds."""
    try:
        value = json_at(record, path)
    except LookupError:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return None


def _number_at(record: Any, path: str | None) -> float | None:
    if path is None:
        return None
    try:
        value = json_at(record, path)
    except LookupError:
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _params(credential: CredentialInfo) -> HttpParams:
    return params_as(credential, HttpParams, "http", optional=True)
