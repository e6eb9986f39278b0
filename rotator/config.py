"""The policy file (``rotation-policies.toml``) as validated, immutable models.

:func:`load_policies` reads the file, checks everything that can be checked offline (syntax,
types, durations, names, references between sections, every plugin's own settings and params),
and either returns :class:`Policies` or raises :class:`~rotator.errors.ConfigError` carrying
*every* problem at once, each with its file, line and key path, so an operator fixes the file in
one pass (cert-manager's habit). Nothing else ever escapes it: whatever the input, the caller
gets ``Policies`` or ``ConfigError``.

Secrets never belong in this file. Anything that looks like one (a well-known key prefix, or a
plain string where a secret-bearing setting is expected) is an error whose message does not
repeat the value; secret-bearing settings take a :class:`SecretRef` instead.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from rotator import plugins
from rotator.durations import format_duration, parse_duration
from rotator.errors import ConfigError, PluginError
from rotator.interfaces import BUDGET_PERIODS, Budget, PluginSettings, Provider
from rotator.policy import ScheduleSpec, Window, longest_gap, validate_cron
from rotator.secret_ref import (
    CONTROL_CHARS,
    SECRETS_NEVER_HERE,
    SecretRef,
    check_vault_field,
    check_vault_path,
)

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "CredentialConfig",
    "Duration",
    "HealthCheck",
    "Hook",
    "MisuseRules",
    "NotifyConfig",
    "Policies",
    "Problem",
    "ProviderConfig",
    "RotatorSettings",
    "SecretRef",
    "VaultConfig",
    "WindowField",
    "load_policies",
    "parse_policies",
    "resolve_config_path",
]

# -- field types -----------------------------------------------------------------------------


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError("durations cannot be negative")
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError('a duration is a string with a unit, like "30d", "12h", "15m" or "1h30m"')


Duration = Annotated[timedelta, PlainValidator(_duration)]
"""A ``timedelta`` written as ``"90d"``/``"1h30m"`` in the file; plugins may use it too."""


def _window(value: Any) -> Window:
    if isinstance(value, Window):
        return value
    if isinstance(value, str):
        return _parsed_window(value)
    raise ValueError('a window is a string like "Mon-Fri 09:00-17:00 UTC"')


@functools.lru_cache(maxsize=256)
def _parsed_window(text: str) -> Window:
    """``Window.parse``, once per text: a fleet's credentials share a few windows (and so
    share each window's zone and spans); a refused text raises again each time."""
    return Window.parse(text)


WindowField = Annotated[Window, PlainValidator(_window)]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")
_NAME_RULE = "use letters, digits and - _ . / (starting with a letter or digit)"


def _check_name(value: str, what: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ValueError(f'{what} "{shown}" is not allowed: {_NAME_RULE}')
    return value


_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]*):(\d{1,5})")


def check_address(value: str, what: str, example: str) -> str:
    """``value`` if it is ``host:port`` (port 0..65535), else ``ValueError`` naming ``what``."""
    match = _ADDRESS.fullmatch(value)
    if match is None or int(match.group(1)) > 65535:
        raise ValueError(f'{what} is "host:port", like "{example}"')
    return value


def _positive(value: timedelta, what: str) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"{what} must be longer than 0s")
    return value


class _Model(BaseModel):
    """Base of the policy models: unknown keys are errors, TOML types are taken strictly
    (``attempts = "5"`` or ``verify = 1`` are mistakes worth reporting), values immutable, and
    an input never appears in an error (it might be a misplaced secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True,
                              hide_input_in_errors=True)


# -- the models ------------------------------------------------------------------------------


MisuseAction = Literal["alert", "revoke", "off"]
"""What a misuse rule does when it fires: ``alert`` (log, audit event, notification, metric),
``revoke`` (an emergency rotation of the credential with the rule and figures as its reason),
``off`` (the rule is not checked: turns a default from ``[rotator.misuse]`` off)."""


class SpikeRule(_Model):
    """Use above ``factor`` times the trailing daily average: the last 24 hours' requests (or
    tokens) against the mean day of the ``baseline_days`` before them, for the credential's keys
    together (the agent's habit carries across its rotations). Days below ``min_requests`` (or
    ``min_tokens`` where the provider counts only tokens) never fire, so a key used twice
    instead of once does not page anyone."""

    factor: float = Field(default=3.0, gt=1, le=1000)
    baseline_days: int = Field(default=7, ge=1, le=30)
    min_requests: int = Field(default=100, ge=0)
    min_tokens: int = Field(default=100_000, ge=0)
    """The floor where the provider counts only tokens (Anthropic)."""
    action: MisuseAction = "alert"


class OutsideRule(_Model):
    """Any use in a bucket that starts outside ``window`` (the agent's working hours)."""

    window: WindowField
    action: MisuseAction = "alert"


class OldKeyRule(_Model):
    """Any use of a key after rotator replaced it and the agent was seen on the new key (or
    after it was revoked): whoever makes those calls is not the agent."""

    action: MisuseAction = "alert"


class DailyCapRule(_Model):
    """A hard ceiling per UTC day on the credential's requests, tokens or cost (any given)."""

    requests: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)
    cost: float | None = Field(default=None, gt=0)
    action: MisuseAction = "alert"

    @model_validator(mode="after")
    def _a_figure(self) -> DailyCapRule:
        if self.requests is None and self.tokens is None and self.cost is None:
            raise ValueError("a daily_cap needs requests, tokens or cost (or remove it)")
        return self


class BudgetConfig(_Model):
    """``budget = { usd = 20, per = "day" }``: what each new key may spend at the provider
    (``per`` day, week or month, resetting at midnight UTC; without it, the key's whole life)."""

    usd: float = Field(gt=0, le=1_000_000)
    per: Literal["day", "week", "month"] | None = None

    def budget(self) -> Budget:
        return Budget(self.usd, self.per)


class MisuseRules(_Model):
    """``[rotator.misuse]`` (defaults) and ``[credentials.misuse]``: the anomaly rules checked
    against each poll of the provider's usage records (see :mod:`rotator.monitor`)."""

    source: Literal["provider", "proxy"] = "provider"
    """Whose counts the rules judge: the provider's usage records, or the credential proxy's
    own count of the calls it forwarded with this credential (any service, usage API or
    not; requests only, per minute)."""
    spike: SpikeRule | None = SpikeRule()
    outside: OutsideRule | None = None
    old_key: OldKeyRule | None = OldKeyRule()
    daily_cap: DailyCapRule | None = None

    def active(self) -> dict[str, SpikeRule | OutsideRule | OldKeyRule | DailyCapRule]:
        """Rule name -> rule, for the rules set and not ``off``."""
        rules = {"spike": self.spike, "outside": self.outside, "old_key": self.old_key,
                 "daily_cap": self.daily_cap}
        return {n: r for n, r in rules.items() if r is not None and r.action != "off"}


class RotatorSettings(_Model):
    """``[rotator]``: the daemon's own settings; every key is optional."""

    state_url: str = "sqlite:///rotator-state.db"
    """SQLAlchemy URL of the state store: sqlite for one daemon, PostgreSQL for replicas.
    :func:`load_policies` makes a relative SQLite path absolute, against the policy file's
    directory, so every command run with the same file uses the same store."""
    metrics_address: str = "127.0.0.1:9464"
    """``host:port`` of the Prometheus endpoint; port 0 picks a free port (tests)."""
    max_concurrent_rotations: int = Field(default=8, ge=1, le=256)
    default_interval: Duration = timedelta(days=90)
    default_grace: Duration = timedelta(hours=1)
    jitter: Duration = timedelta(minutes=10)
    """Due rotations are spread over ``[0, jitter)`` so a fleet does not rotate at once."""
    poll_interval: Duration = timedelta(seconds=15)
    """How often the daemon looks for due work (rotations, revocations, interrupted runs)."""
    lock_ttl: Duration = timedelta(minutes=2)
    """Lease on a credential's rotation lock; a crashed holder's lock expires after this."""
    retry_deadline: Duration = timedelta(minutes=2)
    """How long transient errors are retried within one step before it fails."""
    store_wait_at_start: Duration = timedelta(minutes=2)
    """How long ``rotator run`` waits for a PostgreSQL state store that is away when it
    starts (a restart, a failover); ``0s`` fails at once and leaves restarts to systemd or
    Kubernetes."""
    usage_poll_interval: Duration = timedelta(minutes=5)
    """How often the daemon asks each provider that reports per-key usage for it (one call
    per provider for all its keys); ``0s`` turns usage monitoring off."""
    usage_retention: Duration = timedelta(days=35)
    """How long per-key usage buckets are kept in the state store."""
    misuse: MisuseRules = MisuseRules()
    """Default anomaly rules of every credential whose provider reports usage."""

    @field_validator("state_url")
    @classmethod
    def _state_url(cls, value: str) -> str:
        if not re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", value):
            raise ValueError('state_url is a database URL like "sqlite:////var/lib/rotator/'
                             'state.db" or "postgresql+psycopg://rotator@db/rotator"')
        return value

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str) -> str:
        return check_address(value, "metrics_address", "127.0.0.1:9464")

    @field_validator("default_interval", "poll_interval", "lock_ttl", "retry_deadline")
    @classmethod
    def _not_zero(cls, value: timedelta, info: Any) -> timedelta:
        return _positive(value, info.field_name)


