"""Find provider and vault plugins through entry points, built-ins included.

Built-ins are registered in ``pyproject.toml`` the same way third-party plugins are, so there is
one discovery path. Only the entry point *names* are read until a plugin is asked for: loading a
plugin module (and its SDK) is deferred so ``rotator --help`` and ``rotator check`` stay fast.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from rotator.errors import PluginError
from rotator.interfaces import Provider, Vault

__all__ = ["PROVIDER_GROUP", "VAULT_GROUP", "provider_class", "provider_types", "vault_class",
           "vault_types"]

PROVIDER_GROUP = "rotator.providers"
VAULT_GROUP = "rotator.vaults"


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        other = found.get(ep.name)
        if other is not None and other.value != ep.value:
            raise PluginError(
                f"two plugins claim {group} type {ep.name!r}: {other.value} and {ep.value}; "
                "uninstall one of them"
            )
        found[ep.name] = ep
    return found


def _load(group: str, type_name: str, base: type) -> type:
    eps = _entry_points(group)
    ep = eps.get(type_name)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none installed"
        raise PluginError(f"unknown {group} type {type_name!r} (known: {known})")
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must be named, whatever it raised
        raise PluginError(
            f"plugin {type_name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"plugin {type_name!r} ({ep.value}) is not a {base.__name__} subclass")
    if cls.type_name != type_name:
        raise PluginError(
            f"plugin {ep.value} declares type_name {cls.type_name!r} but is registered as "
            f"{type_name!r}"
        )
    return cls


def provider_types() -> list[str]:
    return sorted(_entry_points(PROVIDER_GROUP))


def vault_types() -> list[str]:
    return sorted(_entry_points(VAULT_GROUP))


@functools.cache
def provider_class(type_name: str) -> type[Provider]:
    """The Provider subclass registered as ``type_name``; ``PluginError`` names what is wrong."""
    return _load(PROVIDER_GROUP, type_name, Provider)


@functools.cache
def vault_class(type_name: str) -> type[Vault]:
    """The Vault subclass registered as ``type_name``; ``PluginError`` names what is wrong."""
    return _load(VAULT_GROUP, type_name, Vault)
