"""``[proxy]`` and ``[proxy.routes.NAME]`` of the policy file: the credential proxy's models.

A route is a path ``prefix`` on the proxy, the ``upstream`` base URL it forwards to, the
``credential`` whose current key it attaches (and how: ``attach``), and what a token for it may
do there: ``methods`` and ``paths`` (glob patterns of the path after the prefix). Checked by
``rotator check`` with file and line, like the rest of the file (see ``rotator.config``).
"""

from __future__ import annotations

import fnmatch
import re
from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator

from rotator.config import Duration, _Model, _positive, check_address

__all__ = ["AgentTokenConfig", "ProxyConfig", "RouteConfig"]

_HEADER = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PARAM = re.compile(r"[A-Za-z0-9_.\-]+")
_PREFIX = re.compile(r"(/[A-Za-z0-9_.\-]+)+")


class RouteConfig(_Model):
    """``[proxy.routes.NAME]``: one upstream service as agents reach it through the proxy."""

    upstream: str
    """The service's base URL, like ``https://api.openai.com/v1``."""
    credential: str
    """The ``[[credentials]]`` whose current key is attached to each forwarded call."""
    attach: str = "bearer"
    """``bearer`` (``Authorization: Bearer KEY``), ``header:NAME`` or ``query:NAME``."""
    prefix: str | None = None
    """The path on the proxy (default ``/NAME``)."""
    methods: list[Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]] = Field(
        default_factory=lambda: ["GET", "POST"])
    paths: list[str] = Field(default_factory=lambda: ["/*"])
    """Glob patterns of the path after ``prefix`` a token for this route may call."""
    error_shape: Literal["openai", "plain"] = "openai"
    """How a denial is written: OpenAI's ``{"error": {...}}`` (most LLM SDKs parse it)."""
    rate_limit: float | None = Field(default=None, gt=0, le=100_000)
    """Requests per second per agent on this route (default: ``[proxy] rate_limit``)."""

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s@?#]+(/[^\s?#]*)?", value):
            raise ValueError('upstream is the service\'s http:// or https:// base URL without a '
                             'user, query or fragment, like "https://api.openai.com/v1"')
        return value.rstrip("/")

    @field_validator("attach")
    @classmethod
    def _attach(cls, value: str) -> str:
        kind, _, name = value.partition(":")
        if value == "bearer" or (kind == "header" and _HEADER.fullmatch(name)
                                 and name.lower() not in ("host", "content-length")) \
                or (kind == "query" and _PARAM.fullmatch(name)):
            return value
        raise ValueError('attach is "bearer", "header:NAME" (like "header:x-api-key") or '
                         '"query:NAME" (like "query:key")')

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and not _PREFIX.fullmatch(value.rstrip("/")):
            raise ValueError('prefix is a path like "/openai" (letters, digits, - _ .)')
        return None if value is None else value.rstrip("/")

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('paths lists at least one pattern, like ["/chat/completions"]')
        for pattern in value:
            if not pattern.startswith("/") or ".." in pattern or "?" in pattern.replace(
                    "[?]", "") or "#" in pattern:
                raise ValueError(f'"{pattern[:60]}" is not a path pattern: start with /, no '
                                 '".." and no query (like "/models/*")')
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('methods lists at least one HTTP method, like ["POST"]')
        return list(dict.fromkeys(value))

    def allows(self, method: str, path: str) -> bool:
        return method in self.methods and any(fnmatch.fnmatchcase(path, p) for p in self.paths)


class AgentTokenConfig(_Model):
    """``[proxy.agents.NAME]``: a token the daemon keeps fresh for agent NAME in a vault
    (renewed when two thirds of its life are gone), so ``rotator exec`` hands it to the agent
    like any key and the agent holds nothing longer-lived."""

    routes: list[str]
    ttl: Duration = timedelta(hours=1)
    budget: int | None = Field(default=None, ge=1)
    vault: str
    path: str
    field: str = "ROTATOR_TOKEN"

    @field_validator("field")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("field becomes an environment variable of the agent: letters, "
                             "digits and _, not starting with a digit")
        return value

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: timedelta) -> timedelta:
        return _positive(value, "ttl")


class ProxyConfig(_Model):
    """``[proxy]``: where the proxy listens, how its tokens are signed and limited."""

    listen: str = "127.0.0.1:8788"
    signing_credential: str
    """The ``[[credentials]]`` (provider type ``signing-key``) whose current key signs tokens;
    its grace must be at least ``max_token_ttl``, so a token outlives no key that signed it."""
    max_token_ttl: Duration = timedelta(hours=1)
    rate_limit: float = Field(default=50, gt=0, le=100_000)
    """Requests per second per agent and route (a burst of twice that is allowed)."""
    vault_refresh: Duration = timedelta(seconds=5)
    """How often a route's key is re-read from the vault (and at once after the upstream
    refuses it)."""
    upstream_timeout: Duration = timedelta(minutes=10)
    """How long the upstream may take to answer, and to send the next piece of a stream."""
    in_daemon: bool = True
    """Whether ``rotator run`` serves the proxy too (its metrics on the daemon's /metrics);
    false when it runs as its own ``rotator proxy`` processes."""
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    agents: dict[str, AgentTokenConfig] = Field(default_factory=dict)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_address(value, "listen", "127.0.0.1:8788")

    @field_validator("max_token_ttl", "vault_refresh", "upstream_timeout")
    @classmethod
    def _positive(cls, value: timedelta, info: object) -> timedelta:
        return _positive(value, getattr(info, "field_name", "duration"))

    def prefix_of(self, name: str) -> str:
        return self.routes[name].prefix or f"/{name}"

    def overlaps(self) -> list[tuple[str, str]]:
        """Pairs of routes (later, earlier) whose prefixes contain one another: a call could
        not be told which route it is for."""
        found = []
        names = list(self.routes)
        for i, name in enumerate(names):
            mine = self.prefix_of(name) + "/"
            for other in names[:i]:
                theirs = self.prefix_of(other) + "/"
                if mine.startswith(theirs) or theirs.startswith(mine):
                    found.append((name, other))
        return found
