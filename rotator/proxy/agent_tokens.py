"""Tokens the daemon keeps fresh in the vault for ``[proxy.agents.NAME]``.

Each is issued for its agent's routes and written as the next version of its vault field
(two-phase, like a rotated key: staged, then promoted, with the token id as the version's key
id and its issue time), renewed once two thirds of its life are gone, so an agent reading the
vault (``rotator exec --watch``) always holds a valid token and never a long-lived key. The
old token stays valid until it expires. Among replicas, a lease per agent lets one renew.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from rotator.audit import AuditLog
from rotator.config import Policies
from rotator.errors import NotFound, RotatorError
from rotator.interfaces import Secret
from rotator.proxy.tokens import SigningKeys, issue_token
from rotator.runtime import Runtime
from rotator.state.store import StateStore

__all__ = ["TokenKeeper"]

log = logging.getLogger("rotator.proxy")


class TokenKeeper:
    """Renews the kept tokens that are due (``renew_due``), each under its lease."""

    def __init__(self, policies: Policies, runtime: Runtime, store: StateStore,
                 audit: AuditLog, owner: str, clock: Callable[[], datetime]) -> None:
        self.policies, self.runtime, self.store, self.audit = policies, runtime, store, audit
        self.owner, self.clock = owner, clock

    def renew_due(self) -> list[str]:
        """The agents whose token was (re)issued now."""
        proxy = self.policies.proxy
        if proxy is None or not proxy.agents:
            return []
        renewed = []
        keys = SigningKeys(self.policies, self.runtime, self.store)
        for agent, kept in proxy.agents.items():
            vault = self.runtime.vault(kept.vault)
            now = self.clock()
            try:
                current = vault.read(kept.path, kept.field)
                issued = current.metadata.get("rotated_at") if current.secret else None
            except NotFound:
                issued = None
            if issued is not None and now < datetime.fromisoformat(issued) + kept.ttl * 2 / 3:
                continue
            lease = f"token:{agent}"
            if self.store.take_lock(lease, self.owner, self.policies.settings.lock_ttl,
                                    now).holder is not None:
                continue  # another replica renews it
            try:
                token, claims = issue_token(keys, agent, kept.routes, kept.ttl,
                                            proxy.max_token_ttl, kept.budget, now=now)
                tag = f"token-{claims.token_id}"
                vault.stage(kept.path, kept.field, Secret(token), tag)
                vault.promote(kept.path, kept.field, tag, {
                    "key_id": claims.token_id, "rotation_id": tag,
                    "rotated_at": now.isoformat()})
                vault.discard_staged(kept.path, tag)
                self.audit.record("token", actor="daemon", detail={
                    "action": "renewed", "agent": agent, "routes": kept.routes,
                    "expires_at": claims.expires_at.isoformat(),
                    "token_id": claims.token_id, "vault": kept.vault, "path": kept.path})
                renewed.append(agent)
                log.info("proxy token of %s renewed in vault %r at %s (expires %s)", agent,
                         kept.vault, kept.path, claims.expires_at.isoformat(timespec="seconds"))
            except RotatorError as exc:
                log.error("could not renew the proxy token of %s: %s", agent, exc)
            finally:
                self.store.unlock(lease, self.owner)
        return renewed
