"""Small frozen records the engine emits; metrics, audit and logs subscribe to them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["CallObserver", "Listener", "MisuseDetected", "PluginCall", "RotationFinished",
           "StepFinished", "TransactionalListener"]


@dataclass(frozen=True)
class StepFinished:
    rotation_id: str
    credential: str
    agent: str
    provider: str
    step: str
    status: str
    """``succeeded`` or ``failed``."""
    duration: float
    message: str | None
    at: datetime
    old_key_id: str | None = None
    new_key_id: str | None = None
    """Key ids as the rotation knows them when the step ends (never a secret)."""


@dataclass(frozen=True)
class RotationFinished:
    rotation_id: str
    credential: str
    agent: str
    provider: str
    trigger: str
    outcome: str
    """``success``, ``failed`` or ``rolled_back``."""
    duration: float
    message: str | None
    at: datetime
    old_key_id: str | None = None
    new_key_id: str | None = None
    revoke_mode: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    manual_revoke: str | None = None
    """Set when the old key could not be identified and must be revoked by hand."""


@dataclass(frozen=True)
class MisuseDetected:
    """A misuse rule fired on a credential's usage (see :mod:`rotator.monitor`), once."""

    anomaly_id: int
    credential: str
    agent: str
    provider: str
    key_id: str | None
    """The key whose use fired the rule (None: the credential's keys together)."""
    rule: str
    """``spike``, ``outside``, ``old_key``, ``daily_cap`` or ``straggler``."""
    action: str
    """``alert`` or ``revoke``."""
    message: str
    """What was seen, with the figures: never a secret."""
    figures: dict[str, Any]
    at: datetime


@dataclass(frozen=True)
class PluginCall:
    """One attempt at one provider or vault operation (retries are further attempts)."""

    kind: str
    """``provider`` or ``vault``."""
    plugin: str
    """The ``[providers.NAME]`` / ``[vaults.NAME]`` name."""
    operation: str
    """The plugin method: ``create``, ``verify``, ``revoke``, ``stage``, ``promote``..."""
    status: str
    """``ok``, ``transient_error`` (will be retried) or ``error``."""
    duration: float
    attempt: int
    throttled: bool = False
    """The provider refused it for its rate limit (a 429; ``status`` is ``transient_error``)."""
    paced_rate: float | None = None
    """Requests per second the provider's calls are paced at now (None: not paced)."""


Listener = Callable[[StepFinished | RotationFinished], None]
CallObserver = Callable[[PluginCall], None]


class TransactionalListener(ABC):
    """A listener that records a step's event inside the engine's own step transaction
    (``in_tx``), so the event and the state change commit together or not at all (the audit
    trail). It is still called, as any listener, for the events it did not record that way."""

    @abstractmethod
    def __call__(self, event: StepFinished | RotationFinished) -> None:
        """Record an event outside a step transaction (a rotation's end, a failed step)."""

    @abstractmethod
    def in_tx(self, conn: Any, event: StepFinished) -> None:
        """Record ``event`` on ``conn``, the open write transaction of the step it reports."""
