"""One HTTP request with its failures translated into :mod:`rotator.errors`.

Shared by the providers that speak plain JSON over HTTP with ``httpx`` (``http``, ``anthropic``):
transport failures and unexpected statuses become ``TransientError`` (retry later),
``NotFound`` or ``PermanentError`` (fix the configuration), each saying which; an
:class:`HttpSession` holds a provider's client and resolved admin secrets. Nothing here quotes
a header value or a response body: either may hold a secret. ``httpx`` is imported when a
request is first sent.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import urlsplit

from rotator.errors import PermanentError, RotatorError, TransientError
from rotator.plugin_support import classify_status, retry_after, status_where

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpSession", "QueryParams", "api_base_url", "json_object", "retry_after", "send",
           "status_error"]

QueryParams = Mapping[str, str] | Sequence[tuple[str, str]]
"""A query string: a mapping, or pairs where a name repeats (``api_key_ids[]=a&...=b``)."""

T = TypeVar("T")

_REQUEST_ID = re.compile(r"[A-Za-z0-9_\-:.]{1,100}")


def _origin(url: str) -> str:
    split = urlsplit(url)
    return f"{split.scheme}://{split.netloc}"


_BASE_URL = re.compile(r"https?://[^/\s@?#]+(/[^\s?#]*)?$")


def api_base_url(value: str, default: str) -> str:
    """A provider's ``base_url`` setting: http(s), no user, query or fragment; without a
    trailing slash. ``ValueError`` names ``default`` as the example."""
    if not _BASE_URL.match(value):
        raise ValueError("base_url must be an http:// or https:// address without a user, "
                         f"query or fragment (the default is {default})")
    return value.rstrip("/")


def json_object(response: httpx.Response, who: str, action: str, service: str) -> dict[str, Any]:
    """The answer's JSON object; ``PermanentError`` (never quoting the body) otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise PermanentError(f"{who}: {action}: {service} answered HTTP "
                             f"{response.status_code} without a JSON object; check base_url")
    return body


def send(client: httpx.Client, method: str, url: str, *, who: str, action: str,
         headers: Mapping[str, str], params: QueryParams | None = None,
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


def status_error(response: httpx.Response, *, who: str, action: str,
                 admin_hint: str | None = None, not_found: str | None = None,
                 detail: str = "") -> RotatorError:
    """The error for an unexpected status: 401/403 blame the admin credential (when
    ``admin_hint`` says how to fix it), 429/5xx/408/409 are transient, 404 is ``NotFound``.
    Never quotes the body: only ``detail``, which the caller has made safe."""
    status = response.status_code
    request_id = response.headers.get("request-id") or response.headers.get("x-request-id")
    where = status_where(status, detail,
                         request_id if request_id and _REQUEST_ID.fullmatch(request_id) else None)
    prefix = f"{who}: {action}"
    if status in (401, 403) and admin_hint:
        return PermanentError(f"{prefix}: the service refused the admin credential ({where}); "
                              f"{admin_hint}")
    if 300 <= status < 400:
        return PermanentError(f"{prefix}: the service redirected ({where}); point base_url at "
                              "the final address")
    return classify_status(status, prefix=prefix, detail=where, service="the service",
                           wait=retry_after(response.headers), not_found=not_found,
                           transient=(408, 409, 425))


class HttpSession(Generic[T]):
    """One provider instance's ``httpx.Client`` and its resolved admin secret(s) ``T``.

    The client is made on first use (importing ``httpx`` only then). The secrets are resolved
    on first use, outside the lock (resolving may be a vault round trip), and dropped when an
    admin request is refused with 401/403, so that the next call resolves them again: an admin
    key may itself have been rotated. Thread-safe: one client serves every thread.
    """

    def __init__(self, who: str, *, timeout: float, headers: Mapping[str, str],
                 resolve: Callable[[], T]) -> None:
        self.who = who
        self._timeout = timeout
        self._headers = dict(headers)
        self._resolve = resolve
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._secrets: T | None = None

    def secrets(self) -> T:
        """The admin secret(s), resolved on first use and after a refusal."""
        with self._lock:
            cached = self._secrets
        if cached is None:
            cached = self._resolve()
            with self._lock:
                self._secrets = cached
        return cached

    def request(self, method: str, url: str, *, action: str, admin: bool,
                headers: Mapping[str, str], params: QueryParams | None = None,
                json: Any = None) -> httpx.Response:
        """:func:`send` with this session's client; an ``admin`` request refused with 401/403
        drops the secrets."""
        response = send(self._http(), method, url, who=self.who, action=action,
                        headers=headers, params=params, json=json)
        if admin and response.status_code in (401, 403):
            with self._lock:
                self._secrets = None
        return response

    def bearer(self, method: str, url: str, *, action: str, key: Any = None,
               params: QueryParams | None = None, json: Any = None) -> httpx.Response:
        """``request`` with ``Authorization: Bearer``: the admin secret (an admin request),
        or ``key`` (a ``Secret``) when given."""
        credential = self.secrets() if key is None else key
        headers = {"Authorization": f"Bearer {credential.reveal()}",
                   "Accept": "application/json"}
        return self.request(method, url, action=action, admin=key is None, headers=headers,
                            params=params, json=json)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(timeout=self._timeout, follow_redirects=False,
                                            headers=self._headers)
            return self._client
