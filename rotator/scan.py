"""``rotator scan``: the inventory of plaintext keys in a repository, before rotator manages them.

Detection is kingfisher's (``kingfisher-secret-scanner``, its Rust engine run in process: the
``scan`` extra; ``bench/scan_compare.py`` says why it and not detect-secrets). This module adds
what an operator migrating an agent fleet needs on top: which agent holds each key (from the
``agents/NAME/`` directory or the compose service around it), which keys several agents share,
the variable each sits in, keys that live on only in git history, and a fingerprint to tell
keys apart. A value never leaves this module: findings carry a short SHA-256 fingerprint.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rotator.errors import PermanentError
from rotator.interfaces import Secret

__all__ = ["Found", "Inventory", "fingerprint", "is_env_file", "scan"]

SKIP_DIRS = frozenset({".git", ".venv", "venv", "node_modules", "__pycache__", ".tox",
                       ".mypy_cache", ".ruff_cache"})
SERVICES = {
    "openai-api-key": ("openai", "API key"),
    "anthropic-api-key": ("anthropic", "API key"),
    "anthropic-admin-api-key": ("anthropic", "admin key"),
    "stripe-access-token": ("stripe", "secret or restricted key"),
    "aws-access-token": ("aws", "access key id"),
    "aws-secret-access-key": ("aws", "secret access key"),
    "generic-credential-uri": ("database", "URL with a password"),
}
"""kingfisher rule (its id without the catalog prefix) -> (service, credential type)."""
ENV_RULE = "env-secret-variable"
SERVICES[ENV_RULE] = ("unknown", "key of a service no rule knows")
PLACEHOLDERS = frozenset({"password", "passwd", "changeme", "secret", "example", "xxx",
                          "yourpassword", "your-password", "pass", "test"})
"""Passwords in a URL that say "fill me in", not a credential (`.env.example` files)."""
_ASSIGNMENT = re.compile(
    r"""^\s*(?:export\s+|-\s+)?["']?([A-Za-z_][A-Za-z0-9_.]*)["']?\s*(?::=|:|=)""")
_AGENT_DIR = re.compile(r"^(?:agents|services|apps)$")


@dataclass(frozen=True)
class Found:
    """One plaintext key at one place: never its value."""

    service: str
    kind: str
    rule: str
    path: str
    line: int
    variable: str | None
    agent: str | None
    fingerprint: str
    """The first 12 hex digits of the value's SHA-256: tells keys apart, reveals nothing."""
    commit: str | None = None
    """For a key found only in git history: the commit that still holds it."""
    shared_by: tuple[str, ...] = ()
    """Every agent holding the same key (two or more: one key for several agents)."""

    @property
    def where(self) -> str:
        place = f"{self.path}:{self.line}"
        return f"{place} (history, commit {self.commit[:10]})" if self.commit else place

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shared_by"] = list(self.shared_by)
        out["where"] = self.where
        return out


@dataclass
class Inventory:
    found: list[Found] = field(default_factory=list)
    files: int = 0
    history_versions: int = 0
    paths: dict[str, Path] = field(default_factory=dict)
    """A found key's ``path`` (relative, as reported) -> the file scanned there."""
    secrets: dict[str, Secret] = field(default_factory=dict, repr=False)
    """fingerprint -> the value, as a ``Secret``: for ``--verify`` and ``rotator import``, in
    this process only (never printed, never in ``as_json``)."""

    def value_of(self, found: Found) -> Secret:
        return self.secrets[found.fingerprint]

    def beside(self, found: Found, variable: str) -> Found | None:
        """The key assigned to ``variable`` in the same file (and commit) as ``found``: the
        access key id found beside an AWS secret key."""
        return next((f for f in self.found if f.variable == variable and f.path == found.path
                     and f.commit == found.commit and f is not found), None)


def fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not SKIP_DIRS.intersection(path.relative_to(root).parts):
            yield path


def _placeholder(rule: str, value: str) -> bool:
    if rule == "generic-credential-uri":  # the match is the URL's password
        return value.lower() in PLACEHOLDERS
    lowered = value.lower()
    return "xxxx" in lowered or "your" in lowered or "example" in lowered


def _variable(line_text: str, column: int) -> str | None:
    """The name the key is assigned to on its line (``OPENAI_API_KEY=``, ``key: ``,
    ``export X=``); ``column`` is where the key starts, counted from 0."""
    match = _ASSIGNMENT.match(line_text[:column])
    return match.group(1) if match else None


def _agent(path: Path, lines: list[str], line: int) -> str | None:
    """The agent a key belongs to: ``agents/NAME/...`` (or services/, apps/), else the compose
    service whose block holds the line, else the directory holding the file."""
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if _AGENT_DIR.match(part) and i + 1 < len(parts) - 1:
            return parts[i + 1]
    if path.name in ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml"):
        for text in reversed(lines[:line]):
            match = re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", text)
            if match:
                return match.group(1)
    return parts[-2] if len(parts) > 1 else None


def _scanner() -> Any:
    try:
        from kingfisher_sdk import Scanner
    except ImportError:
        raise PermanentError("rotator scan needs the kingfisher secret scanner: "
                             "pip install 'rotator[scan]'") from None
    return Scanner()


_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s"'`]+""")


def _findings(scanner: Any, data: bytes, lines: list[str]
              ) -> Iterator[tuple[str, str, int, int]]:
    """(rule, value, line, column) of each key in ``data``, placeholders left out. For a URL
    with a password the value is the whole URL (the credential an agent is given), and the
    column where it starts."""
    for finding in scanner.scan(data):
        rule = finding.rule_id.split(".", 1)[-1]
        value = finding.secret
        if not value or _placeholder(rule, value):
            continue
        line, column = finding.location["line"], finding.location.get("column", 0)
        if rule == "generic-credential-uri" and 0 < line <= len(lines):
            for url in _URL.finditer(lines[line - 1]):
                if url.start() <= column < url.end():
                    value, column = url.group(0), url.start()
        yield rule, value, line, column


