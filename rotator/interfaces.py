"""The public plugin contract: providers create/verify/revoke keys, vaults hold them.

The engine knows nothing about any service beyond these classes. A plugin translates its SDK's
exceptions into :mod:`rotator.errors` at its boundary (``TransientError`` for what a retry can
fix, ``PermanentError``/``CredentialRejected`` for what it cannot), and never puts a secret value
in an exception, a log line or a return value other than the :class:`Secret` wrapper.
"""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from rotator import redaction
from rotator.secret_ref import SecretRef

__all__ = [
    "BUDGET_PERIODS",
    "Budget",
    "Capabilities",
    "CredentialInfo",
    "KeyProbe",
    "KeyTerms",
    "NewKey",
    "PluginSettings",
    "Provider",
    "Secret",
    "SecretRef",
    "SecretResolver",
    "StagedCopy",
    "StagingInventory",
    "UsageBucket",
    "UsageReport",
    "Vault",
    "VaultValue",
    "WriteAccessCheck",
    "key_name_for",
]


class Secret:
    """A secret value that cannot leak through ``repr``, ``str``, formatting or pickling.

    Call :meth:`reveal` at the single place the raw value goes over the wire. Every value wrapped
    is remembered by :mod:`rotator.redaction` so the log filter can scrub it as a second line of
    defence.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise TypeError("Secret needs a non-empty str")
        self._value = value
        redaction.remember(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class PluginSettings(BaseModel):
    """Base for a plugin's settings model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class CredentialInfo:
    """What a provider may know about the credential it acts on: never the schedule or state."""

    name: str
    agent: str
    params: Any
    """The provider's own ``params_model`` instance, validated by ``rotator check``."""


