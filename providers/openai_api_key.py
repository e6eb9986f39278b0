"""OpenAI project service-account API keys, rotated through the OpenAI Admin API.

Each credential is one service account in one project: ``create`` mints a key for it named
``rotator-<rotation id>``, ``verify`` lists models with the key, ``revoke`` deletes it. The admin
key comes from a reference in the policy file and is resolved only when a call first needs it.

The ``openai`` SDK is imported inside methods, never at module import, so that ``rotator --help``
and ``rotator check`` do not pay for it. The SDK's own retries are off: the engine retries the
:class:`~rotator.errors.TransientError` this module raises, with its own backoff and deadline.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, cast

from pydantic import Field, field_validator

from rotator.errors import (
    CredentialRejected,
    NotFound,
    PermanentError,
    RotatorError,
    TransientError,
)
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
from rotator.plugin_support import (
    FOUND_KEY,
    accepted,
    classify_status,
    params_as,
    remote_message,
    retry_after,
    status_where,
)

if TYPE_CHECKING:
    import openai
    from openai.types.admin.organization.projects.project_api_key import ProjectAPIKey

__all__ = ["OpenAIParams", "OpenAIProvider", "OpenAISettings"]

log = logging.getLogger(__name__)

# Anything shaped like an OpenAI key in a remote error message is cut out before it reaches ours.
LISTING_FRESH_FOR = 5.0
"""Seconds a listing of the project's keys serves ``identify`` (a look-alike key created in
that time would need the same first six and last four random characters)."""
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")
# How OpenAI redacts a key in listings: a prefix, "..." (sometimes with asterisks), a suffix.
_REDACTION_GAP = re.compile(r"(?:\*+|\.{3}|\u2026)+")


class OpenAISettings(PluginSettings):
    """``[providers.NAME]`` for ``type = "openai"``."""

    project_id: str = Field(min_length=1, description="The project whose keys are rotated.")
    admin_key: SecretRef = Field(
        description="Reference to the OpenAI admin key: {vault, path, field}, {env} or {file}."
    )
    base_url: str = "https://api.openai.com/v1"
    timeout: float = Field(default=30, gt=0, description="Seconds per HTTP request.")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                f"base_url must start with https:// or http:// (got {value!r}); "
                "the default is https://api.openai.com/v1"
            )
        return value.rstrip("/")


class OpenAIParams(PluginSettings):
    """``[credentials.params]`` for a credential rotated by an ``openai`` provider."""

    service_account_id: str

    @field_validator("service_account_id")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError(
                "service_account_id is empty: give the id of the project service account that "
                "owns the key (svc_acct_..., shown in the OpenAI dashboard under the project's "
                "service accounts)"
            )
        return value


class OpenAIProvider(Provider, KeyProbe, UsageReport, KeyTerms):
    """Rotates the API keys of one service account per credential, in one OpenAI project.

    Thread-safe: one cached admin client serves every thread; a 401 on an admin call drops it so
    that the next call resolves the admin key again (it may itself have been rotated).
    """

    type_name: ClassVar[str] = "openai"
    settings_model: ClassVar[type[PluginSettings]] = OpenAISettings
    params_model: ClassVar[type[PluginSettings]] = OpenAIParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True
    )
    list_page_size: ClassVar[int] = 100
    """Keys asked for per list request (OpenAI's maximum)."""
    max_key_ttl: ClassVar[timedelta | None] = timedelta(seconds=31_536_000)
    """``expires_in_seconds`` is at most a year."""

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._lock = threading.Lock()
        self._admin: openai.OpenAI | None = None
        self._verify_http: Any = None
        self._listing: tuple[float, list[ProjectAPIKey]] | None = None
        self._listing_lock = threading.Lock()

    @property
    def config(self) -> OpenAISettings:
        return cast(OpenAISettings, self.settings)

    # -- the Provider contract -----------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """Mint a key for the credential's service account, named ``rotator-<rotation_id>``.

        A timeout here may still have created the key: the engine finds it by name with
        :meth:`find_by_rotation` and revokes it.
        """
        return self._create(credential, rotation_id, None)

    def create_with_terms(self, credential: CredentialInfo, rotation_id: str, *,
                          ttl: timedelta | None, budget: Budget | None) -> NewKey:
        """``create`` with ``expires_in_seconds``: OpenAI refuses the key after ``ttl`` (no
        budgets: ``budget_periods`` is empty, so ``rotator check`` never lets one through)."""
        return self._create(credential, rotation_id, ttl)

    def _create(self, credential: CredentialInfo, rotation_id: str,
                ttl: timedelta | None) -> NewKey:
        sa_id = _params(credential).service_account_id
        client = self._admin_client()
        with self._boundary(
            f"creating a key for service account {sa_id}",
            client=client,
            not_found=f"service account {sa_id} not found in project {self.config.project_id}; "
            "check params.service_account_id and project_id",
        ):
            created = client.admin.organization.projects.service_accounts.api_keys.create(
                sa_id, project_id=self.config.project_id, name=key_name_for(rotation_id),
                **({} if ttl is None else {"expires_in_seconds": int(ttl.total_seconds())}),
            )
        if not created.value:
            raise PermanentError(
                f"{self.name}: OpenAI created key {created.id} but returned no value; "
                "revoke it by hand"
            )
        log.info("%s: created key %s for %s", self.name, created.id, credential.name)
        return NewKey(key_id=created.id, secret=Secret(created.value))

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """List models with ``secret`` (one cheap call); 401/403 mean ``CredentialRejected``."""
        import openai

        # Not closed: closing would close the shared transport that other threads use.
        client = openai.OpenAI(
            api_key=secret.reveal(),
            base_url=self.config.base_url,
            timeout=self.config.timeout,
            max_retries=0,
            default_headers=_no_ambient_scope(openai),
            http_client=self._verify_transport(),
        )
        with self._boundary(f"verifying a key of {credential.name}", admin=False):
            client.models.list()

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Delete ``key_id``; a key already gone is success (the project itself must exist)."""
        client = self._admin_client()
        try:
            with self._boundary(f"revoking key {key_id}", client=client):
                client.admin.organization.projects.api_keys.delete(
                    key_id, project_id=self.config.project_id
                )
        except NotFound:
            # A 404 for a wrong project id would otherwise pass for "already revoked".
            self._retrieve_project(client)
            log.info("%s: key %s was already revoked", self.name, key_id)
            return
        log.info("%s: revoked key %s", self.name, key_id)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """Ids of the project's live keys named ``rotator-<rotation_id>``, across all pages."""
        wanted = key_name_for(rotation_id)
        return [key.id for key in self._all_keys() if key.name == wanted]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The id of the one live project key whose redacted value fits ``secret``.

        OpenAI only shows a prefix and a suffix of each key, so two keys can look alike: then
        (or with no match) this returns None rather than guess, because a wrong guess would
        revoke some other agent's key.
        """
        value = secret.reveal()
        matches = [k.id for k in self._recent_keys() if _redaction_fits(k.redacted_value, value)]
        if len(matches) == 1:
            return matches[0]
        log.info(
            "%s: %d project keys look like the current key of %s; not guessing",
            self.name,
            len(matches),
            credential.name,
        )
        return None

    def found_credential(self, secret: Secret, companions: Mapping[str, str]
                         ) -> CredentialInfo | None:
        """Keys are found and revoked project-wide: no params needed."""
        return CredentialInfo(FOUND_KEY, "", None)

    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        """A found key is live when it can list models (the same call as ``verify``)."""
        return accepted(self, secret)

    usage_widths: ClassVar[tuple[timedelta, ...]] = (
        timedelta(minutes=1), timedelta(hours=1), timedelta(days=1))
    usage_key_batch: ClassVar[int] = 100
    """Key ids asked for per usage request (they travel in the query string)."""

    def usage(self, key_ids: Sequence[str], start: datetime, end: datetime,
              width: timedelta) -> list[UsageBucket]:
        """Completions usage of the project's keys, grouped by ``api_key_id``
        (``GET /v1/organization/usage/completions``), every page followed."""
        names = {timedelta(minutes=1): "1m", timedelta(hours=1): "1h", timedelta(days=1): "1d"}
        if width not in names:
            raise PermanentError(f"{self.name}: OpenAI reports usage in 1m, 1h or 1d buckets")
        client = self._admin_client()
        limit = {"1m": 1440, "1h": 168, "1d": 31}[names[width]]
        out: list[UsageBucket] = []
        for i in range(0, len(key_ids), self.usage_key_batch):
            batch = list(key_ids[i:i + self.usage_key_batch])
            page: str | None = None
            while True:
                with self._boundary("reading the project's usage", client=client):
                    answer = client.admin.organization.usage.completions(
                        start_time=int(start.timestamp()), end_time=int(end.timestamp()),
                        bucket_width=names[width],  # type: ignore[arg-type]
                        group_by=["api_key_id"], api_key_ids=batch,
                        project_ids=[self.config.project_id], limit=limit,
                        **({"page": page} if page else {}))
                for bucket in answer.data:
                    begins = datetime.fromtimestamp(bucket.start_time, UTC)
                    for r in bucket.results:
                        key_id = getattr(r, "api_key_id", None)
                        requests = int(getattr(r, "num_model_requests", 0) or 0)
                        if key_id and requests:
                            tokens = int(getattr(r, "input_tokens", 0) or 0) + \
                                int(getattr(r, "output_tokens", 0) or 0)
                            out.append(UsageBucket(key_id, begins, width, requests, tokens))
                page = answer.next_page if answer.has_more else None
                if not page:
                    break
        return out

    def check_access(self) -> None:
        """Read the project and one page of its keys: the calls rotation itself depends on."""
        client = self._admin_client()
        self._retrieve_project(client)
        with self._boundary("listing the project's API keys", client=client):
            client.admin.organization.projects.api_keys.list(
                self.config.project_id, limit=1, owner_project_access="any"
            )

    def warm_up(self) -> None:
        import openai  # noqa: F401

    def close(self) -> None:
        with self._lock:
            client, self._admin = self._admin, None
            transport, self._verify_http = self._verify_http, None
        if client is not None:
            client.close()
        if transport is not None:
            transport.close()

    def _verify_transport(self) -> Any:
        """One HTTP client shared by every ``verify`` call: building a client per call costs
        a TLS context (tens of milliseconds of CPU) each time."""
        with self._lock:
            if self._verify_http is None:
                import openai

                self._verify_http = openai.DefaultHttpxClient(timeout=self.config.timeout)
            return self._verify_http

    # -- helpers -------------------------------------------------------------------------------

    def _admin_client(self) -> openai.OpenAI:
        """The cached admin client, built (and the admin key resolved) on first use."""
        with self._lock:
            if self._admin is None:
                import openai

                admin_key = self.resolve_secret(self.config.admin_key)
                self._admin = openai.OpenAI(
                    api_key="",  # never fall back to OPENAI_API_KEY from the environment
                    admin_api_key=admin_key.reveal(),
                    base_url=self.config.base_url,
                    timeout=self.config.timeout,
                    max_retries=0,
                    default_headers=_no_ambient_scope(openai),
                )
            return self._admin

    def _forget_admin_client(self, client: openai.OpenAI) -> None:
        """Drop ``client`` from the cache; not closed, as another thread may be mid-request."""
        with self._lock:
            if self._admin is client:
                self._admin = None

    def _retrieve_project(self, client: openai.OpenAI) -> None:
        project_id = self.config.project_id
        with self._boundary(
            f"reading project {project_id}",
            client=client,
            not_found=f"project {project_id} not found; check project_id",
        ):
            client.admin.organization.projects.retrieve(project_id)

    def _recent_keys(self) -> list[ProjectAPIKey]:
        """The project's keys as listed at most ``LISTING_FRESH_FOR`` seconds ago, listed once
        for all threads asking together. The usage poll identifies every never-rotated
        credential's key: listing every page of keys for each of 10,000 credentials made the
        poll quadratic in the project's size."""
        with self._listing_lock:
            now = time.monotonic()
            if self._listing is not None and now - self._listing[0] < LISTING_FRESH_FOR:
                return self._listing[1]
            keys = self._all_keys()
            self._listing = (time.monotonic(), keys)
            return keys

    def _all_keys(self) -> list[ProjectAPIKey]:
        client = self._admin_client()
        with self._boundary("listing the project's API keys", client=client):
            # Iterating the first page follows ``last_id`` cursors through every page.
            return list(
                client.admin.organization.projects.api_keys.list(
                    self.config.project_id,
                    limit=self.list_page_size,
                    owner_project_access="any",
                )
            )

    @contextmanager
    def _boundary(
        self,
        action: str,
        *,
        admin: bool = True,
        client: openai.OpenAI | None = None,
        not_found: str | None = None,
    ) -> Iterator[None]:
        """Translate SDK exceptions raised inside into :mod:`rotator.errors`, chained."""
        import openai

        try:
            yield
        except openai.APIStatusError as exc:
            if admin and exc.status_code == 401 and client is not None:
                self._forget_admin_client(client)
            raise self._status_error(exc, action, admin=admin, not_found=not_found) from exc
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            kind = "timed out" if isinstance(exc, openai.APITimeoutError) else "could not connect"
            raise TransientError(
                f"{self.name}: {action}: {kind} to {self.config.base_url}"
            ) from exc
        except openai.OpenAIError as exc:
            raise PermanentError(
                f"{self.name}: {action}: unexpected OpenAI client error ({type(exc).__name__})"
            ) from exc

    def _status_error(
        self,
        exc: openai.APIStatusError,
        action: str,
        *,
        admin: bool,
        not_found: str | None,
    ) -> RotatorError:
        status = exc.status_code
        code = exc.code
        where = status_where(status, code, exc.request_id)
        prefix = f"{self.name}: {action}"
        if status in (401, 403):
            # OpenAI quotes part of the refused key in these messages: never pass them on.
            if not admin:
                return CredentialRejected(f"{prefix}: OpenAI refused the key ({where})")
            return PermanentError(
                f"{prefix}: OpenAI refused the admin key ({where}); check that admin_key in "
                f"[providers.{self.name}] refers to a valid OpenAI admin key with access to "
                f"project {self.config.project_id}"
            )
        detail = f"{where}: {_remote_message(exc)}"
        if status == 429 and code == "insufficient_quota":
            return PermanentError(f"{prefix}: the OpenAI organization is out of quota ({detail})")
        if status == 404:
            return NotFound(f"{prefix}: {not_found or 'not found'} ({detail})")
        return classify_status(status, prefix=prefix, detail=detail, service="OpenAI",
                               wait=_retry_after(exc.response.headers))


def _params(credential: CredentialInfo) -> OpenAIParams:
    return params_as(credential, OpenAIParams, "OpenAI")


def _no_ambient_scope(openai: Any) -> Any:
    """Headers that drop OPENAI_ORG_ID / OPENAI_PROJECT_ID picked up from the environment.

    The daemon must act on the project the policy file names, whatever environment it runs in.
    """
    return {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}


def _redaction_fits(redacted: str, value: str) -> bool:
    """Whether ``value`` could be the key OpenAI shows as ``redacted`` (``sk-abc...wxyz``)."""
    parts = _REDACTION_GAP.split(redacted)
    if len(parts) != 2:
        return False
    head, tail = parts
    return len(value) > len(head) + len(tail) and value.startswith(head) and value.endswith(tail)


def _remote_message(exc: openai.APIStatusError) -> str:
    """OpenAI's own error message, cut short and stripped of anything key-shaped."""
    body = exc.body
    message = body.get("message") if isinstance(body, Mapping) else None
    return remote_message(message, _KEY_LIKE, "sk-[redacted]") or "no message"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    return retry_after(headers, milliseconds=True)
