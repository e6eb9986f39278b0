"""Small frozen records the engine emits; metrics, audit and logs subscribe to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

__all__ = ["CallObserver", "Listener", "PluginCall", "RotationFinished", "StepFinished"]


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


Listener = Callable[[StepFinished | RotationFinished], None]
CallObserver = Callable[[PluginCall], None]