class VaultConfig(_Model):
    """``[vaults.NAME]``: ``type`` picks the plugin, the other keys are its ``settings_model``."""

    name: str
    type: str
    settings: PluginSettings


class ProviderConfig(_Model):
    """``[providers.NAME]``: ``type`` picks the plugin, the other keys are its
    ``settings_model``."""

    name: str
    type: str
    settings: PluginSettings


def _url(value: str | None, what: str) -> None:
    if value is not None and not re.match(r"https?://[^/\s]", value):
        raise ValueError(f"{what} must be an http:// or https:// URL")


def _argv_from_string(value: Any) -> Any:
    """``run = "systemctl reload a"`` is a shell string; rotator runs no shell (a key id or
    name could never be interpolated into one safely), so say exactly what to write instead."""
    if isinstance(value, str):
        import shlex

        try:
            words = shlex.split(value)
        except ValueError:
            words = value.split()
        listed = "[" + ", ".join(json.dumps(w) for w in words) + "]"
        raise ValueError(f"run is a command as a list of arguments, run without a shell: "
                         f"write run = {listed}")
    return value


def _argv(value: list[str] | None, what: str) -> None:
    if value is not None and (not value or not value[0]):
        raise ValueError(f'{what} is a command as a list, like ["systemctl", "reload", "agent"]')


class HealthCheck(_Model):
    """``[credentials.health_check]``: how rotator knows the consuming agent still works.

    ``http`` GETs ``url`` and wants ``expect_status``; ``expect_json`` additionally names JSON
    fields of the response (dotted paths, like ``auth.key_id``) and the value each must have,
    where ``{key_id}`` is replaced by the new key's id: ``expect_json = { key_id = "{key_id}" }``
    proves the agent has *loaded* the new key, not merely that it is up. ``command`` runs
    ``run`` (exit 0 = healthy). Up to ``attempts`` tries, ``delay`` apart, each bounded by
    ``timeout``; a failing check rolls the rotation back. ``none`` trusts the agent.
    """

    type: Literal["http", "command", "none"] = "none"
    url: str | None = None
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_json: dict[str, str] | None = None
    run: list[str] | None = None
    timeout: Duration = timedelta(seconds=10)
    attempts: int = Field(default=5, ge=1, le=1000)
    _run_list = field_validator("run", mode="before")(_argv_from_string)
    delay: Duration = timedelta(seconds=2)
    """Pause between attempts."""

    @model_validator(mode="after")
    def _fields_for_type(self) -> HealthCheck:
        _url(self.url, "url")
        _argv(self.run, "run")
        _positive(self.timeout, "timeout")
        if self.type == "http" and not self.url:
            raise ValueError('a health check of type "http" needs url')
        if self.type == "command" and not self.run:
            raise ValueError('a health check of type "command" needs run = ["command", ...]')
        if self.type != "http" and (self.url is not None or self.expect_json is not None):
            raise ValueError(f'url and expect_json are for type "http", not "{self.type}"')
        if self.type != "command" and self.run is not None:
            raise ValueError(f'run is for type "command", not "{self.type}"')
        return self


class Hook(_Model):
    """``[credentials.on_rotate]``: tell the consumer to reload after the vault holds the new
    key (``command``: run ``run``; ``http``: send ``method`` to ``url`` with a JSON body of
    ids). A hook that fails rolls the rotation back, like a failed health check."""

    type: Literal["command", "http"]
    run: list[str] | None = None
    url: str | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    _run_list = field_validator("run", mode="before")(_argv_from_string)
    timeout: Duration = timedelta(seconds=30)

    @model_validator(mode="after")
    def _fields_for_type(self) -> Hook:
        _url(self.url, "url")
        _argv(self.run, "run")
        _positive(self.timeout, "timeout")
        if self.type == "command" and (not self.run or self.url is not None):
            raise ValueError('an on_rotate hook of type "command" needs run = ["command", ...] '
                             "and no url")
        if self.type == "http" and (not self.url or self.run is not None):
            raise ValueError('an on_rotate hook of type "http" needs url and no run')
        return self


class CredentialConfig(_Model):
    """One ``[[credentials]]`` entry: a key one agent uses, where it lives, when it rotates.

    After loading, exactly one of ``interval``/``schedule`` is set, unless ``manual_only``
    (for providers that cannot create keys: only ``rotate-now --revoke-first`` applies), in
    which case neither is. ``grace`` always has a value. ``line`` is where the entry starts in
    the file, for messages.
    """

    name: str
    agent: str
    provider: str
    vault: str
    path: str
    """Where the key lives inside the vault: relative segments like ``agents/x/openai``."""
    field: str
    """The key inside the vault secret that holds the credential (others are preserved)."""
    interval: Duration | None = None
    schedule: str | None = None
    grace: Duration = timedelta(hours=1)
    window: WindowField | None = None
    manual_only: bool = False
    params: PluginSettings = PluginSettings()
    health_check: HealthCheck = HealthCheck()
    on_rotate: Hook | None = None
    misuse: MisuseRules | None = None
    """The anomaly rules (``[rotator.misuse]`` merged with this credential's own); None when
    its provider reports no usage."""
    revoke_when: Literal["grace", "quiet"] = "grace"
    """``quiet``: revoke the old key once the provider's usage shows it unused for
    ``quiet_for`` after the switch, ``grace`` being the upper bound."""
    quiet_for: Duration = timedelta(minutes=10)
    budget: BudgetConfig | None = None
    """A spending limit every key rotator creates carries at the provider."""
    key_ttl: Duration | None = None
    """Every key rotator creates expires this long after its creation, at the provider; at
    least the interval plus grace, so a rotation on time always replaces it first."""
    line: int = 0

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str) -> str:
        return _check_name(value, "agent")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_vault_path(value)

    @field_validator("field")
    @classmethod
    def _field(cls, value: str) -> str:
        return check_vault_field(value)

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: timedelta | None) -> timedelta | None:
        return None if value is None else _positive(value, "interval")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            validate_cron(value)
        return value

    @model_validator(mode="after")
    def _one_schedule(self) -> CredentialConfig:
        if self.manual_only:
            if self.interval is not None or self.schedule is not None or self.window:
                raise ValueError("manual_only credentials are never rotated by schedule: "
                                 "remove interval, schedule and window")
        elif self.interval is not None and self.schedule is not None:
            raise ValueError("give interval or schedule, not both")
        return self

    def schedule_spec(self, jitter: timedelta) -> ScheduleSpec:
        """What :func:`rotator.policy.decide` needs, with the daemon-wide ``jitter``.

        The same object while nothing it holds changes: the due gate asks for every
        credential on every ``/metrics`` scrape, and a spec it has seen before is recognised
        by identity. Kept in ``__dict__`` (not a field: equality and dumps ignore it); a
        ``model_copy`` carries it along, so it is checked against the fields it came from."""
        spec: ScheduleSpec | None = self.__dict__.get("_schedule_spec")
        if (spec is not None and spec.jitter == jitter and spec.interval is self.interval
                and spec.cron is self.schedule and spec.window is self.window
                and spec.manual_only is self.manual_only and spec.credential is self.name):
            return spec
        spec = ScheduleSpec(credential=self.name, interval=self.interval, cron=self.schedule,
                            window=self.window, jitter=jitter, manual_only=self.manual_only)
        self.__dict__["_schedule_spec"] = spec
        return spec


NOTIFY_EVENTS = ("failure", "rollback", "emergency", "success", "misuse")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SECRET_WEBHOOK_HOSTS = re.compile(
    r"(?i)^https?://(?:[^/@]*@)?(?:hooks\.slack\.com|(?:[a-z0-9-]+\.)*discord(?:app)?\.com|"
    r"(?:[a-z0-9-]+\.)*webhook\.office\.com|outlook\.office\.com|chat\.googleapis\.com)"
    r"(?::\d+)?(?:/|$)")
