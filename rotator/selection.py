"""Which credentials a command is about: names, ``--agent``, ``--provider`` or ``--all``.

One resolver for every command that takes them (``rotate-now``, ``status``, ``plan``,
``history``), so a typo gets the same answer everywhere: what was not found, the closest name,
and, for a name that is an agent or a provider rather than a credential, the option to use.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from rotator.config import CredentialConfig, Policies
from rotator.errors import PermanentError

__all__ = ["SelectionError", "select_credentials"]


class SelectionError(PermanentError):
    """A name an operator typed matches nothing; the message says what might have been meant."""


def _closest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _unknown_credential(policies: Policies, name: str) -> str:
    agents = {c.agent for c in policies.credentials}
    providers = {c.provider for c in policies.credentials}
    if name in agents:
        return f'"{name}" is an agent, not a credential: use --agent {name}'
    if name in providers:
        return f'"{name}" is a provider, not a credential: use --provider {name}'
    by_prefix = [c.name for c in policies.credentials if c.name.startswith(f"{name}/")]
    hint = _closest(name, (c.name for c in policies.credentials))
    if by_prefix and not hint:
        hint = f' (did you mean "{by_prefix[0]}"?)'
    return f'no credential named "{name}"{hint}'


def select_credentials(policies: Policies, names: Sequence[str] = (), agent: str | None = None,
                       provider: str | None = None, all_: bool = False, *,
                       allow_unknown: Iterable[str] = ()) -> list[CredentialConfig]:
    """The credentials the options name, in policy-file order (every one when none is given
    and ``all_`` is not required by the caller). Unknown names, agents and providers raise
    :class:`SelectionError` listing each with its likely meaning; ``allow_unknown`` names are
    let through (``history`` of a credential since removed from the file)."""
    known = {c.name for c in policies.credentials}
    allowed = set(allow_unknown)
    problems = [_unknown_credential(policies, n) for n in names
                if n not in known and n not in allowed]
    agents = {c.agent for c in policies.credentials}
    if agent is not None and agent not in agents:
        problems.append(f'no agent "{agent}"{_closest(agent, agents)}')
    providers = {c.provider for c in policies.credentials}
    if provider is not None and provider not in providers:
        problems.append(f'no provider "{provider}" with credentials'
                        f'{_closest(provider, providers)}')
    if problems:
        raise SelectionError(f"{policies.source}: {'; '.join(problems)} (`rotator status` "
                             "lists the credentials)")
    if all_ or not (names or agent or provider):
        return list(policies.credentials)
    return [c for c in policies.credentials
            if c.name in names or c.agent == agent or c.provider == provider]