@dataclass(frozen=True)
class NewKey:
    """A key just created at the provider. ``key_id`` is safe to store; ``secret`` is not."""

    key_id: str
    secret: Secret


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do; the engine and ``rotator check`` refuse what it cannot."""

    create: bool = True
    """False for a provider whose API cannot make keys (emergency revocation only)."""
    identify: bool = True
    """True when ``identify`` can find the id of a key rotator did not create."""
    verify_revoked: bool = True
    """True when ``verify`` on a revoked key reliably raises ``CredentialRejected``."""
    in_place: bool = False
    """True when the service holds one key per credential, so making a new one kills the old
    (a PostgreSQL role's password). The engine then calls ``generate`` (no side effect), stages
    the key in the vault, and only then ``apply``; rollback re-``apply``s the old key."""


SecretResolver = Callable[[Any], Secret]
"""Turns a secret reference from the policy file (vault/env/file) into a :class:`Secret`."""


def key_name_for(rotation_id: str) -> str:
    """The name or description a provider gives a key, so a crashed rotation's key can be found."""
    return f"rotator-{rotation_id}"


class Provider(ABC):
    """Creates, verifies and revokes keys for one service.

    Subclasses set ``type_name`` (the ``type`` in the policy file, and the entry point name),
    ``settings_model`` (the ``[providers.NAME]`` table less ``type``) and ``params_model``
    (``[credentials.params]``). Every method but ``create`` may be called again after a crash
    with the same arguments and must then have the same effect as one call; ``create`` cannot
    be (a second call makes a second key), which is why it names the key with the rotation id:
    the engine finds the extra keys with ``find_by_rotation`` and revokes them.
    """

    type_name: ClassVar[str] = ""
    settings_model: ClassVar[type[PluginSettings]] = PluginSettings
    params_model: ClassVar[type[PluginSettings]] = PluginSettings
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        self.name = name
        self.settings = settings
        self.resolve_secret = resolve_secret

    @classmethod
    def check_params(cls, settings: PluginSettings, params: PluginSettings) -> list[str]:
        """Problems of a credential's ``params`` that only the provider's settings reveal.

        ``rotator check`` calls it offline, once ``settings`` (a ``settings_model``) and
        ``params`` (a ``params_model``) have each validated, and reports every message at the
        credential's ``params`` with its file and line, so a credential that could never rotate
        is caught before its first rotation. Each message says what to fix. Default: none.
        """
        return []

    @abstractmethod
    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """Create a new key named or described with ``key_name_for(rotation_id)``."""

    @abstractmethod
    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """Use ``secret`` once against the service with a cheap authenticated call.

        ``key_id`` is the key's id when the engine knows it (services such as AWS need the
        access key id beside the secret); None for a key rotator did not create.
        Raises ``CredentialRejected`` if the service refuses it, ``TransientError`` if the
        service could not be asked.
        """

    @abstractmethod
    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Revoke ``key_id``. A key that is already gone is success, not an error."""

    @abstractmethod
    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        """Ids of live keys whose name carries ``rotation_id`` (crash clean-up)."""

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The provider's id for a key rotator did not create, or None if it cannot tell.

        ``companions`` holds the current values of the fields named by ``companion_fields``
        (an adopted AWS key's ``AWS_ACCESS_KEY_ID``, say) where the vault has them.
        """
        return None

    def companion_fields(self, credential: CredentialInfo) -> tuple[str, ...]:
        """Names of the vault fields written beside the key (usually set in params).

        Agents often need a non-secret value with the key (the access key id of an AWS secret
        key, the role name of a PostgreSQL password). The engine asks ``companions`` for their
        values, stages them with the key so they become current in the same vault version, and
        rollback restores them with it. Default: none.
        """
        return ()

    def companions(self, credential: CredentialInfo, key_id: str) -> Mapping[str, str]:
        """Values of ``companion_fields`` for the key ``key_id``; never a secret."""
        return {}

    def generate(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """``in_place`` providers only: make a new key value without touching the service."""
        raise NotImplementedError(f"{type(self).__name__} is not an in_place provider")

    def apply(self, credential: CredentialInfo, key: NewKey) -> None:
        """``in_place`` providers only: make ``key`` the service's one key (idempotent)."""
        raise NotImplementedError(f"{type(self).__name__} is not an in_place provider")

    def check_access(self) -> None:
        """Confirm the provider's admin credential works (``rotator check --online``)."""

    def warm_up(self) -> None:
        """Import the SDK now, on the main thread, before rotations run on worker threads
        (concurrent first imports of one package from several threads are not safe)."""

    def close(self) -> None:
        """Release connections; called once when the daemon or command ends."""


@dataclass(frozen=True)
class VaultValue:
    """The current version of one field of a vault secret."""

    secret: Secret | None
    """The field's value, or None if the secret exists without that field."""
    version: str | None
    """Opaque id of the version read (KV v2 version number, AWS VersionId)."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """What rotator recorded for this field *of this version* (``key_id``, ``rotation_id``,
    ``rotated_at``); empty when rotator did not write this version (an adopted key)."""
    companions: Mapping[str, str] = field(default_factory=dict)
    """The values, in this version, of the companion fields ``read`` was asked for (those the
    secret has; a missing one is absent)."""


class Vault(ABC):
    """Holds the secrets the agents read. Agents only ever see the current version.

    Writing is two-phase so that no new secret lives only in process memory: the engine
    ``stage``s a new key right after the provider returns it (a slot agents do not read), then
    ``promote``s it to current once verified. Every method is idempotent per ``rotation_id``.
    """

    type_name: ClassVar[str] = ""
    settings_model: ClassVar[type[PluginSettings]] = PluginSettings

    def __init__(self, name: str, settings: PluginSettings) -> None:
        self.name = name
        self.settings = settings

    @abstractmethod
    def read(self, path: str, field: str, companions: Sequence[str] = ()) -> VaultValue:
        """The current version of ``field`` (and of the ``companions`` fields) at ``path``;
        raises ``NotFound`` if no secret."""

    @abstractmethod
    def read_version(self, path: str, field: str, version: str) -> Secret | None:
        """``field`` as it was in ``version`` (the previous key, for rollback and revoke checks)."""

    @abstractmethod
    def stage(self, path: str, field: str, secret: Secret, rotation_id: str,
              companions: Mapping[str, str] | None = None) -> None:
        """Keep ``secret`` durably where agents do not read it, tagged with ``rotation_id``.

        ``companions`` (non-secret fields such as an access key id) are staged with it and
        become current together with it on ``promote``.
        """

    @abstractmethod
    def read_staged(self, path: str, field: str, rotation_id: str) -> Secret | None:
        """The secret staged by ``rotation_id``, or None if there is none."""

    @abstractmethod
    def promote(
        self, path: str, field: str, rotation_id: str, metadata: Mapping[str, str]
    ) -> str:
        """Make the staged secret (and its companions) the current version; return that
        version.

        Other fields of the secret are kept and the old value stays readable as the previous
        version. If the current version already came from ``rotation_id`` this only returns it.
        """

    @abstractmethod
    def restore(
        self, path: str, field: str, version: str, rotation_id: str, metadata: Mapping[str, str],
        companions: Sequence[str] = (),
    ) -> str:
        """Make ``field``'s value (and the ``companions`` fields') from ``version`` current
        again (rollback); return the version.

        Idempotent: if the current value already equals that of ``version``, return current.
        """

    @abstractmethod
    def discard_staged(self, path: str, rotation_id: str) -> None:
        """Forget the staged secret of ``rotation_id``; nothing staged is success."""

    def health(self) -> None:
        """Raise if the vault is unreachable, sealed or refuses the daemon's credentials."""

    def warm_up(self) -> None:
        """Import the SDK now, on the main thread (see ``Provider.warm_up``)."""

    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class StagedCopy:
    """A key staged in a vault for a rotation: where it is, never what it holds."""

    path: str
    """The secret's path, as the engine gave it to ``stage`` (a credential's ``path``)."""
    rotation_id: str
    """The rotation that staged it, as given to ``stage``."""
    location: str = ""
    """Where the copy lives, in the vault's own terms (a KV path, a version label), so that an
    operator can find and delete it; never a value."""


@dataclass(frozen=True)
class UsageBucket:
    """What one key did in one time bucket, as the provider reports it (never a value)."""

    key_id: str
    start: datetime
    """Start of the bucket, aware UTC; the bucket is ``[start, start + width)``."""
    width: timedelta
    requests: int | None
    """Calls made (None where the service counts only tokens, as Anthropic's report does)."""
    tokens: int | None = None
    """Input plus output tokens, where the provider counts them."""
    cost: float | None = None
    """Spend in the provider's currency (USD), where the provider reports it per key."""


class UsageReport(ABC):
    """Optional for a provider: per-key usage from the service's own records, which the
    daemon polls for ``rotator usage``, the per-key metrics and the misuse rules. Discovered
    by type: ``isinstance(provider, UsageReport)``."""

    usage_widths: ClassVar[tuple[timedelta, ...]] = (timedelta(minutes=1), timedelta(hours=1))
    """Bucket widths the service can report, finest first."""

    @classmethod
    def usage_widths_for(cls, settings: PluginSettings) -> tuple[timedelta, ...]:
        """``usage_widths`` for a provider configured with ``settings`` (``rotator check``
        asks before any instance exists); empty when that configuration reports no usage (an
        ``http`` provider without a usage call)."""
        return cls.usage_widths

    @abstractmethod
    def usage(self, key_ids: Sequence[str], start: datetime, end: datetime,
              width: timedelta) -> list[UsageBucket]:
        """Buckets of ``width`` (one of ``usage_widths``) from ``start`` to ``end`` for each
        of ``key_ids`` (a provider-wide question: one call serves every credential), only
        those with use. Raises ``TransientError`` (rate limited: the poller backs off) or
        ``PermanentError`` (the admin key may not read usage), like every provider call."""


BUDGET_PERIODS = ("day", "week", "month")


@dataclass(frozen=True)
class Budget:
    """A spending limit a key carries at the service (``budget`` in the policy)."""

    usd: float
    per: str | None = None
    """``day``, ``week`` or ``month`` (the limit resets then, at midnight UTC), or None: for
    the key's whole life."""


class KeyTerms(ABC):
    """Optional for a provider: create keys with terms the service itself enforces: an expiry
    (``key_ttl``), so a key that escapes rotation (a daemon that died, a copy in a log) dies on
    its own, and a spending limit (``budget``), so a looping agent stops at its own limit
    instead of draining the account. Discovered by type: ``isinstance(provider, KeyTerms)``;
    ``rotator check`` refuses terms a provider cannot carry."""

    expires: ClassVar[bool] = True
    """Whether keys can be given an expiry."""
    max_key_ttl: ClassVar[timedelta | None] = None
    """The longest expiry the service accepts (None: no limit)."""
    budget_periods: ClassVar[tuple[str | None, ...]] = ()
    """The budget periods it can enforce (``day``/``week``/``month``, None for a lifetime
    limit); empty: no budgets."""

    @abstractmethod
    def create_with_terms(self, credential: CredentialInfo, rotation_id: str, *,
                          ttl: timedelta | None, budget: Budget | None) -> NewKey:
        """``create``, the key expiring ``ttl`` from now and limited to ``budget`` (either
        may be None) at the service."""


class KeyProbe(ABC):
    """Optional for a provider: say whether the service still accepts a key found outside any
    vault, knowing nothing of the credential it belonged to (``rotator scan --verify`` asks of
    every key found in files and git history: a revoked key there is harmless, a live one is an
    incident). Discovered by type: ``isinstance(provider, KeyProbe)``."""

    probe_companions: ClassVar[tuple[str, ...]] = ()
    """Variables found beside the key that the probe needs (an AWS secret key's access key
    id); ``scan`` passes their values from the same file."""

    @abstractmethod
    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        """True: the service accepts the key; False: it refuses it (revoked, deleted, never
        issued); None: cannot tell (a companion is missing). Raises ``TransientError`` when
        the service cannot be asked now, ``PermanentError`` when the admin access is wrong."""

    def found_credential(self, secret: Secret, companions: Mapping[str, str]
                         ) -> CredentialInfo | None:
        """A credential under which ``identify`` and ``revoke`` act on this found key
        (``rotator revoke-found``), with params the service itself tells (the IAM user owning
        an access key); None when only the operator's policy can say (default)."""
        return None


class WriteAccessCheck(ABC):
    """Optional for a vault: say, without writing anything, whether its credentials allow
    every write a rotation of ``path``/``field`` makes (``rotate-now --dry-run`` asks, so a
    missing permission is found before a leak night, not during it). Discovered by type."""

    @abstractmethod
    def missing_write_access(self, path: str, field: str) -> list[str]:
        """What a rotation of this secret needs and the vault's credentials lack, one line
        each naming the permission (empty: nothing missing). Raises like every vault call."""


class StagingInventory(ABC):
    """Optional for a vault: list the keys it holds staged, so that ``rotator status`` and
    ``rotator check --online`` can report staged copies no rotation will promote or remove
    (left by a worker that lost its lease, or a clean-up that could not reach the vault).
    Discovered by type: ``isinstance(vault, StagingInventory)``.

    Both methods raise ``TransientError`` when the vault is not serving right now and
    ``PermanentError`` when it refuses to list (a missing permission), like every vault call.
    """

    @abstractmethod
    def staged_copies(self) -> list[StagedCopy]:
        """Every staged copy this vault holds, for any path (also paths no credential names
        any more), sorted by path and rotation id; never a value. Empty when nothing is
        staged."""

    def staged_rotations(self, path: str) -> list[str]:
        """The rotation ids with something staged for ``path``; empty when nothing is staged
        or the secret does not exist. A vault may answer this more cheaply than by listing
        everything."""
        return sorted(c.rotation_id for c in self.staged_copies() if c.path == path)