def _found(rule: str, value: str, rel: Path, lines: list[str], line: int, column: int,
           commit: str | None = None) -> Found:
    service, kind = SERVICES.get(rule, (rule, "secret"))
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    if rule == ENV_RULE:  # the variable names the service: ACME_API_KEY -> acme
        column = len(text)
        name = _variable(text, column) or ""
        service = _SECRET_NAME.sub("", name).strip("_").lower() or "unknown"
    return Found(service, kind, rule, str(rel), line, _variable(text, column),
                 _agent(rel, lines, line), fingerprint(value), commit)


_ENV_FILE = re.compile(r"(^|/)(\.env(\..*)?|.*\.env)$")


def is_env_file(path: str) -> bool:
    """``.env``, ``.env.*`` or ``*.env``: where a line is ``NAME=value`` and nothing else."""
    return _ENV_FILE.search(path) is not None
_ENV_LINE = re.compile(r"""^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*["']?([^"'\s#]+)""")
_SECRET_NAME = re.compile(r"(API_?KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)$", re.I)


def _entropy(value: str) -> float:
    counts = {c: value.count(c) for c in set(value)}
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def _env_secrets(rel: Path, lines: list[str], known: set[int]) -> Iterator[tuple[str, int]]:
    """Keys of services no scanner rule knows, in `.env` files: a variable named like a key
    (``ACME_API_KEY``) holding a long, random-looking value. (value, line)"""
    if not is_env_file(rel.as_posix()):
        return
    for number, text in enumerate(lines, start=1):
        match = _ENV_LINE.match(text)
        if number in known or match is None or not _SECRET_NAME.search(match.group(1)):
            continue
        value = match.group(2)
        if len(value) >= 20 and _entropy(value) >= 3.5 and not _placeholder("", value):
            yield value, number


def scan(paths: Iterable[Path], *, git: bool = False) -> Inventory:
    """Scan files and directories (and, with ``git``, every commit of the repositories they
    are in, deleted files included); keys found in the tree are reported there, keys found
    only in history once per place they were committed."""
    scanner = _scanner()
    inventory = Inventory()
    seen: set[tuple[str, str, int]] = set()
    roots = [Path(p) for p in paths]
    for root in roots:
        if not root.exists():
            raise PermanentError(f"{root}: no such file or directory")
        base = root if root.is_dir() else root.parent
        for path in _files(root):
            data = path.read_bytes()
            inventory.files += 1
            rel = path.relative_to(base)
            inventory.paths[str(rel)] = path
            lines = data.decode("utf-8", "replace").splitlines()
            for rule, value, line, column in _findings(scanner, data, lines):
                if (fingerprint(value), str(rel), line) not in seen:
                    seen.add((fingerprint(value), str(rel), line))
                    inventory.secrets[fingerprint(value)] = Secret(value)
                    inventory.found.append(_found(rule, value, rel, lines, line, column))
            known = {line for _fp, path_, line in seen if path_ == str(rel)}
            for value, line in _env_secrets(rel, lines, known):
                seen.add((fingerprint(value), str(rel), line))
                inventory.secrets[fingerprint(value)] = Secret(value)
                inventory.found.append(_found(ENV_RULE, value, rel, lines, line, 0))
    if git:
        in_tree = {f.fingerprint for f in inventory.found}
        for root in roots:
            _scan_history(scanner, root, in_tree, inventory)
    _mark_shared(inventory)
    return inventory


def _scan_history(scanner: Any, root: Path, in_tree: set[str], inventory: Inventory) -> None:
    try:
        from kingfisher_sdk import git_inputs
    except ImportError:
        raise PermanentError("rotator scan --git needs the kingfisher secret scanner: "
                             "pip install 'rotator[scan]'") from None
    repo = root if root.is_dir() else root.parent
    places: dict[tuple[str, str, int], Found] = {}
    try:
        sources = list(git_inputs(str(repo)))
    except Exception as exc:  # not a repository, or one the engine cannot read
        raise PermanentError(f"{repo}: cannot read its git history ({exc}); scan without "
                             "--git, or point at the repository's root") from None
    for source in sources:
        data = source.data if source.data is not None else Path(source.file).read_bytes()
        inventory.history_versions += 1
        rel = Path(source.path)
        lines = data.decode("utf-8", "replace").splitlines()
        commits = [c.id for c in getattr(source, "origins", ())] or [source.commit or ""]
        for rule, value, line, column in _findings(scanner, data, lines):
            fp = fingerprint(value)
            if fp in in_tree or (fp, str(rel), line) in places:
                continue
            inventory.secrets[fp] = Secret(value)
            places[fp, str(rel), line] = _found(rule, value, rel, lines, line, column,
                                                commit=commits[0] or "unknown")
    inventory.found.extend(places.values())


def _mark_shared(inventory: Inventory) -> None:
    agents: dict[str, set[str]] = defaultdict(set)
    for f in inventory.found:
        if f.agent:
            agents[f.fingerprint].add(f.agent)
    inventory.found = sorted(
        (Found(**{**asdict(f), "shared_by": tuple(sorted(agents[f.fingerprint]))
                  if len(agents[f.fingerprint]) > 1 else ()}) for f in inventory.found),
        key=lambda f: (f.agent or "", f.service, f.path, f.line, f.commit or ""))
