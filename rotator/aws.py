"""AWS helpers shared by the aws-iam provider and the aws-secretsmanager vault.

One botocore session for every client (with the SDK's retries off: the engine retries), the
region and endpoint setting types, the warm-up, and the mapping of AWS's error codes onto
:mod:`rotator.errors`: which codes a retry can fix, which blame the credentials, which a missing
permission. Both plugins translate at their own boundary with these, so the same AWS answer
means the same thing to both.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, model_validator

from rotator import redaction
from rotator.errors import PermanentError, RateLimited, RotatorError, TransientError
from rotator.interfaces import PluginSettings, SecretRef
from rotator.plugin_support import shorten

if TYPE_CHECKING:
    from botocore.config import Config

__all__ = [
    "AUTH_CODES",
    "DENIED_CODES",
    "SERVER_CODES",
    "THROTTLE_CODES",
    "AwsCredentialRefs",
    "AwsEndpoint",
    "AwsRegion",
    "aws_detail",
    "boto_config",
    "check_endpoint",
    "check_region",
    "error_code",
    "http_status",
    "is_throttled",
    "is_transient",
    "make_client",
    "quiet_sdk_loggers",
    "transient",
    "transport_error",
    "warm_up_clients",
]

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
_session_lock = threading.Lock()
_botocore_session: Any = None
_XML_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,1000})</Message>")

THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "SlowDown", "PriorRequestNotComplete", "ProvisionedThroughputExceededException",
})
"""Error codes AWS uses to say "too fast, retry later"."""
SERVER_CODES = frozenset({
    "InternalFailure", "InternalServiceError", "InternalError", "ServiceFailure",
    "ServiceUnavailable", "ServiceUnavailableException", "RequestTimeout",
    "RequestTimeoutException", "ConcurrentModification", "ConcurrentModificationException",
    "EntityTemporarilyUnmodifiable", "IDPCommunicationError",
})
"""Error codes of failures on AWS's side, or races a retry resolves."""
AUTH_CODES = frozenset({
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
    "InvalidSignatureException", "IncompleteSignature", "ExpiredToken", "ExpiredTokenException",
    "InvalidToken", "AuthFailure", "MissingAuthenticationToken",
})
"""Error codes of credentials AWS does not accept at all (wrong, deleted or expired key)."""
DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})
"""Error codes of valid credentials that lack a permission."""


def check_region(value: str) -> str:
    """``value`` if it looks like an AWS region name, else a ValueError saying what to write."""
    value = value.strip()
    if not _REGION.match(value):
        raise ValueError(
            f"{value!r} is not an AWS region name (examples: us-east-1, eu-west-2, "
            "ap-southeast-1)")
    return value


def check_endpoint(value: str | None) -> str | None:
    """An optional endpoint URL (moto, a VPC endpoint, a FIPS endpoint), without a trailing /."""
    if value is None:
        return None
    if not value.startswith(("https://", "http://")):
        raise ValueError(f"endpoint_url must start with https:// or http:// (got {value!r})")
    return value.rstrip("/")


AwsRegion = Annotated[str, AfterValidator(check_region)]
"""A region setting, checked by :func:`check_region`."""
AwsEndpoint = Annotated[str | None, AfterValidator(check_endpoint)]
"""An optional endpoint setting, checked by :func:`check_endpoint`."""


def boto_config(timeout: float) -> Config:
    """Client settings: no SDK retries (the engine retries ``TransientError`` with its own
    backoff and deadline, and checks its lease before each attempt: a retry inside botocore
    would be neither bounded by that deadline nor fenced), and bounded timeouts.

    ``total_max_attempts`` counts the first attempt; botocore's ``max_attempts`` does not (1
    there means one retry after a throttle or a 5xx).
    """
    from botocore.config import Config

    return Config(retries={"total_max_attempts": 1, "mode": "standard"},
                  connect_timeout=timeout, read_timeout=timeout, user_agent_extra="rotator")


def make_client(service: str, *, region: str, endpoint_url: str | None, timeout: float,
                credentials: Mapping[str, str] | None = None) -> Any:
    """A botocore client for ``service``.

    Every plugin instance shares one botocore session, so the service models are loaded once
    (a fresh session costs ~80 ms per client), and clients are made under a lock: making
    clients from one session is not thread-safe, using them is. ``credentials`` holds
    ``aws_access_key_id``/``aws_secret_access_key``/``aws_session_token``; without them the
    default chain applies (environment, ~/.aws, an instance or pod role).
    """
    global _botocore_session
    import botocore.session

    with _session_lock:
        if _botocore_session is None:
            quiet_sdk_loggers()
            _botocore_session = botocore.session.get_session()
        return _botocore_session.create_client(
            service, region_name=region, endpoint_url=endpoint_url,
            config=boto_config(timeout), **dict(credentials or {}))


