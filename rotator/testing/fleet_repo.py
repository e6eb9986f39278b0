"""A git repository of an agent fleet the way teams have one before rotator: `.env` files.

Ten agents, each with a `.env` holding keys for OpenAI, Anthropic, a database URL and more;
some keys shared by several agents, one hardcoded in a script, one in a compose file, one
removed from the tree but still in git history; and look-alike values that are not secrets
(placeholders, hashes, UUIDs) a scanner must leave alone. Every planted key is recorded with
where it sits, so a scan can be checked for what it found and missed. Keys come from
``KeyMaker`` callables: the services' real shapes by default, or keys issued by the fakes.
"""

from __future__ import annotations

import hashlib
import os
import string
import subprocess
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rotator.testing.fake_openai import service_account_key_value
from rotator.testing.fake_server import random_text

__all__ = ["FleetRepo", "Planted", "build_fleet_repo", "default_key_makers"]

KeyMaker = Callable[[], str]
AGENTS = 10
_ALNUM = string.ascii_letters + string.digits


def default_key_makers() -> dict[str, KeyMaker]:
    """Keys in each service's published shape (nothing is asked of any service)."""
    return {
        "openai": service_account_key_value,
        "anthropic": lambda: "sk-ant-api03-" + random_text(93) + "AA",
        "stripe": lambda: "rk_live_" + random_text(99, _ALNUM),
        "aws_access_key_id": lambda: "AKIA" + random_text(16, string.ascii_uppercase + "234567"),
        "aws_secret_access_key": lambda: random_text(40, _ALNUM + "/+"),
        "postgres": lambda: (f"postgresql://app:{random_text(24, _ALNUM)}@db.internal:5432/"
                             "app"),
        "unknown": lambda: "acme_live_" + random_text(40, string.hexdigits.lower()[:16]),
    }


@dataclass
class Planted:
    """One secret value planted in the fixture, and every place it sits."""

    service: str
    variable: str
    value: str
    agents: list[str]
    places: list[tuple[str, int]] = field(default_factory=list)
    """(path relative to the repository, line) in the working tree."""
    history: list[str] = field(default_factory=list)
    """Paths it sat at in a commit but no longer sits at in the tree."""


@dataclass
class FleetRepo:
    root: Path
    planted: list[Planted]
    decoys: list[tuple[str, int]]
    """(path, line) of look-alike values that are not secrets."""

    def values(self) -> list[str]:
        return [p.value for p in self.planted]


class _Writer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, list[str]] = {}

    def line(self, path: str, text: str) -> int:
        lines = self.files.setdefault(path, [])
        lines.append(text)
        return len(lines)

    def flush(self) -> None:
        for path, lines in self.files.items():
            target = self.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(lines) + "\n")


def _git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "fleet", "GIT_AUTHOR_EMAIL": "fleet@example.com",
           "GIT_COMMITTER_NAME": "fleet", "GIT_COMMITTER_EMAIL": "fleet@example.com"}
    subprocess.run(["git", *args], cwd=root, check=True, env=env, capture_output=True)


def build_fleet_repo(root: Path, makers: Mapping[str, KeyMaker] | None = None) -> FleetRepo:
    """Write the fixture repository at ``root`` (a new directory) and commit it, with one key
    in history only. Returns what was planted where."""
    make = {**default_key_makers(), **(makers or {})}
    root.mkdir(parents=True)
    _git(root, "init", "-q", "-b", "main")
    w = _Writer(root)
    planted: list[Planted] = []
    decoys: list[tuple[str, int]] = []
    agents = [f"agent-{i:02d}" for i in range(AGENTS)]

    def plant(service: str, variable: str, owners: list[str]) -> Planted:
        p = Planted(service, variable, make[service](), owners)
        planted.append(p)
        return p

    anthropic = plant("anthropic", "ANTHROPIC_API_KEY", agents)  # one key for the whole fleet
    database = plant("postgres", "DATABASE_URL", agents)
    shared_openai = plant("openai", "OPENAI_API_KEY", agents[5:])
    stripe = plant("stripe", "STRIPE_SECRET_KEY", agents[1:3])
    aws_id = plant("aws_access_key_id", "AWS_ACCESS_KEY_ID", [agents[4]])
    aws_secret = plant("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", [agents[4]])
    unknown = plant("unknown", "ACME_API_KEY", [agents[6]])
    for i, agent in enumerate(agents):
        env = f"agents/{agent}/.env"
        w.line(env, f"# {agent}: configuration")
        openai = shared_openai if i >= 5 else plant("openai", "OPENAI_API_KEY", [agent])
        for p in (openai, anthropic, database):
            p.places.append((env, w.line(env, f"{p.variable}={p.value}")))
        if agent in stripe.agents:
            stripe.places.append((env, w.line(env, f"STRIPE_SECRET_KEY={stripe.value}")))
        if agent in aws_id.agents:
            aws_id.places.append((env, w.line(env, f"AWS_ACCESS_KEY_ID={aws_id.value}")))
            aws_secret.places.append(
                (env, w.line(env, f"AWS_SECRET_ACCESS_KEY={aws_secret.value}")))
        if agent in unknown.agents:
            unknown.places.append((env, w.line(env, f'ACME_API_KEY="{unknown.value}"')))
        w.line(env, "LOG_LEVEL=info")
        decoys.append((env, w.line(env, f"GIT_SHA={hashlib.sha1(agent.encode()).hexdigest()}")))
        decoys.append((env, w.line(env, f"INSTANCE_ID={uuid.uuid4()}")))
    # A key hardcoded in a script, and one in a compose file.
    script = "agents/agent-03/tools.py"
    hardcoded = plant("openai", "OPENAI_API_KEY", [agents[3]])
    w.line(script, "import os")
    w.line(script, "")
    hardcoded.places.append((script, w.line(script, f'CLIENT_KEY = "{hardcoded.value}"')))
    decoys.append((script, w.line(
        script, f'CACHE_KEY = "{hashlib.sha256(b"tools").hexdigest()}"')))
    compose = "docker-compose.yml"
    composed = plant("anthropic", "ANTHROPIC_API_KEY", [agents[8]])
    w.line(compose, "services:")
    w.line(compose, f"  {agents[8]}:")
    w.line(compose, "    image: fleet/agent:latest")
    w.line(compose, "    environment:")
    composed.places.append((compose, w.line(compose, f"      ANTHROPIC_API_KEY: {composed.value}")))
    # An example file and docs full of values that only look like keys.
    example = ".env.example"
    for text in ("OPENAI_API_KEY=your-openai-key-here", "ANTHROPIC_API_KEY=<your key>",
                 "STRIPE_SECRET_KEY=sk_live_xxxxxxxxxxxxxxxxxxxxxxxx",
                 "DATABASE_URL=postgresql://user:password@localhost:5432/app",
                 f"SESSION_ID={uuid.uuid4()}"):
        decoys.append((example, w.line(example, text)))
    w.flush()
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "fleet with .env files")
    # A key committed once, then removed: it lives on in history.
    old = "agents/agent-07/.env.production"
    gone = plant("openai", "OPENAI_API_KEY", [agents[7]])
    (root / old).write_text(f"OPENAI_API_KEY={gone.value}\n")
    gone.history.append(old)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "production settings")
    (root / old).unlink()
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "remove production settings")
    return FleetRepo(root, planted, decoys)
