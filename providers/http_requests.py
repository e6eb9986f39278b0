"""One HTTP request with its failures translated into :mod:`rotator.errors`.

Shared by the providers that speak plain JSON over HTTP with ``httpx`` (``http``, ``anthropic``):
transport failures and unexpected statuses become ``TransientError`` (retry later),
``NotFound`` or ``PermanentError`` (fix the configuration), each saying which. Nothing here
quotes a header value or a response body: either may hold a secret. ``httpx`` is imported when
a request is first sent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rotator.errors import NotFound, PermanentError, RotatorError, TransientError

if TYPE_CHECKING:
    import httpx

__all__ = ["retry_after", "send", "status_error"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9_\-:.]{1,100}")


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