def warm_up_clients(region: str, *services: str) -> None:
    """Build (never call) a client of each service: imports botocore's lazy parts and loads
    the service models, so that the first real call does not pay for them."""
    import botocore.exceptions  # noqa: F401

    for service in services:
        make_client(service, region=region, endpoint_url=None, timeout=1,
                    credentials={"aws_access_key_id": "warm-up",
                                 "aws_secret_access_key": "warm-up"}).close()


def quiet_sdk_loggers() -> None:
    """botocore logs request and response bodies at DEBUG, which is where secret values
    travel: keep its loggers at WARNING whatever the root logger's level."""
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def _error(exc: BaseException) -> tuple[str, str]:
    """``(code, message)`` of a botocore ``ClientError`` (empty for anything else).

    An error body botocore could not parse (moto answers a JSON-protocol service's auth
    failures in XML) leaves the HTTP status as the code and the XML as the message: the code
    and message are then read from the XML.
    """
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return "", ""
    error = response.get("Error") or {}
    code, message = str(error.get("Code") or ""), str(error.get("Message") or "")
    if (not code or code.isdigit()) and "<Code>" in message:
        inner = _XML_CODE.search(message)
        text = _XML_MESSAGE.search(message)
        code = inner.group(1) if inner else code
        message = text.group(1) if text else ""
    return code, message


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` ("" for anything else)."""
    return _error(exc)[0]


def http_status(exc: BaseException) -> int:
    """The HTTP status of a botocore ``ClientError`` (0 for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        return int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return 0


def is_transient(exc: BaseException) -> bool:
    """Whether AWS's answer says "too fast" or "not now": a retry may succeed."""
    code, status = error_code(exc), http_status(exc)
    return code in THROTTLE_CODES or code in SERVER_CODES or status == 429 or status >= 500


def is_throttled(exc: BaseException) -> bool:
    """Whether AWS refused the call for its rate limit (the pacer then slows every call to
    that service down, see ``rotator.pacing``)."""
    return error_code(exc) in THROTTLE_CODES or http_status(exc) == 429


def transient(exc: BaseException, message: str) -> TransientError:
    """``message`` as the error for a transient AWS answer: ``RateLimited`` for a throttle."""
    return RateLimited(message) if is_throttled(exc) else TransientError(message)


def aws_detail(exc: BaseException) -> str:
    """Error code, AWS's message (shortened, scrubbed of remembered secrets) and request id."""
    response = getattr(exc, "response", None) or {}
    code, message = _error(exc)
    code = code or type(exc).__name__
    message = shorten(redaction.scrub(" ".join(message.split())))
    request_id = (response.get("ResponseMetadata") or {}).get("RequestId")
    parts = [code] + ([message] if message else [])
    text = ": ".join(parts)
    return f"{text} (request id {request_id})" if request_id else text


def transport_error(exc: BaseException, where: str, what: str) -> RotatorError | None:
    """The rotator error for a botocore failure that is not an answer from AWS (no network,
    no credentials, a bad parameter), or None for a ``ClientError``."""
    import botocore.exceptions as be

    if isinstance(exc, be.ClientError):
        return None
    if isinstance(exc, be.SSLError):
        return PermanentError(f"{where}: TLS verification failed while {what}")
    if isinstance(exc, be.ConnectionError | be.HTTPClientError):
        return TransientError(f"{where}: could not reach AWS while {what} "
                              f"({type(exc).__name__})")
    if isinstance(exc, be.NoCredentialsError | be.PartialCredentialsError):
        return PermanentError(
            f"{where}: no AWS credentials while {what}: set access_key_id and "
            "secret_access_key, or give the daemon credentials the default way (environment, "
            "~/.aws, an instance or pod role)")
    if isinstance(exc, be.NoRegionError):
        return PermanentError(f"{where}: no AWS region while {what}: set region")
    if isinstance(exc, be.ParamValidationError):
        # Its text can quote parameter values, secrets included: say only what failed.
        return PermanentError(f"{where}: botocore refused the parameters of {what}")
    if isinstance(exc, be.BotoCoreError):
        return PermanentError(f"{where}: {what} failed ({type(exc).__name__})")
    return None


class AwsCredentialRefs(PluginSettings):
    """Optional explicit credentials; without them boto3's default chain is used."""

    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None

    @model_validator(mode="after")
    def _pairs(self) -> AwsCredentialRefs:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "set both access_key_id and secret_access_key, or neither (then the default "
                "AWS credential chain is used: environment, ~/.aws, instance or pod role)")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self

    def boto_credentials(self, resolve: Callable[[SecretRef, str], str]) -> dict[str, str]:
        """The ``credentials`` for :func:`make_client`: each reference given, resolved with
        ``resolve(ref, setting name)``; empty for the default chain."""
        creds: dict[str, str] = {}
        for setting, arg in (("access_key_id", "aws_access_key_id"),
                             ("secret_access_key", "aws_secret_access_key"),
                             ("session_token", "aws_session_token")):
            ref: SecretRef | None = getattr(self, setting)
            if ref is not None:
                creds[arg] = resolve(ref, setting)
        return creds