"""Services whose webhook URL is itself the credential: anyone holding it can post."""
_SLACK_URL_IS_A_SECRET = (
    "a Slack-style webhook URL is a secret (whoever has it can post to the channel): keep it out "
    'of the policy file and write url = { env = "SLACK_WEBHOOK_URL" } (or a vault or file '
    "reference)")


def _secret_or_text(value: Any) -> str:
    return "ref" if isinstance(value, dict | SecretRef) else "text"


SecretOrText = Annotated[
    Annotated[SecretRef, Tag("ref")] | Annotated[str, Tag("text")],
    Discriminator(_secret_or_text),
]
"""A setting that is either a plain string or a :class:`SecretRef` (a TOML table)."""


class NotifyConfig(_Model):
    """``[notify.NAME]``: a webhook told about rotations an operator must know of.

    ``type = "webhook"`` POSTs the documented JSON document; ``"slack"`` POSTs a Slack
    incoming-webhook message (``text`` + ``blocks``; Mattermost and Rocket.Chat accept it too).
    ``url`` is a :class:`SecretRef` or, for an internal endpoint whose address is no secret, a
    plain string; a Slack-style URL *is* a secret, so a plain one is refused. ``events`` picks
    what is sent, ``credentials`` (glob patterns of credential names) narrows it. Delivery is
    retried ``retries`` times and never holds up a rotation (see :mod:`rotator.notify`).
    """

    type: Literal["webhook", "slack"]
    url: SecretOrText
    events: list[Literal["failure", "rollback", "emergency", "success", "misuse"]] = Field(
        default_factory=lambda: ["failure", "rollback", "emergency", "misuse"])
    credentials: list[str] | None = None
    """Glob patterns (``research-agent/*``) of the credentials to report on; all if unset."""
    headers: dict[str, SecretOrText] = Field(default_factory=dict)
    bearer_token: SecretRef | None = None
    """Sent as ``Authorization: Bearer <token>``; a reference, never the token itself."""
    timeout: Duration = timedelta(seconds=10)
    """Per request; a webhook slower than this counts as down and is retried."""
    retries: int = Field(default=3, ge=0, le=10)
    """Further attempts after the first, on connection errors, timeouts, 408, 429 and 5xx."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | SecretRef, info: Any) -> str | SecretRef:
        if isinstance(value, str):
            # Messages never repeat the value: it may be a pasted secret.
            if info.data.get("type") == "slack" or _SECRET_WEBHOOK_HOSTS.match(value.strip()):
                raise ValueError(_SLACK_URL_IS_A_SECRET)
            _url(value, "url")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one of {', '.join(NOTIFY_EVENTS)} (or remove "
                             "the section to send nothing)")
        return list(dict.fromkeys(value))

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(value)):
            raise ValueError('credentials is a list of names or glob patterns, like '
                             '["research-agent/*"]; leave it out to report on every credential')
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str | SecretRef]) -> dict[str, str | SecretRef]:
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f'"{name[:40]}" is not an HTTP header name')
            if name.lower() in ("content-type", "content-length", "host"):
                raise ValueError(f'header "{name}" is set by rotator itself')
            if isinstance(text, str) and CONTROL_CHARS.search(text):
                raise ValueError(f'header "{name}" must not contain control characters')
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: timedelta) -> timedelta:
        _positive(value, "timeout")
        if value > timedelta(minutes=5):
            raise ValueError("timeout is at most 5m: a webhook slower than that is down")
        return value

    def wants(self, credential: str) -> bool:
        """Whether ``credential`` matches the ``credentials`` filter (always, if unset)."""
        return self.credentials is None or any(
            fnmatch.fnmatchcase(credential, pattern) for pattern in self.credentials)


class Policies(_Model):
    """A whole validated policy file. Immutable: a reload builds a new one."""

    source: Path
    settings: RotatorSettings
    vaults: dict[str, VaultConfig]
    providers: dict[str, ProviderConfig]
    credentials: tuple[CredentialConfig, ...]
    notify: dict[str, NotifyConfig] = Field(default_factory=dict)
    proxy: Any = None
    """``[proxy]`` as a :class:`rotator.proxy.settings.ProxyConfig`, or None."""

    def credential(self, name: str) -> CredentialConfig:
        """The credential called ``name``; ``KeyError`` if the file has none."""
        for cred in self.credentials:
            if cred.name == name:
                return cred
        raise KeyError(f"no credential named {name!r} in {self.source}")

    def by_agent(self, agent: str) -> tuple[CredentialConfig, ...]:
        return tuple(c for c in self.credentials if c.agent == agent)

    def by_provider(self, provider: str) -> tuple[CredentialConfig, ...]:
        return tuple(c for c in self.credentials if c.provider == provider)


# -- problems --------------------------------------------------------------------------------

KeyPath = tuple[str | int, ...]
_BARE_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def format_key(path: Sequence[str | int]) -> str:
    """``("credentials", 2, "params", "x")`` -> ``credentials[2].params.x`` (TOML quoting)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if _BARE_KEY.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
        out += f".{text}" if out else text
    return out


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the policy file, and where: printed as ``file:line: key: message``."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        place = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{place}: {self.key}: {self.message}" if self.key else f"{place}: {self.message}"


# -- locating keys in the source -------------------------------------------------------------

_BASIC_STRING_STOP = re.compile(r'["\\]')


# The locator's scanner steps over these with a regex each rather than a character at a
# time: at 10,000 credentials the per-character loops were most of a policy load's scan.
_BLANKS = re.compile(r"(?:[ \t\r]+|#[^\n]*)*")
_BLANK_LINES = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]*")
"""TOML's bare keys are ASCII letters, digits, ``_`` and ``-``."""
_SCALAR = re.compile(r"[^,\]}\n#]*")
_SIMPLE_LINE = re.compile(r"""([A-Za-z0-9_-]+)[ \t]*=[ \t]*(?:"(?:[^"\\\n]|\\.)*"|'[^'\n]*'"""
                          r"""|[^,\]}\n#\s"'\[{][^,\]}\n#]*)[ \t\r]*(?:#[^\n]*)?\n""")


