"""The error tree every layer speaks.

Plugins translate their SDK's exceptions at the boundary into one of these, so the engine can
decide without knowing any SDK: a :class:`TransientError` is retried with backoff until a
deadline, anything else fails the step and surfaces. Messages say what happened and what to do;
they never contain a secret value (callers pass key ids, paths and names only).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CredentialRejected",
    "Interrupted",
    "LockHeld",
    "NotFound",
    "PermanentError",
    "PluginError",
    "RateLimited",
    "RotatorError",
    "TransientError",
    "UnsupportedOperation",
]


class RotatorError(Exception):
    """Root of every error rotator raises on purpose; the CLI prints these as one clean line."""


class TransientError(RotatorError):
    """A failure worth retrying: a 5xx, a 429, a timeout, a connection refused.

    ``retry_after`` (seconds) is honoured by the retry loop when the remote said how long to wait.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TransientError):
    """The remote refused the call for its rate limit (HTTP 429, not an exhausted quota).

    Never fails a rotation: the engine paces every call to that provider down to the rate it
    allows (``rotator.pacing``) and retries, and the time spent waiting for the limit does not
    count against ``retry_deadline``.
    """


class Interrupted(RotatorError):
    """The daemon is stopping, or lost the credential's lease: leave the rotation where it is
    (its last recorded step), for this process later or for the lease's new owner."""


class PermanentError(RotatorError):
    """A failure retrying cannot fix: bad request, forbidden, misconfiguration."""


class CredentialRejected(PermanentError):
    """The remote refused a key: it is wrong, revoked, or lacks permission.

    Raised by ``Provider.verify`` so that the engine can tell "this key does not work" apart
    from "the provider is unreachable" (the latter is a :class:`TransientError`).
    """


class NotFound(PermanentError):
    """The thing asked for does not exist (a vault path, a key id)."""


class UnsupportedOperation(PermanentError):
    """The plugin cannot do this at all (for example a provider whose API cannot create keys)."""


class ConfigError(RotatorError):
    """The policy file is invalid; ``problems`` holds each one with its place."""

    def __init__(self, problems: list[object]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the policy file")


class PluginError(RotatorError):
    """A plugin could not be found or loaded; the message names the plugin and its entry point."""


class LockHeld(RotatorError):
    """Another worker is rotating this credential right now."""

    def __init__(self, credential: str, owner: str) -> None:
        super().__init__(f"{credential}: a rotation is already in progress (held by {owner})")
        self.credential = credential
        self.owner = owner
