"""``rotator scan --verify``: ask each key's service whether it still accepts the key.

A key found in a file or in git history is an incident while it is live and harmless once
revoked, so this is the question an operator asks after a migration (``scan --git --verify``:
no live key left in history). The providers of the policy file answer, through the optional
:class:`~rotator.interfaces.KeyProbe`: every provider whose type serves the key's service is
asked until one says the key is live. A verdict never carries a value.
"""

from __future__ import annotations

from dataclasses import dataclass

from rotator.errors import RotatorError
from rotator.interfaces import KeyProbe
from rotator.runtime import Runtime
from rotator.scan import Found, Inventory

__all__ = ["PROVIDER_TYPES", "Verdict", "companions_for", "probes_for", "verify"]

PROVIDER_TYPES = {"openai": "openai", "anthropic": "anthropic", "stripe": "stripe",
                  "aws": "aws-iam"}
"""Scanned service -> the provider type that can say whether its keys are live."""


@dataclass(frozen=True)
class Verdict:
    state: str
    """``live`` (an incident while it sits in a file or history), ``revoked``, or
    ``unchecked`` (see ``why``)."""
    why: str = ""

    def as_json(self) -> dict[str, str]:
        return {"state": self.state, "why": self.why}


def probes_for(runtime: Runtime, service: str) -> list[tuple[str, KeyProbe]]:
    """The policy's providers that can judge keys of ``service``, by name."""
    wanted = PROVIDER_TYPES.get(service)
    out = []
    for name, config in sorted(runtime.policies.providers.items()):
        if config.type == wanted:
            provider = runtime.provider(name)
            if isinstance(provider, KeyProbe):
                out.append((name, provider))
    return out


def _verdict(inventory: Inventory, found: Found, runtime: Runtime) -> Verdict:
    if found.service == "aws" and found.variable and "ACCESS_KEY_ID" in found.variable:
        secret = next((f for f in inventory.found if f.service == "aws" and f.path == found.path
                       and f.commit == found.commit and f is not found
                       and "ACCESS_KEY_ID" not in (f.variable or "")), None)
        if secret is None:
            return Verdict("unchecked", "an access key id without its secret key beside it")
        return _verdict(inventory, secret, runtime)
    probes = probes_for(runtime, found.service)
    if not probes:
        wanted = PROVIDER_TYPES.get(found.service)
        return Verdict("unchecked", f"no provider of type {wanted!r} in the policy file"
                       if wanted else f"rotator has no provider for {found.service} keys")
    errors = []
    for name, probe in probes:
        companions = companions_for(inventory, found, probe)
        try:
            live = probe.probe(inventory.value_of(found), companions)
        except RotatorError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if live:
            return Verdict("live", f"provider {name} accepts it")
        if live is None:
            missing = ", ".join(probe.probe_companions)
            return Verdict("unchecked", f"no {missing} found beside it in {found.path}")
    if errors:
        return Verdict("unchecked", "; ".join(errors))
    return Verdict("revoked", "refused by " + ", ".join(name for name, _ in probes))


def companions_for(inventory: Inventory, found: Found, probe: KeyProbe) -> dict[str, str]:
    """The values of ``probe.probe_companions`` found beside ``found``."""
    out = {}
    for variable in probe.probe_companions:
        other = inventory.beside(found, variable)
        if other is not None:
            out[variable] = inventory.value_of(other).reveal()
    return out


def verify(inventory: Inventory, runtime: Runtime) -> dict[str, Verdict]:
    """fingerprint -> verdict, for every key found (each key asked once, wherever it sits)."""
    verdicts: dict[str, Verdict] = {}
    for found in inventory.found:
        if found.fingerprint not in verdicts:
            verdicts[found.fingerprint] = _verdict(inventory, found, runtime)
    return verdicts
