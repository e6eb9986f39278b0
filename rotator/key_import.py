"""``rotator import``: move the keys a scan finds in files into the vault, one per credential.

Each credential of the policy file takes the key its agent holds in the variable named by its
``field`` (``agents/agent-03/.env``: ``OPENAI_API_KEY=...`` for ``agent = "agent-03"``, ``field =
"OPENAI_API_KEY"``), plus the companion fields its provider writes beside it (an AWS secret key's
access key id). The key is written with the vault's own two-phase write and no ``key_id``, so it
reads as adopted: the credential's first rotation identifies it at the provider, gives the agent
a key of its own and revokes the imported one after the grace period. A key several agents
shared becomes one credential per agent; the engine revokes it with the last of them.

A plan first (nothing written without ``apply``), idempotent (a key already in place is left
alone), and a vault secret holding a different key is never overwritten without ``force``.
``strip_env`` then replaces each imported line of a ``.env`` file with a comment saying where the
key lives now. Never a value in any output: rows carry fingerprints.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rotator.config import CredentialConfig, Policies
from rotator.errors import NotFound, RotatorError
from rotator.runtime import Runtime
from rotator.scan import Found, Inventory, fingerprint, is_env_file

__all__ = ["ImportRow", "apply_plan", "plan_import", "strip_env"]

ACTIONS = ("write", "overwrite", "unchanged", "conflict", "missing", "ambiguous", "failed")
"""``write``: the vault has no key there yet; ``overwrite``: it holds a different key and
``force`` was given; ``unchanged``: it already holds this key (a second run); ``conflict``: it
holds a different key (left alone without ``force``); ``missing``: no key for the credential
was found; ``ambiguous``: several different keys were found for it; ``failed``: the vault
refused (the row's ``detail`` says why)."""
PROBLEMS = frozenset({"conflict", "missing", "ambiguous", "failed"})


@dataclass
class ImportRow:
    credential: str
    agent: str
    target: str
    """``vault:path#field``."""
    action: str
    places: list[Found] = field(default_factory=list)
    detail: str = ""
    companions: dict[str, str] = field(default_factory=dict, repr=False)
    """Companion field -> its value found beside the key (never a secret: an access key id)."""
    shared_with: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str | None:
        return self.places[0].fingerprint if self.places else None

    def as_json(self) -> dict[str, Any]:
        return {"credential": self.credential, "agent": self.agent, "target": self.target,
                "action": self.action, "fingerprint": self.fingerprint,
                "from": [f.where for f in self.places], "detail": self.detail,
                "companion_fields": sorted(self.companions), "shared_with": self.shared_with}


def _candidates(inventory: Inventory, cred: CredentialConfig) -> list[Found]:
    return [f for f in inventory.found
            if f.commit is None and f.agent == cred.agent and f.variable == cred.field]


def plan_import(policies: Policies, runtime: Runtime, inventory: Inventory,
                credentials: list[CredentialConfig], *, force: bool = False) -> list[ImportRow]:
    """One row per credential: what importing would do, after reading the vault."""
    rows: list[ImportRow] = []
    for cred in credentials:
        target = f"{cred.vault}:{cred.path}#{cred.field}"
        row = ImportRow(cred.name, cred.agent, target, "missing")
        rows.append(row)
        found = _candidates(inventory, cred)
        if not found:
            try:
                there = runtime.vault(cred.vault).read(cred.path, cred.field).secret
            except NotFound:
                there = None
            except RotatorError as exc:
                row.action, row.detail = "failed", str(exc)
                continue
            if there is not None:
                row.action, row.detail = "unchanged", "no key in the files; the vault holds one"
            else:
                row.detail = (f"no {cred.field}= of agent {cred.agent} in the files scanned "
                              "(agents/AGENT/.env, a compose service, ...)")
            continue
        keys = sorted({f.fingerprint for f in found})
        row.places = found
        if len(keys) > 1:
            row.action = "ambiguous"
            row.detail = ("different keys in " + ", ".join(f"{f.where} ({f.fingerprint})"
                                                           for f in found)
                          + ": keep the one the agent uses, or import that file alone")
            continue
        provider = runtime.provider(cred.provider)
        wanted = provider.companion_fields(runtime.info(cred))
        for name in wanted:
            other = inventory.beside(found[0], name)
            if other is not None:
                row.companions[name] = inventory.value_of(other).reveal()
        try:
            current = runtime.vault(cred.vault).read(cred.path, cred.field, wanted)
        except NotFound:
            current = None
        except RotatorError as exc:
            row.action, row.detail = "failed", str(exc)
            continue
        held = current.secret if current is not None else None
        if held is None:
            row.action = "write"
        elif fingerprint(held.reveal()) == keys[0] and all(
                current.companions.get(k) == v for k, v in row.companions.items()):
            row.action = "unchanged"
            row.detail = "already in the vault"
        elif force:
            row.action = "overwrite"
            row.detail = f"replaces the vault's key {fingerprint(held.reveal())} (--force)"
        else:
            row.action = "conflict"
            row.detail = (f"the vault holds a different key ({fingerprint(held.reveal())}); "
                          "left alone: --force replaces it")
    by_key: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.fingerprint and row.action not in PROBLEMS:
            by_key[row.fingerprint].append(row.credential)
    for row in rows:
        if row.fingerprint and len(by_key[row.fingerprint]) > 1:
            row.shared_with = [n for n in by_key[row.fingerprint] if n != row.credential]
    return rows


def apply_plan(runtime: Runtime, inventory: Inventory, rows: list[ImportRow],
               credentials: dict[str, CredentialConfig]) -> None:
    """Write every ``write``/``overwrite`` row's key; a row the vault refuses becomes
    ``failed``. Written as rotator writes a new key (staged, then made current) but with no
    ``key_id``, so the first rotation adopts it."""
    for row in rows:
        if row.action not in ("write", "overwrite"):
            continue
        cred = credentials[row.credential]
        vault = runtime.vault(cred.vault)
        write_id = f"import-{row.fingerprint}"
        try:
            vault.stage(cred.path, cred.field, inventory.value_of(row.places[0]), write_id,
                        row.companions or None)
            vault.promote(cred.path, cred.field, write_id, {})
            vault.discard_staged(cred.path, write_id)
        except RotatorError as exc:
            row.action, row.detail = "failed", str(exc)
            continue
        row.detail = "written" if row.action == "write" else "overwritten (--force)"
        row.action = "written"


def _env_comment(row: ImportRow, cred: CredentialConfig) -> str:
    return (f"# {cred.field} now lives in vault {cred.vault!r} at {cred.path} (credential "
            f"{cred.name}); run the agent with: rotator exec --agent {cred.agent} -- COMMAND")


def strip_env(inventory: Inventory, rows: list[ImportRow],
              credentials: dict[str, CredentialConfig], *, apply: bool
              ) -> tuple[list[str], list[str]]:
    """Replace each imported key's line in a ``.env`` file with a comment (only with
    ``apply``; else say which lines would go). Returns (lines stripped, places to clean by
    hand: keys in code or compose files, whose syntax only their owner should edit)."""
    edits: dict[Path, dict[int, str]] = defaultdict(dict)
    stripped: list[str] = []
    by_hand: list[str] = []
    imported = ("written", "unchanged") if apply else ("write", "overwrite", "unchanged")
    for row in rows:
        if row.action not in imported:
            continue
        cred = credentials[row.credential]
        for place in row.places:
            path = inventory.paths.get(place.path)
            if path is None:
                continue
            if not is_env_file(place.path):
                by_hand.append(f"{place.where}: {cred.field} of {cred.agent} (now in the vault:"
                               " remove it from this file)")
                continue
            edits[path][place.line] = _env_comment(row, cred)
            stripped.append(f"{place.where}: {cred.field}")
    for path, lines_at in edits.items() if apply else ():
        lines = path.read_text().splitlines(keepends=True)
        for line, text in lines_at.items():
            if 0 < line <= len(lines):
                lines[line - 1] = text + "\n"
        _replace(path, "".join(lines))
    return stripped, by_hand


def _replace(path: Path, text: str) -> None:
    """Write ``text`` over ``path`` atomically, keeping its mode: a crash leaves the old file
    or the new one, never half of each."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
