"""``rotator revoke-found``: revoke, at its service, a key a scan found by its fingerprint.

For the keys no credential will ever rotate: one left only in git history, a shared key whose
agents were all given keys of their own by hand (Anthropic's, which its API cannot create).
The value is never typed: it is found again in the files or history scanned, by the fingerprint
``rotator scan`` printed. A key that is still the current key of a credential in the vault is
refused (``force`` overrides): revoking it would cut that agent off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rotator.config import Policies
from rotator.errors import NotFound, RotatorError
from rotator.runtime import Runtime
from rotator.scan import Inventory, fingerprint
from rotator.scan_verify import companions_for, probes_for

__all__ = ["Outcome", "holders_of", "revoke_found"]


@dataclass(frozen=True)
class Outcome:
    fingerprint: str
    state: str
    """``revoked``, ``already_dead``, ``refused`` (still a credential's key), ``not_found`` (no
    such key in what was scanned) or ``failed``."""
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "state": self.state, "detail": self.detail}


def holders_of(policies: Policies, runtime: Runtime, fingerprints: set[str]
               ) -> dict[str, list[str]]:
    """fingerprint -> credentials whose current vault value is that key."""
    out: dict[str, list[str]] = {}
    for cred in policies.credentials:
        try:
            value = runtime.vault(cred.vault).read(cred.path, cred.field).secret
        except (NotFound, RotatorError):
            continue
        if value is not None and (fp := fingerprint(value.reveal())) in fingerprints:
            out.setdefault(fp, []).append(cred.name)
    return out


def revoke_found(policies: Policies, runtime: Runtime, inventory: Inventory,
                 fingerprints: list[str], *, force: bool = False) -> list[Outcome]:
    holders = holders_of(policies, runtime, set(fingerprints))
    outcomes = []
    for fp in fingerprints:
        found = next((f for f in inventory.found if f.fingerprint == fp
                      and "ACCESS_KEY_ID" not in (f.variable or "")), None)
        if found is None:
            outcomes.append(Outcome(fp, "not_found", "no key with this fingerprint in what was "
                                    "scanned (add --git for a key only in history)"))
            continue
        if holders.get(fp) and not force:
            outcomes.append(Outcome(fp, "refused", "still the vault's key of "
                                    f"{', '.join(holders[fp])}: rotate those credentials "
                                    "(their first rotation revokes it), or --force"))
            continue
        outcomes.append(_revoke(runtime, inventory, found))
    return outcomes


def _revoke(runtime: Runtime, inventory: Inventory, found: Any) -> Outcome:
    fp = found.fingerprint
    probes = probes_for(runtime, found.service)
    if not probes:
        return Outcome(fp, "failed", f"no provider in the policy file can revoke {found.service}"
                       " keys: revoke it in the service's console")
    secret = inventory.value_of(found)
    problems = []
    for name, probe in probes:
        companions = companions_for(inventory, found, probe)
        provider = runtime.provider(name)
        try:
            info = probe.found_credential(secret, companions)
            if info is None:
                if probe.probe(secret, companions) is False:
                    return Outcome(fp, "already_dead", f"provider {name} refuses it already")
                problems.append(f"provider {name} cannot find it without its credential")
                continue
            key_id = provider.identify(info, secret, companions)
            if key_id is None:
                if probe.probe(secret, companions) is False:
                    return Outcome(fp, "already_dead", f"provider {name} refuses it already")
                problems.append(f"provider {name} could not tell which of its keys it is")
                continue
            provider.revoke(info, key_id)
            if probe.probe(secret, companions):
                problems.append(f"provider {name} revoked {key_id} but still accepts the key")
                continue
            return Outcome(fp, "revoked", f"key {key_id} revoked by provider {name}")
        except RotatorError as exc:
            problems.append(f"{name}: {exc}")
    return Outcome(fp, "failed", "; ".join(problems) + ": revoke it in the service's console")
