"""What the bundled plugins do alike at their boundary, written once.

Providers and vaults each translate their own service's answers, and keep their own messages
(they name the place to fix); the pieces below are the parts that mean the same for every one
of them: reading a credential's ``params``, quoting a remote message without leaking a key,
reading ``Retry-After``, sorting an unexpected HTTP status into retry-later or fix-the-config,
and comparing secret values in constant time.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Collection, Mapping
from email.utils import parsedate_to_datetime
from typing import TypeVar

from rotator import redaction
from rotator.errors import (
    CredentialRejected,
    NotFound,
    PermanentError,
    RateLimited,
    RotatorError,
    TransientError,
)
from rotator.interfaces import CredentialInfo, PluginSettings, Provider, Secret

__all__ = [
    "MAX_REMOTE_MESSAGE",
    "classify_status",
    "params_as",
    "remote_message",
    "retry_after",
    "same_text",
    "shorten",
    "status_where",
]

MAX_REMOTE_MESSAGE = 200
"""Characters of a remote service's own message quoted in ours, at the most."""

P = TypeVar("P", bound=PluginSettings)


def params_as(credential: CredentialInfo, model: type[P], provider: str, *,
              optional: bool = False) -> P:
    """The credential's params as ``model``, validated again if given raw.

    ``optional``: every field of ``model`` has a default, so a credential given no
    ``[credentials.params]`` (a bare :class:`PluginSettings`) gets the defaults. ``provider``
    names the provider type in the error for anything else.
    """
    params = credential.params
    if isinstance(params, model):
        return params
    if isinstance(params, Mapping):
        return model.model_validate(dict(params))
    if optional and type(params) is PluginSettings:
        return model()
    raise PermanentError(
        f"{credential.name}: params are not {provider} provider params ({type(params).__name__})")


def shorten(text: str) -> str:
    """``text`` cut to :data:`MAX_REMOTE_MESSAGE` characters (marked with ``...``)."""
    return text if len(text) <= MAX_REMOTE_MESSAGE else text[:MAX_REMOTE_MESSAGE] + "..."


def remote_message(message: object, key_like: re.Pattern[str], mask: str) -> str:
    """A service's own error message, safe to quote: remembered secrets scrubbed, anything
    matching ``key_like`` (the service's key formats) replaced by ``mask``, cut short.
    "" when ``message`` is not a non-empty string."""
    if not isinstance(message, str) or not message:
        return ""
    return shorten(key_like.sub(mask, redaction.scrub(message)))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header ``name`` (lower case), whatever its case in ``headers``."""
    return next((v for k, v in headers.items() if str(k).lower() == name), None)


def retry_after(headers: Mapping[str, str], *, milliseconds: bool = False) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date), whatever the header's
    case; None when absent or unreadable. With ``milliseconds``, ``retry-after-ms`` (which
    OpenAI sends) is read first."""
    if milliseconds:
        raw_ms = _header(headers, "retry-after-ms")
        if raw_ms:
            try:
                return max(0.0, float(raw_ms) / 1000)
            except ValueError:
                pass
    raw = _header(headers, "retry-after")
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


def status_where(status: int, detail: str | None = None, request_id: str | None = None) -> str:
    """``HTTP 429 rate_limit, request id req_1``: how a status error names the answer."""
    where = f"HTTP {status}" + (f" {detail}" if detail else "")
    return where + (f", request id {request_id}" if request_id else "")


def classify_status(status: int, *, prefix: str, detail: str, service: str,
                    wait: float | None, not_found: str | None = None,
                    transient: Collection[int] = (408, 409),
                    rate_limited: bool = False) -> RotatorError:
    """The error for an unexpected HTTP status that says nothing about a credential.

    429 (or ``rate_limited``) is :class:`RateLimited`, 5xx and ``transient`` are
    :class:`TransientError`, each with ``wait`` as its ``retry_after``: a retry can fix them.
    404 is :class:`NotFound` (``not_found`` says what to check); anything else a
    :class:`PermanentError`. ``service`` names the remote in the message (``"Stripe"``,
    ``"the service"``); ``detail`` must already be safe to quote.
    """
    if status == 429 or rate_limited:
        return RateLimited(f"{prefix}: rate limited ({detail})", retry_after=wait)
    if status >= 500 or status in transient:
        return TransientError(f"{prefix}: {service} is unavailable ({detail})", retry_after=wait)
    if status == 404:
        return NotFound(f"{prefix}: not found ({detail})" + (f"; {not_found}" if not_found else ""))
    return PermanentError(f"{prefix}: {service} refused the request ({detail})")


def same_text(a: str, b: str) -> bool:
    """Whether two secret values are equal, compared in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


FOUND_KEY = "a key found by rotator scan"
"""The credential name a found key is checked under (it belongs to no credential yet)."""


def accepted(provider: Provider, secret: Secret, params: object = None,
             key_id: str | None = None) -> bool:
    """``KeyProbe.probe`` for a provider whose ``verify`` judges the key by itself: True when
    the service accepts it, False when it refuses it; other errors propagate."""
    try:
        provider.verify(CredentialInfo(FOUND_KEY, "", params), secret, key_id=key_id)
    except CredentialRejected:
        return False
    return True

