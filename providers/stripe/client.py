"""The connection to one Stripe account: the SDK's clients and the error boundary.

Shared by the stripe provider's two kinds of credential (:mod:`providers.stripe.webhooks`,
:mod:`providers.stripe.api_keys`). The SDK is imported inside methods, its own retries are off
(the engine retries the :class:`~rotator.errors.TransientError` raised here), and its DEBUG log
records, which carry whole response bodies (signing secrets, test-mode tokens), are dropped.
Stripe's messages are passed on only cut short and stripped of anything key-shaped.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from providers.stripe.settings import StripeSettings
from rotator.errors import CredentialRejected, PermanentError, RotatorError, TransientError
from rotator.interfaces import SecretResolver
from rotator.plugin_support import classify_status, remote_message, retry_after, status_where

if TYPE_CHECKING:
    import stripe

__all__ = ["StripeAccount", "quiet_sdk_debug_logs", "retry_after"]

_KEY_LIKE = re.compile(r"(?:sk|rk|pk|whsec)_[A-Za-z0-9_*.]{4,}")


class StripeAccount:
    """The admin client and the HTTP client of one ``[providers.NAME]``, and the translation
    of the SDK's exceptions into :mod:`rotator.errors`.

    Thread-safe: one cached admin client and one HTTP client (a ``requests`` session per
    thread) serve every thread; a 401 on an admin call drops the admin client so that the next
    call resolves ``api_key`` again (it may itself have been rotated).
    """

    def __init__(self, name: str, settings: StripeSettings,
                 resolve_secret: SecretResolver) -> None:
        self.name = name
        self.config = settings
        self.resolve_secret = resolve_secret
        self._lock = threading.Lock()
        self._admin: stripe.StripeClient | None = None
        self._http: Any = None

    def close(self) -> None:
        with self._lock:
            self._admin = None
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def v2(self, method: str, path: str, *, action: str, **params: Any) -> dict[str, Any]:
        """One ``/v2`` request with the admin key (JSON), its answer as a dict."""
        client = self.admin_client()
        if self.config.api_version:
            params["stripe_version"] = self.config.api_version
        with self.boundary(action, client=client):
            response = client.raw_request(method, path, **params)
        data = getattr(response, "data", None)
        if not isinstance(data, dict):
            raise TransientError(f"{self.name}: {action}: Stripe's answer is not a JSON object")
        return data

    def http_client(self) -> Any:
        with self._lock:
            return self._http_locked()

    def _http_locked(self) -> Any:
        if self._http is None:
            import stripe

            quiet_sdk_debug_logs()
            self._http = stripe.RequestsClient(timeout=self.config.timeout)
        return self._http

    def admin_client(self) -> stripe.StripeClient:
        """The cached admin client, built (and ``api_key`` resolved) on first use."""
        with self._lock:
            if self._admin is None:
                import stripe

                http = self._http_locked()
                admin_key = self.resolve_secret(self.config.api_key)
                self._admin = stripe.StripeClient(
                    admin_key.reveal(),
                    stripe_context=self.config.stripe_context,
                    base_addresses={"api": self.config.api_base},
                    max_network_retries=0,
                    http_client=http,
                )
            return self._admin

    def _forget_admin_client(self, client: stripe.StripeClient) -> None:
        with self._lock:
            if self._admin is client:
                self._admin = None

    @contextmanager
    def boundary(
        self, action: str, *, admin: bool = True, client: stripe.StripeClient | None = None
    ) -> Iterator[None]:
        """Translate SDK exceptions raised inside into :mod:`rotator.errors`, chained."""
        import stripe

        try:
            yield
        except stripe.APIConnectionError as exc:
            raise TransientError(
                f"{self.name}: {action}: could not reach Stripe at {self.config.api_base} "
                f"({type(exc.__cause__ or exc).__name__})"
            ) from exc
        except stripe.StripeError as exc:
            status = exc.http_status
            if status is None or status < 400:
                # An answer the SDK could not parse: its message quotes the body, which may
                # hold a secret, so it is not chained.
                raise TransientError(
                    f"{self.name}: {action}: Stripe sent an answer that could not be read "
                    f"(HTTP {status})"
                ) from None
            if admin and status == 401 and client is not None:
                self._forget_admin_client(client)
            raise self._status_error(exc, status, action, admin=admin) from exc

    def _status_error(
        self, exc: stripe.StripeError, status: int, action: str, *, admin: bool
    ) -> RotatorError:
        import stripe

        where = status_where(status, exc.code, exc.request_id)
        prefix = f"{self.name}: {action}"
        if status in (401, 403):
            # Stripe quotes part of the refused key in these messages: never pass them on.
            if not admin:
                return CredentialRejected(f"{prefix}: Stripe refused the key ({where})")
            if status == 401:
                return PermanentError(
                    f"{prefix}: Stripe refused the provider's key ({where}); check that api_key "
                    f"in [providers.{self.name}] refers to a live Stripe secret key"
                )
            return PermanentError(
                f"{prefix}: the provider's key may not do this ({where}); webhook endpoints "
                "need a secret key or a restricted key with webhook write access, API keys a "
                f"key allowed to manage API keys (see stripe_context in [providers.{self.name}])"
            )
        return classify_status(status, prefix=prefix, detail=f"{where}: {_remote_message(exc)}",
                               service="Stripe", wait=retry_after(exc.headers or {}),
                               rate_limited=isinstance(exc, stripe.RateLimitError))


class _NoSdkDebug(logging.Filter):
    """Drops the SDK's DEBUG records: they hold whole request and response bodies."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO


_SDK_FILTER = _NoSdkDebug()


def quiet_sdk_debug_logs() -> None:
    """Keep response bodies (signing secrets, test-mode tokens) out of every log.

    The SDK logs them at DEBUG through the ``stripe`` logger, and prints them to stderr when
    ``STRIPE_LOG=debug``; the first is filtered, the second lowered to ``info``.
    """
    import stripe

    logger = logging.getLogger("stripe")
    if _SDK_FILTER not in logger.filters:
        logger.addFilter(_SDK_FILTER)
    if getattr(stripe, "log", None) == "debug":
        stripe.log = "info"
    util = getattr(stripe, "_util", None)
    if util is not None and getattr(util, "STRIPE_LOG", None) == "debug":
        util.STRIPE_LOG = "info"


def _remote_message(exc: stripe.StripeError) -> str:
    """Stripe's own error message, cut short and stripped of anything key-shaped."""
    body = exc.json_body
    error = body.get("error") if isinstance(body, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    return remote_message(message, _KEY_LIKE, "[redacted]") or "no message"