class _Locator:
    """Maps key paths to the line they are written on, from the raw TOML text.

    ``tomllib`` keeps no positions, so this scans the (already syntax-checked) source: table
    and array-of-tables headers with their indices, ``key = value`` lines with dotted and
    quoted keys, and the keys of inline tables and the elements of arrays, each at the line
    where it starts. An unknown path falls back to its nearest enclosing table or key.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        self._text = text
        self._pos = 0
        self._line = 1
        self._arrays: dict[KeyPath, int] = {}
        # Best effort: a scanner bug must cost line numbers, never the check itself.
        with contextlib.suppress(Exception):
            self._scan()

    def line_for(self, path: Sequence[str | int]) -> int | None:
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None

    # The scanner proper: only ever run on text tomllib accepted.

    def _peek(self, n: int = 1) -> str:
        return self._text[self._pos:self._pos + n]

    def _advance(self, n: int = 1) -> None:
        self._line += self._text.count("\n", self._pos, self._pos + n)
        self._pos += n

    def _skip_blank(self, newlines: bool) -> None:
        end = (_BLANK_LINES if newlines else _BLANKS).match(self._text, self._pos).end()
        if end > self._pos:
            self._advance(end - self._pos)

    def _record(self, path: KeyPath, line: int) -> None:
        self.lines.setdefault(path, line)

    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_blank(newlines=True)
            if self._pos >= len(self._text):
                return
            line = self._line
            if self._peek() == "[":
                is_array = self._peek(2) == "[["
                self._advance(2 if is_array else 1)
                keys = self._keys()
                self._advance(2 if is_array else 1)
                table = self._header(keys, is_array, line)
            elif (simple := _SIMPLE_LINE.match(self._text, self._pos)) is not None:
                # ``key = "text"`` or ``key = 30``, alone on its line: nearly every line of
                # a large policy file, taken in one step (the general path below records
                # the same line for the same key, and stops after the same newline).
                self._record((*table, simple.group(1)), line)
                self._pos = simple.end()
                self._line += 1
            else:
                keys = self._keys()
                path = table
                for key in keys:
                    path = (*path, key)
                    self._record(path, line)
                self._skip_blank(newlines=False)
                self._advance()  # "="
                self._value(path)

    def _header(self, keys: list[str], is_array: bool, line: int) -> KeyPath:
        path: KeyPath = ()
        for i, key in enumerate(keys):
            path = (*path, key)
            last = i == len(keys) - 1
            if last and is_array:
                index = self._arrays.get(path, -1) + 1
                self._arrays[path] = index
                self._record(path, line)
                path = (*path, index)
            elif path in self._arrays:
                path = (*path, self._arrays[path])
            self._record(path, line)
        return path

    def _keys(self) -> list[str]:
        keys = []
        while True:
            self._skip_blank(newlines=False)
            ch = self._peek()
            if ch in "\"'":
                keys.append(self._string())
            else:
                start = self._pos
                self._pos = _BARE_KEY.match(self._text, start).end()
                keys.append(self._text[start:self._pos])
            self._skip_blank(newlines=False)
            if self._peek() != ".":
                return keys
            self._advance()

    def _string(self) -> str:
        """Consume a string of any of the four kinds; return its raw contents (keys only
        use the single-line kinds, where escapes other than \\" are rare enough to ignore).
        Jumps from quote to quote (``str.find``/a regex), so a huge value costs little."""
        quote = self._peek()
        multi = self._peek(3) == quote * 3
        self._advance(3 if multi else 1)
        start = self._pos
        text = self._text
        pos = start
        while True:
            if quote == '"':
                match = _BASIC_STRING_STOP.search(text, pos)
                at = -1 if match is None else match.start()
                if at >= 0 and text[at] == "\\":
                    pos = at + 2
                    continue
            else:
                at = text.find(quote, pos)
            if at < 0:
                self._advance(len(text) - self._pos)
                return text[start:]
            if not multi:
                self._advance(at + 1 - self._pos)
                return text[start:at].replace('\\"', '"')
            if text.startswith(quote * 3, at):
                end = at
                pos = at + 3
                while text.startswith(quote, pos):  # up to two quotes may close the content
                    end += 1
                    pos += 1
                self._advance(pos - self._pos)
                return text[start:end]
            pos = at + 1

    def _value(self, path: KeyPath) -> None:
        self._skip_blank(newlines=False)
        ch = self._peek()
        if ch in "\"'":
            self._string()
        elif ch == "[":
            self._advance()
            index = 0
            while True:
                self._skip_blank(newlines=True)
                if self._peek() in ("]", ""):
                    self._advance()
                    return
                if self._peek() == ",":
                    index += 1
                    self._advance()
                    continue
                self._record((*path, index), self._line)
                self._value((*path, index))
        elif ch == "{":
            self._advance()
            while True:
                self._skip_blank(newlines=False)
                if self._peek() in ("}", ""):
                    self._advance()
                    return
                if self._peek() == ",":
                    self._advance()
                    continue
                line = self._line
                sub = path
                for key in self._keys():
                    sub = (*sub, key)
                    self._record(sub, line)
                self._skip_blank(newlines=False)
                self._advance()  # "="
                self._value(sub)
        else:  # number, boolean, date-time: runs to a delimiter
            self._pos = _SCALAR.match(self._text, self._pos).end()


# -- secret detection ------------------------------------------------------------------------

_SECRET_VALUE = re.compile(
    r"(?:^|[^A-Za-z0-9])(?:sk-[A-Za-z0-9_\-]{4,}|sk_live_|sk_test_|rk_live_|rk_test_|whsec_|"
    r"AKIA[A-Z0-9]{8,}|ghp_|github_pat_|glpat-|xox[abposr]-|hvs\.|-----BEGIN)")
# A URL with a password (scheme://user:password@). Linear on any input: a scheme is only
# tried from the start of a run of scheme characters (the lookbehind) and every repetition
# is possessive, so no character is rescanned by backtracking.
_URL_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9+.\-])[0-9+.\-]*+[A-Za-z][A-Za-z0-9+.\-]*+://[^/\s:@]*+:[^/\s@]++@")
_PRIVATE_KEY = "-----BEGIN"
_SECRET_WORDS = {"key", "token", "password", "passwd", "secret", "apikey", "authorization",
                 "credential", "credentials", "pat"}
_REFERENCE_WORDS = {"env", "file", "path", "id", "url", "name", "field", "header", "mount",
                    "type", "ref", "ttl", "role", "prefix", "suffix", "format", "version",
                    "label", "description", "template", "kind", "mode"}
_FREE_FORM = {"expect_json"}
"""Tables whose keys the user chooses (JSON field names): key names there mean nothing."""


def _secret_key_name(name: str) -> bool:
    words = [w for w in re.split(r"[_\-.\s]+", name.lower()) if w]
    return (bool(words) and any(w in _SECRET_WORDS for w in words)
            and words[-1] not in _REFERENCE_WORDS)


def _looks_secret(value: str) -> bool:
    return bool(_SECRET_VALUE.search(value) or _URL_PASSWORD.search(value))


def _never_an_identifier(value: str) -> bool:
    """What no name or vault path can be: a private key block or a URL with a password."""
    return _PRIVATE_KEY in value or bool(_URL_PASSWORD.search(value))


_CREDENTIAL_IDENTIFIERS = frozenset({"name", "agent", "provider", "vault", "path", "field"})
_REF_IDENTIFIERS = frozenset({"vault", "path", "field"})


def _is_identifier(path: KeyPath, parent: Mapping[str, Any]) -> bool:
    """Whether the string at ``path`` names something (a credential, agent, section, vault
    path or field, a type) rather than being a free-form value: key prefixes such as
    ``sk-`` are then a naming choice (``sk-agent/openai``), not a pasted secret."""
    key = path[-1]
    if len(path) == 3 and path[0] == "credentials" and isinstance(path[1], int):
        return key in _CREDENTIAL_IDENTIFIERS
    if len(path) == 3 and path[0] == "notify" and key in ("type", "credentials"):
        return True
    if path == ("proxy", "signing_credential") or (
            len(path) == 4 and path[:2] == ("proxy", "routes") and key == "credential"):
        return True  # names of [[credentials]], not secrets
    if key == "type" and (
            (len(path) == 3 and path[0] in ("vaults", "providers"))
            or (len(path) == 4 and path[0] == "credentials" and isinstance(path[1], int)
                and path[2] in ("health_check", "on_rotate"))):
        return True
    return key in _REF_IDENTIFIERS and set(parent) <= _SECRET_REF_KEYS


def _find_secrets(node: Any, path: KeyPath = (), free: bool = False,
                  suspects: list[str] | None = None) -> Iterator[tuple[KeyPath, str]]:
    """Every string in the document that is, or stands where one expects, a secret.

    Identifiers (see :func:`_is_identifier`) are only flagged when they cannot be names at
    all; those that merely look like a key are appended to ``suspects``, values the caller
    keeps out of its messages just in case.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            child = (*path, key)
            if isinstance(value, str):
                if _is_identifier(child, node):
                    if _never_an_identifier(value):
                        yield child, value
                    elif suspects is not None and _looks_secret(value):
                        suspects.append(value)
                elif _looks_secret(value) or (not free and _secret_key_name(key)
                                              and not (not path and key in _TOP_KEYS)):
                    # A top-level section given as a string is a type error, not a secret.
                    yield child, value
            else:
                yield from _find_secrets(value, child, key in _FREE_FORM, suspects)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if isinstance(value, str):
                if _looks_secret(value):
                    yield (*path, index), value
            else:
                yield from _find_secrets(value, (*path, index), free, suspects)


# -- validation ------------------------------------------------------------------------------

_TOP_KEYS = ("rotator", "vaults", "providers", "credentials", "notify", "proxy")
_SECRET_REF_KEYS = frozenset(SecretRef.model_fields)
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f'unknown key "{key}" (did you mean "{close[0]}"?)'
    return f'unknown key "{key}" (known keys: {", ".join(sorted(known))})'


def _unknown_name(what: str, name: str, known: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    listed = ", ".join(sorted(known)) or "none defined"
    return f'no {what} named "{name}" in [{where}] ({hint}known: {listed})'


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated``/``Optional``/unions down to a model, dict or list type."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if (isinstance(inner, type) and issubclass(inner, BaseModel)) or \
                    typing.get_origin(inner) in (dict, list, tuple):
                return inner
        return None
    return annotation


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class that validates the table at ``loc`` inside ``model`` (for suggestions)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, list, tuple):
            args = typing.get_args(current)
            current = args[-1] if args else None
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _model_keys(model: type[BaseModel]) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(field.alias or name)
    return keys


class _Checker:
    """Collects problems while walking the raw document; builds the models if none."""

    def __init__(self, source: Path, text: str, doc: dict[str, Any]) -> None:
        self.source = source
        self.file = str(source)
        self.doc = doc
        self.locator = _Locator(text)
        self.problems: list[tuple[KeyPath, str]] = []

    def add(self, path: KeyPath, message: str) -> None:
        self.problems.append((path, message))

    def validate(self, model: type[BaseModel], data: Any, path: KeyPath,
                 extra_keys: Sequence[str] = ()) -> Any:
        """``model.model_validate(data)``; on failure record each error at its key path.

        ``extra_keys`` are keys the caller already consumed (``type``), offered as
        suggestions for misspellings. A plugin model that raises anything but a validation
        error is reported as a problem of that plugin, never propagated.
        """
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            found: dict[KeyPath, list[str]] = {}
            for err in exc.errors(include_url=False, include_input=False):
                loc, message = self._translate(model, data, err, extra_keys)
                messages = found.setdefault((*path, *loc), [])
                if message not in messages:
                    messages.append(message)
            for where, messages in found.items():
                self.add(where, " or ".join(messages) if len(messages) > 1 else messages[0])
        except Exception as exc:
            self.add(path, f"{model.__module__}.{model.__qualname__} failed while validating "
                           f"({type(exc).__name__}); this is a bug in that plugin")
        return None

    @staticmethod
    def _translate(model: type[BaseModel], data: Any, err: Mapping[str, Any],
                   extra_keys: Sequence[str]) -> tuple[KeyPath, str]:
        # Keep only the parts of pydantic's location that exist in the data: the rest are
        # union member tags and validator names, meaningless to someone editing TOML.
        loc: list[str | int] = []
        node: Any = data
        raw_loc = list(err["loc"])
        for i, part in enumerate(raw_loc):
            if (isinstance(node, dict) and part in node) or (
                    isinstance(node, list) and isinstance(part, int) and part < len(node)):
                loc.append(part)
                node = node[part]
            elif i == len(raw_loc) - 1 and isinstance(node, dict):
                loc.append(part)  # a missing key
                node = None
        kind = err["type"]
        message = str(err["msg"])
        if kind == "extra_forbidden" and loc:
            owner = _model_at(model, loc[:-1])
            known = [*(_model_keys(owner) if owner else []), *(extra_keys if len(loc) == 1
                                                               else ())]
            message = _unknown_key(str(loc[-1]), [k for k in known if k != "line"])
        elif kind == "missing" and loc:
            message = f'missing required key "{loc[-1]}"'
        elif kind in ("value_error", "assertion_error"):
            message = re.sub(r"^(Value|Assertion) error, ", "", message)
        elif kind == "model_type" or kind == "dict_type":
            message = "must be a table"
        return tuple(loc), message

    # The sections, in file order.

    def run(self) -> Policies | None:
        doc = self.doc
        for key in doc:
            if key not in _TOP_KEYS:
                self.add((key,), _unknown_key(key, _TOP_KEYS))
        settings = self._settings()
        vault_names = self._names("vaults")
        provider_names = self._names("providers")
        vaults = self._vaults(vault_names)
        providers, provider_classes = self._providers(provider_names)
        self._secret_refs(vault_names)
        credentials = self._credentials(settings, vault_names, provider_names, provider_classes,
                                        providers)
        notify = self._notify(vault_names)
        proxy = self._proxy(credentials)
        if self.problems:
            return None
        return Policies(source=self.source, settings=settings, vaults=vaults,
                        providers=providers, credentials=tuple(credentials), notify=notify,
                        proxy=proxy)

    def _table(self, key: str) -> dict[str, Any]:
        value = self.doc.get(key, {})
        if not isinstance(value, dict):
            self.add((key,), f"[{key}] must be a table")
            return {}
        return value

    def _settings(self) -> RotatorSettings:
        raw = self._table("rotator")
        if isinstance(raw.get("state_url"), dict):
            url = self._state_url_from(raw["state_url"])
            raw = {k: v for k, v in raw.items() if k != "state_url"}
            if url is not None:  # else a problem is said already
                raw["state_url"] = url
        settings = self.validate(RotatorSettings, raw, ("rotator",))
        if settings is None:
            # Keep checking the credentials with whatever defaults did validate.
            good = {k: v for k, v in raw.items()
                    if k in RotatorSettings.model_fields
                    and self.validate_quietly(RotatorSettings, {k: v})}
            settings = RotatorSettings.model_validate(good)
        return settings

    def _state_url_from(self, value: dict[str, Any]) -> Any:
        """``state_url = { env = ... }`` or ``{ file = ... }``: the whole URL, password
        included, kept out of the policy file. Not from a vault: the state store opens first."""
        where = ("rotator", "state_url")
        ref = self.validate(SecretRef, value, where)
        if ref is None:
            return None
        if ref.env is not None:
            url = os.environ.get(ref.env)
            if not url:
                self.add(where, f"environment variable {ref.env} is not set: it should hold "
                                "the state database URL")
            return url
        if ref.file is not None:
            try:
                return Path(ref.file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.add(where, f"cannot read {ref.file}: {exc.strerror}")
                return None
        self.add(where, "state_url cannot come from a vault (rotator opens its state store "
                        'first): use { env = "ROTATOR_STATE_URL" } or { file = ... }')
        return None

    @staticmethod
    def validate_quietly(model: type[BaseModel], data: Any) -> bool:
        try:
            model.model_validate(data)
        except Exception:
            return False
        return True

    def _names(self, section: str) -> list[str]:
        table = self._table(section)
        names = []
        for name, body in table.items():
            try:
                _check_name(name)
            except ValueError as exc:
                self.add((section, name), str(exc))
            if not isinstance(body, dict):
                self.add((section, name), f"[{section}.{name}] must be a table with a type")
                continue
            names.append(name)
        return names

    def _plugin_class(self, section: str, name: str, body: dict[str, Any]) -> type | None:
        kind = "vault" if section == "vaults" else "provider"
        known = plugins.vault_types() if kind == "vault" else plugins.provider_types()
        type_name = body.get("type")
        if type_name is None:
            self.add((section, name), f"missing required key \"type\" (the {kind} type; "
                                      f"known: {', '.join(known) or 'none installed'})")
            return None
        if not isinstance(type_name, str) or type_name not in known:
            shown = f'"{type_name}"' if isinstance(type_name, str) else "this"
            close = (difflib.get_close_matches(type_name, known, n=1)
                     if isinstance(type_name, str) else [])
            hint = f'did you mean "{close[0]}"? ' if close else ""
            self.add((section, name, "type"),
                     f"unknown {kind} type {shown} ({hint}known: "
                     f"{', '.join(known) or 'none installed'})")
            return None
        try:
            if kind == "vault":
                return plugins.vault_class(type_name)
            return plugins.provider_class(type_name)
        except PluginError as exc:
            self.add((section, name, "type"), str(exc))
        except Exception as exc:
            self.add((section, name, "type"),
                     f"{kind} plugin {type_name!r} failed to load ({type(exc).__name__})")
        return None

    def _vaults(self, names: list[str]) -> dict[str, VaultConfig]:
        table = self._table("vaults")
        out: dict[str, VaultConfig] = {}
        for name in names:
            body = table[name]
            cls = self._plugin_class("vaults", name, body)
            if cls is None:
                continue
            rest = {k: v for k, v in body.items() if k != "type"}
            settings = self.validate(cls.settings_model, rest, ("vaults", name), ("type",))
            if settings is not None:
                out[name] = VaultConfig(name=name, type=body["type"], settings=settings)
        return out

    def _providers(self, names: list[str]
                   ) -> tuple[dict[str, ProviderConfig], dict[str, type]]:
        table = self._table("providers")
        out: dict[str, ProviderConfig] = {}
        classes: dict[str, type] = {}
        for name in names:
            body = table[name]
            cls = self._plugin_class("providers", name, body)
            if cls is None:
                continue
            classes[name] = cls
            rest = {k: v for k, v in body.items() if k != "type"}
            settings = self.validate(cls.settings_model, rest, ("providers", name), ("type",))
            if settings is not None:
                out[name] = ProviderConfig(name=name, type=body["type"], settings=settings)
        return out, classes

    def _secrets_rotator_reads(self) -> dict[tuple[str, str, str], KeyPath]:
        """(vault, path, field) of every secret reference in the vaults, providers and notify
        sections: rotator's own credentials, which no agent may be given."""
        own: dict[tuple[str, str, str], KeyPath] = {}
        for section in ("vaults", "providers", "notify"):
            for name, body in self._table(section).items():
                for path, ref in _refs_in(body, (section, name)):
                    key = (ref.get("vault"), ref.get("path"), ref.get("field"))
                    if all(isinstance(k, str) for k in key):
                        own.setdefault(typing.cast(tuple[str, str, str], key), path)
        return own

    def _secret_refs(self, vault_names: list[str]) -> None:
        """Secret references in plugin settings are well formed and name a defined vault.

        Checked here, not only by the plugins, so that a plugin typing its setting loosely
        (a plain dict) still gets them checked; identical messages are merged in the report.
        """
        for section in ("vaults", "providers"):
            for name, body in self._table(section).items():
                if not isinstance(body, dict):
                    continue
                for key, value in body.items():
                    if isinstance(value, dict) and _secret_key_name(key):
                        self.validate(SecretRef, value, (section, name, key))
                for path, ref in _refs_in(body, (section, name)):
                    target = ref.get("vault")
                    if not isinstance(target, str):
                        continue
                    if target not in vault_names:
                        self.add((*path, "vault"),
                                 _unknown_name("vault", target, vault_names, "vaults"))
                    elif section == "vaults" and target == name:
                        self.add((*path, "vault"), f'vault "{name}" cannot read its own login '
                                                   "secret from itself; use env or file")

    def _credentials(self, settings: RotatorSettings, vault_names: list[str],
                     provider_names: list[str], provider_classes: dict[str, type],
                     providers: dict[str, ProviderConfig]) -> list[CredentialConfig]:
        raw_list = self.doc.get("credentials", [])
        if not isinstance(raw_list, list):
            self.add(("credentials",), "credentials must be an array of tables: write "
                                       "[[credentials]] sections")
            return []
        if not raw_list:
            # An empty or truncated file must not pass: a daemon reloading it would silently
            # stop managing every credential.
            self.add(("credentials",), "the policy file has no [[credentials]]: nothing to "
                                       "rotate (see rotation-policies.toml for an example)")
            return []
        out: list[CredentialConfig] = []
        names: dict[str, int] = {}
        targets: dict[tuple[str, str, str], int] = {}
        own = self._secrets_rotator_reads()
        for i, raw in enumerate(raw_list):
            path: KeyPath = ("credentials", i)
            if not isinstance(raw, dict):
                self.add(path, "each credential must be a table ([[credentials]])")
                continue
            data = dict(raw)
            if "line" in data:
                self.add((*path, "line"), _unknown_key("line", [
                    k for k in CredentialConfig.model_fields if k != "line"]))
                del data["line"]
            data["line"] = self.locator.line_for(path) or 0

            name = data.get("name")
            if isinstance(name, str):
                if name in names:
                    first = self.locator.line_for(("credentials", names[name]))
                    at = f" (first at line {first})" if first else ""
                    self.add((*path, "name"), f'duplicate credential name "{name}"{at}')
                else:
                    names[name] = i

            provider = data.get("provider")
            cls = None
            if isinstance(provider, str):
                if provider not in provider_names:
                    self.add((*path, "provider"),
                             _unknown_name("provider", provider, provider_names, "providers"))
                cls = provider_classes.get(provider)
            vault = data.get("vault")
            if isinstance(vault, str) and vault not in vault_names:
                self.add((*path, "vault"), _unknown_name("vault", vault, vault_names, "vaults"))
            target = (vault, data.get("path"), data.get("field"))
            if all(isinstance(t, str) for t in target):
                key = typing.cast(tuple[str, str, str], target)
                if key in targets:
                    self.add((*path, "field"), "another credential (credentials"
                             f"[{targets[key]}]) already rotates this vault path and field")
                else:
                    targets[key] = i
                if key in own:
                    self.add((*path, "path"), (
                        f"this vault path and field hold {format_key(own[key])}, a secret "
                        "rotator itself reads: the agent would be handed it and the first "
                        "rotation would overwrite it; give the credential its own path"))

            manual = data.get("manual_only") is True
            if cls is not None and not cls.capabilities.create and not manual:
                self.add((*path, "provider"),
                         f'provider "{provider}" (type {cls.type_name}) cannot create keys, so '
                         "scheduled rotation is impossible: set manual_only = true (without "
                         "interval or schedule) and revoke it with "
                         "rotator rotate-now --revoke-first")

            params = data.get("params", {})
            if cls is not None:
                if isinstance(params, dict):
                    validated = self.validate(cls.params_model, params, (*path, "params"))
                    if validated is not None and provider in providers:
                        self._check_params(cls, providers[provider].settings, validated,
                                           (*path, "params"))
                else:
                    validated = None
                    self.add((*path, "params"), "params must be a table")
                data["params"] = validated if validated is not None else PluginSettings()
            else:
                data["params"] = PluginSettings()

            # Cross-field rules are checked here rather than only in the model, so they are
            # reported even when another field of the same credential is also wrong.
            if manual:
                for key in ("interval", "schedule", "window"):
                    if key in data:
                        self.add((*path, key), "manual_only credentials are never rotated by "
                                               f"schedule: remove {key}")
                        del data[key]
            elif "interval" in data and "schedule" in data:
                self.add((*path, "schedule"), "give interval or schedule, not both")
                del data["schedule"]
            if not manual and data.get("interval") is None and data.get("schedule") is None:
                data["interval"] = settings.default_interval
            data.setdefault("grace", settings.default_grace)
            self._usage_settings(data, path, cls, provider,
                                 providers[provider].settings if isinstance(provider, str)
                                 and provider in providers else None)
            self._key_terms(data, path, cls, provider)
            cred = self.validate(CredentialConfig, data, path)
            if cred is not None:
                out.append(cred)
        return out

    def _usage_settings(self, data: dict[str, Any], path: KeyPath, cls: type | None,
                        provider: Any, provider_settings: PluginSettings | None) -> None:
        """Merge ``[rotator.misuse]`` into the credential's own rules, rule by rule and key by
        key, where its provider reports usage. Rules or ``revoke_when = "quiet"`` written for a
        credential whose provider cannot report usage are errors: they would never fire."""
        from rotator.interfaces import UsageReport

        widths: tuple[timedelta, ...] = ()
        if cls is not None and issubclass(cls, UsageReport):
            widths = (cls.usage_widths_for(provider_settings) if provider_settings is not None
                      else cls.usage_widths)
        reports = bool(widths)
        own = data.get("misuse")
        if isinstance(own, dict) and own.get("source") == "proxy":
            self._proxy_usage(data, path, own)
            return
        if cls is not None and not reports:
            type_name = getattr(cls, "type_name", "?")
            if own is not None:
                self.add((*path, "misuse"), (
                    f'provider "{provider}" (type {type_name}) cannot report usage per key, so '
                    "these rules could never fire: remove misuse here (providers that can: "
                    f"{', '.join(usage_provider_types()) or 'none installed'})"))
            if data.get("revoke_when") == "quiet":
                self.add((*path, "revoke_when"), (
                    f'provider "{provider}" (type {type_name}) cannot report usage per key, so '
                    'rotator cannot see the old key go quiet: use revoke_when = "grace"'))
            data.pop("misuse", None)
            return
        if cls is None:
            data.pop("misuse", None)
            return
        defaults = self._table("rotator").get("misuse", {})
        if not isinstance(defaults, dict) or not self.validate_quietly(MisuseRules, defaults):
            defaults = {}  # its own problems are said at [rotator.misuse]
        if own is not None and not isinstance(own, dict):
            self.add((*path, "misuse"), "misuse must be a table of rules (spike, outside, "
                                        "old_key, daily_cap)")
            own = {}
        merged = dict(defaults)
        for rule, body in (own or {}).items():
            base = defaults.get(rule)
            merged[rule] = ({**base, **body} if isinstance(base, dict) and isinstance(body, dict)
                            else body)
        rules = self.validate(MisuseRules, merged, (*path, "misuse"))
        data["misuse"] = rules if rules is not None else MisuseRules()
        if isinstance(own, dict) and own.get("outside") is not None \
                and min(widths, default=timedelta(0)) > timedelta(hours=1):
            self.add((*path, "misuse", "outside"), (
                f'provider "{provider}" reports usage per day only, so use outside a window '
                "cannot be seen: remove outside (a daily_cap or spike still work)"))
        if data.get("revoke_when") == "quiet" and timedelta(minutes=1) not in widths:
            self.add((*path, "revoke_when"), (
                f'provider "{provider}" reports no usage per minute, so rotator cannot see '
                'the old key go quiet: use revoke_when = "grace"'))
        if data.get("revoke_when") == "quiet":
            quiet = data.get("quiet_for", "10m")
            grace = data.get("grace")
            try:
                quiet_td = _duration(quiet)
                grace_td = _duration(grace)
            except ValueError:
                return  # said by the model's own validation
            if quiet_td <= timedelta(0) or quiet_td >= grace_td:
                self.add((*path, "quiet_for"), (
                    f"quiet_for must be longer than 0s and shorter than grace ({grace}): grace "
                    "is the upper bound on waiting for the old key to go quiet"))

    def _proxy_usage(self, data: dict[str, Any], path: KeyPath, own: dict[str, Any]) -> None:
        """``source = "proxy"``: the rules judge the calls the credential proxy forwarded with
        this credential, so a route must attach it; the proxy counts requests (never tokens or
        cost, it reads no body) and always attaches the current key (so ``old_key`` and
        ``revoke_when = "quiet"`` need the provider's own records)."""
        name = data.get("name")
        routes = self._table("proxy").get("routes", {})
        if not any(isinstance(r, dict) and r.get("credential") == name
                   for r in (routes.values() if isinstance(routes, dict) else ())):
            self.add((*path, "misuse", "source"), (
                f'no [proxy.routes] route attaches credential "{name}", so the proxy never '
                "counts its calls: add a route with credential = this one, or use source = "
                '"provider"'))
        defaults = self._table("rotator").get("misuse", {})
        if not isinstance(defaults, dict) or not self.validate_quietly(MisuseRules, defaults):
            defaults = {}  # its own problems are said at [rotator.misuse]
        merged = dict(defaults)
        for rule, body in own.items():
            base = merged.get(rule)
            merged[rule] = ({**base, **body} if isinstance(base, dict) and isinstance(body, dict)
                            else body)
        if isinstance(own.get("old_key"), dict) and own["old_key"].get("action") != "off":
            self.add((*path, "misuse", "old_key"), (
                "the proxy always attaches the current key, so it cannot see an old key used: "
                'old_key needs source = "provider"'))
        merged["old_key"] = None
        cap = merged.get("daily_cap")
        if isinstance(cap, dict) and (cap.get("tokens") is not None
                                      or cap.get("cost") is not None):
            self.add((*path, "misuse", "daily_cap"), (
                "the proxy counts requests, not tokens or cost (it never reads a body): cap "
                'requests, or use source = "provider"'))
        if data.get("revoke_when") == "quiet":
            self.add((*path, "revoke_when"), (
                "the proxy attaches only the current key, so it cannot see the old one go "
                'quiet: use revoke_when = "grace" (or misuse source = "provider")'))
        rules = self.validate(MisuseRules, merged, (*path, "misuse"))
        data["misuse"] = rules if rules is not None else MisuseRules(source="proxy",
                                                                     old_key=None)

    def _key_terms(self, data: dict[str, Any], path: KeyPath, cls: type | None,
                   provider: Any) -> None:
        """``key_ttl`` and ``budget`` need a provider that puts them on its keys (and creates
        keys); ``key_ttl`` needs room for the longest gap between rotations plus grace: a key
        must never expire before its successor replaced it."""
        from rotator.interfaces import KeyTerms

        for key in ("key_ttl", "budget"):
            if data.get(key) is None:
                continue
            type_name = getattr(cls, "type_name", "?")
            what = "keys that expire" if key == "key_ttl" else "keys with a spending limit"
            if cls is not None and (not issubclass(cls, KeyTerms) or (
                    key == "key_ttl" and not cls.expires) or (
                    key == "budget" and not cls.budget_periods)):
                self.add((*path, key), f'provider "{provider}" (type {type_name}) cannot '
                                       f"create {what}: remove {key}")
                data.pop(key)
            elif data.get("manual_only") is True:
                self.add((*path, key), f"manual_only credentials never get a key from "
                                       f"rotator: remove {key}")
                data.pop(key)
        budget = data.get("budget")
        if isinstance(budget, dict) and cls is not None and issubclass(cls, KeyTerms):
            per = budget.get("per")
            if per in (None, *BUDGET_PERIODS) and per not in cls.budget_periods:
                shown = ", ".join(p or "a lifetime limit" for p in cls.budget_periods)
                self.add((*path, "budget", "per"), (
                    f'provider "{provider}" cannot reset a budget per {per or "lifetime"}; '
                    f"it can: {shown}"))
        ttl_raw = data.get("key_ttl")
        if ttl_raw is None:
            return
        where = (*path, "key_ttl")
        try:
            ttl, grace = _duration(ttl_raw), _duration(data.get("grace"))
        except ValueError:
            return  # said by the model's own validation
        limit = getattr(cls, "max_key_ttl", None)
        if limit is not None and ttl > limit:
            self.add(where, f"the provider accepts an expiry of at most "
                            f"{format_duration(limit)}: lower key_ttl (and the interval)")
        try:
            gap = (_duration(data["interval"]) if data.get("interval") is not None
                   else longest_gap(data["schedule"]) if data.get("schedule") else None)
        except (ValueError, KeyError, TypeError):
            return
        if gap is not None and ttl < gap + grace:
            self.add(where, (
                f"key_ttl {format_duration(ttl)} is shorter than the time between rotations "
                f"plus grace ({format_duration(gap + grace)}): a key would expire before "
                "its successor replaced it; make key_ttl longer (with a margin for a failed "
                "rotation to be retried)"))

    def _check_params(self, cls: type[Provider], settings: PluginSettings,
                      params: PluginSettings, path: KeyPath) -> None:
        """Record each problem the provider's ``check_params`` finds; a hook that raises is
        reported as a bug in that plugin, never propagated."""
        try:
            messages = cls.check_params(settings, params)
        except Exception as exc:
            self.add(path, f"{cls.__module__}.{cls.__qualname__}.check_params failed "
                           f"({type(exc).__name__}); this is a bug in that plugin")
            return
        for message in messages:
            self.add(path, message)

    def _notify(self, vault_names: list[str]) -> dict[str, NotifyConfig]:
        """``[notify.NAME]`` sections; references name a defined vault, and a credential
        filter without glob characters names a credential of the file."""
        out: dict[str, NotifyConfig] = {}
        if "notify" not in self.doc:
            return out
        table = self._table("notify")
        raw_creds = self.doc.get("credentials")
        cred_names = [c["name"] for c in raw_creds if isinstance(c, dict)
                      and isinstance(c.get("name"), str)] if isinstance(raw_creds, list) else []
        for name in self._names("notify"):
            body = table[name]
            for path, ref in _refs_in(body, ("notify", name)):
                target = ref.get("vault")
                if isinstance(target, str) and target not in vault_names:
                    self.add((*path, "vault"),
                             _unknown_name("vault", target, vault_names, "vaults"))
            patterns = body.get("credentials")
            for i, pattern in enumerate(patterns if isinstance(patterns, list) else ()):
                if (not isinstance(pattern, str) or not pattern or pattern in cred_names
                        or any(ch in pattern for ch in "*?[")):
                    continue
                where = ("notify", name, "credentials", i)
                if not NAME_PATTERN.fullmatch(pattern):  # not even a name: never echo it
                    self.add(where, f"not a credential name nor a glob pattern: {_NAME_RULE}")
                else:
                    self.add(where, _unknown_name("credential", pattern, cred_names,
                                                  "credentials")
                             + '; a glob like "research-agent/*" matches several')
            cfg = self.validate(NotifyConfig, body, ("notify", name))
            if cfg is not None:
                out[name] = cfg
        return out

    def _proxy(self, credentials: list[CredentialConfig]) -> Any:
        """``[proxy]``: its routes name credentials of this file, their prefixes do not
        overlap, and the signing credential is a ``signing-key`` one whose grace covers the
        longest token (a token never outlives the key that signed it)."""
        if "proxy" not in self.doc:
            return None
        from rotator.proxy.settings import ProxyConfig, RouteConfig

        table = self._table("proxy")
        raw_routes = table.get("routes", {})
        if not isinstance(raw_routes, dict):
            self.add(("proxy", "routes"), "routes is a table of [proxy.routes.NAME] sections")
            raw_routes = {}
        names = [c["name"] for c in self.doc.get("credentials", [])
                 if isinstance(c, dict) and isinstance(c.get("name"), str)]
        routes = {}
        for name, body in raw_routes.items():  # each on its own: one bad route hides no other
            try:
                _check_name(name, "route name")
            except ValueError as exc:
                self.add(("proxy", "routes", name), str(exc))
            if isinstance(body, dict) and isinstance(body.get("credential"), str) \
                    and body["credential"] not in names:
                self.add(("proxy", "routes", name, "credential"),
                         _unknown_name("credential", body["credential"], names, "credentials"))
            route = self.validate(RouteConfig, body, ("proxy", "routes", name))
            if route is not None:
                routes[name] = route
        config = self.validate(ProxyConfig, {**table, "routes": {}}, ("proxy",))
        if config is None:
            return None
        config = config.model_copy(update={"routes": routes})
        vault_names = list(self._table("vaults"))
        for agent, kept in config.agents.items():
            where = ("proxy", "agents", agent)
            if kept.vault not in vault_names:
                self.add((*where, "vault"), _unknown_name("vault", kept.vault, vault_names,
                                                         "vaults"))
            for i, route_name in enumerate(kept.routes):
                if route_name not in raw_routes:
                    self.add((*where, "routes", i), _unknown_name(
                        "route", route_name, list(raw_routes), "proxy.routes"))
            if kept.ttl > config.max_token_ttl:
                self.add((*where, "ttl"), f"longer than max_token_ttl "
                                          f"({format_duration(config.max_token_ttl)})")
        by_name = {c.name: c for c in credentials}
        for name, other in config.overlaps():
            self.add(("proxy", "routes", name, "prefix"), (
                f'routes "{other}" ({config.prefix_of(other)}) and "{name}" '
                f"({config.prefix_of(name)}) overlap: one prefix contains the other; give "
                "each its own prefix"))
        signing = by_name.get(config.signing_credential)
        where = ("proxy", "signing_credential")
        if config.signing_credential not in names:
            self.add(where, _unknown_name("credential", config.signing_credential, names,
                                          "credentials"))
        elif signing is not None:
            kind = self.doc.get("providers", {}).get(signing.provider, {}).get("type")
            if kind != "signing-key":
                self.add(where, f'credential "{signing.name}" must use a provider of type '
                                f'"signing-key" (its provider "{signing.provider}" is {kind})')
            elif signing.grace < config.max_token_ttl:
                self.add(where, (
                    f'the grace of "{signing.name}" ({format_duration(signing.grace)}) is '
                    f"shorter than max_token_ttl ({format_duration(config.max_token_ttl)}): "
                    "tokens it signed would stop working before they expire; make its grace "
                    "at least max_token_ttl"))
        return config

    def report(self, scrub: Sequence[str] = ()) -> list[Problem]:
        """The problems as sorted :class:`Problem`, with any secret value blanked out."""
        problems = []
        for path, message in self.problems:
            for value in scrub:
                if value and len(value) >= 4:
                    message = message.replace(value, "<redacted>")
            problems.append(Problem(self.file, self.locator.line_for(path), format_key(path),
                                    message))
        unique = list(dict.fromkeys(problems))
        unique.sort(key=lambda p: (p.line is None, p.line or 0, p.key))
        return unique


def usage_provider_types() -> list[str]:
    """Installed provider types that report usage per key."""
    from rotator.interfaces import UsageReport

    names = []
    for name in plugins.provider_types():
        with contextlib.suppress(Exception):
            if issubclass(plugins.provider_class(name), UsageReport):
                names.append(name)
    return names


def _refs_in(node: Any, path: KeyPath) -> Iterator[tuple[KeyPath, dict[str, Any]]]:
    """Tables shaped like a :class:`SecretRef` with a ``vault`` key, anywhere under ``node``."""
    if isinstance(node, dict):
        if "vault" in node and set(node) <= _SECRET_REF_KEYS:
            yield path, node
            return
        for key, value in node.items():
            yield from _refs_in(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _refs_in(value, (*path, index))


def _fill_ins(node: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, str]]:
    """Strings a draft policy left for the operator: they start with ``FILL IN``."""
    if isinstance(node, str):
        if node.startswith("FILL IN"):
            yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _fill_ins(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _fill_ins(value, (*path, index))


def _under(path: KeyPath, prefixes: Sequence[KeyPath]) -> bool:
    return any(path[:len(p)] == p for p in prefixes)


STATE_URL_PASSWORD = (
    "a password never goes in the policy file: leave it out of state_url and set PGPASSWORD "
    "(or a ~/.pgpass file), or give the whole URL as state_url = { env = \"ROTATOR_STATE_URL\" }"
    " or { file = ... }")


# -- entry points ----------------------------------------------------------------------------

CONFIG_ENV = "ROTATOR_CONFIG"
DEFAULT_CONFIG_FILE = "rotation-policies.toml"


def resolve_config_path(option: str | None) -> Path:
    """The policy file to use: ``-c PATH`` if given, else ``$ROTATOR_CONFIG``, else
    ``./rotation-policies.toml``."""
    if option:
        return Path(option)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path(DEFAULT_CONFIG_FILE)


def load_policies(path: Path | str) -> Policies:
    """Read and validate the policy file at ``path``.

    Returns :class:`Policies`, or raises :class:`~rotator.errors.ConfigError` whose
    ``problems`` (:class:`Problem`, sorted by line) list everything wrong. Never raises
    anything else, whatever the file holds.
    """
    source = Path(path)
    file = str(source)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem(file, None, "", (
            f"no policy file at {source}: create it (the repository's rotation-policies.toml "
            f"is a commented example), or point at yours with -c PATH or ${CONFIG_ENV}"))]
        ) from None
    except IsADirectoryError:
        raise ConfigError([Problem(file, None, "", "is a directory, not a policy file; "
                                   "point at the file with -c PATH or $ROTATOR_CONFIG")]
                          ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError([Problem(file, None, "", f"cannot read the policy file: {reason}")]
                          ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError([Problem(file, line, "", "the policy file is not UTF-8 text")]
                          ) from None
    policies = parse_policies(text, source)
    state_url = _anchor_sqlite_path(policies.settings.state_url, source)
    if state_url == policies.settings.state_url:
        return policies
    settings = policies.settings.model_copy(update={"state_url": state_url})
    return policies.model_copy(update={"settings": settings})


def _anchor_sqlite_path(url: str, source: Path) -> str:
    """``url`` with a relative SQLite database path made absolute against the directory of
    the policy file ``source``, so the daemon and a ``rotate-now`` run from elsewhere use
    the same store. In-memory databases, absolute paths, SQLite URI filenames and other
    databases are returned unchanged (and so is anything SQLAlchemy cannot parse)."""
    if not url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url  # only here: ``check`` need not load it otherwise

    try:
        parsed = make_url(url)
    except Exception:
        return url
    database = parsed.database
    if (parsed.get_backend_name() != "sqlite" or not database or database == ":memory:"
            or database.startswith("file:") or os.path.isabs(database)):
        return url
    # abspath, not resolve(): a symlinked policy file (a Kubernetes ConfigMap) must not tie
    # the store to the link's current target.
    anchored = os.path.join(os.path.dirname(os.path.abspath(source)), database)
    return parsed.set(database=anchored).render_as_string(hide_password=False)


def parse_policies(text: str, source: Path | str = DEFAULT_CONFIG_FILE) -> Policies:
    """Validate policy-file ``text`` as if read from ``source`` (which is not opened)."""
    source = Path(source)
    file = str(source)
    try:
        return _parse(text, source)
    except ConfigError:
        raise
    except Exception as exc:  # never a traceback: the promise of this module
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
                 if tb is not None else "")
        raise ConfigError([Problem(file, None, "", (
            f"rotator could not validate this file ({type(exc).__name__}{where}); this is a "
            "bug in rotator, please report it"))]) from None


def _parse(text: str, source: Path) -> Policies:
    file = str(source)
    # Some editors start UTF-8 files with a byte order mark; TOML has no use for it. It sits
    # on line 1 and contains no newline, so every line number stays right.
    text = text.removeprefix("\ufeff")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        line = int(match.group(1)) if match else None
        if match is None and "end of document" in message:
            line = text.count("\n") + 1
        detail = _TOML_POSITION.sub("", message).replace(" (at end of document)", "")
        column = f" (column {match.group(2)})" if match else ""
        raise ConfigError([Problem(file, line, "", f"invalid TOML: {detail}{column}")]
                          ) from None
    except RecursionError:
        raise ConfigError([Problem(file, None, "", "invalid TOML: nested too deeply")]
                          ) from None
    except ValueError:  # not a TOMLDecodeError: an integer beyond Python's digit limit
        raise ConfigError([Problem(file, None, "", "invalid TOML: a number is too large")]
                          ) from None
    checker = _Checker(source, text, doc)
    suspects: list[str] = []
    secrets = list(_find_secrets(doc, suspects=suspects))
    policies = checker.run()
    fill_ins = list(_fill_ins(doc))
    if fill_ins:
        # A draft's placeholders (rotator scan --policy-out): what only the operator knows.
        # One message each: what else was said of that key is about the placeholder.
        paths = [path for path, _value in fill_ins]
        checker.problems = [(p, m) for p, m in checker.problems if not _under(p, paths)]
        for path, value in fill_ins:
            checker.add(path, f'still a placeholder ("{value}"): replace it with the real '
                              "value")
        policies = None
    if secrets:
        secret_paths = [path for path, _value in secrets]
        # Whatever else was said about a secret's key may quote it: only this problem stays.
        checker.problems = [(p, m) for p, m in checker.problems if not _under(p, secret_paths)]
        for path, _value in secrets:
            checker.add(path, STATE_URL_PASSWORD if path == ("rotator", "state_url")
                        else SECRETS_NEVER_HERE)
        policies = None
    if policies is None:
        raise ConfigError(checker.report(scrub=[*(value for _path, value in secrets),
                                                *suspects]))
    return policies
