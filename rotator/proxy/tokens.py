"""The proxy's short-lived scoped tokens: standard JWTs (HS256, through PyJWT), signed with the
current key of the ``signing-key`` credential that the daemon rotates like any other.

A token names its agent (``sub``), the routes it may call (``routes``), its life (``iat``,
``exp``, at most ``max_token_ttl``), an optional request ``budget`` and an id (``jti``); the
header's ``kid`` names the signing key. A token verifies while its signing key is the
credential's current key or an old one still in its grace period (its revocation pending in
the state store): rotating the signing key never cuts a token short, and a retired key's tokens
are refused. Forged, tampered, expired, or revoked (``rotator token revoke --agent``) tokens
never pass. A token is a secret: it is never logged or stored by rotator.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rotator.config import CredentialConfig, Policies
from rotator.errors import NotFound, PermanentError, RotatorError
from rotator.interfaces import Secret
from rotator.runtime import Runtime
from rotator.state.store import StateStore

__all__ = ["Claims", "Denied", "SigningKeys", "issue_token", "verify_token"]

log = logging.getLogger("rotator.proxy")

ISSUER = "rotator"
ALGORITHM = "HS256"


class Denied(Exception):
    """A request the proxy refuses: ``status`` (401, 403 or 429), a stable ``code`` and a
    message an agent's developer can act on (never the token)."""

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = (status, code, message,
                                                                  retry_after)


@dataclass(frozen=True)
class Claims:
    agent: str
    routes: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    token_id: str
    budget: int | None
    key_id: str = ""
    """The ``kid`` of the key that signed it."""


class SigningKeys:
    """The signing credential's keys as the vault and the state store know them: the current
    one (to sign) and those still accepted (to verify), re-read at most every ``refresh``."""

    def __init__(self, policies: Policies, runtime: Runtime, store: StateStore,
                 refresh: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        if policies.proxy is None:
            raise PermanentError("the policy file has no [proxy] section: tokens need its "
                                 "signing_credential")
        self.cred: CredentialConfig = policies.credential(policies.proxy.signing_credential)
        self.runtime, self.store, self.refresh, self.clock = runtime, store, refresh, clock
        self._read_at = -1e18
        self._current: tuple[str, Secret] | None = None
        self._accepted: dict[str, Secret] = {}

    def due(self) -> bool:
        """Whether the keys are older than ``refresh`` (``reload`` them)."""
        return self.clock() - self._read_at >= self.refresh

    def reload(self) -> None:
        """Read the keys again. A vault or store that cannot answer keeps the keys read last
        (retiring a key needs both, so none is accepted that should not be) and is asked again
        after ``refresh``; with no keys read yet, the error is raised."""
        try:
            self._load(force=True)
        except RotatorError as exc:
            if self._current is None:
                raise
            self._read_at = self.clock()
            log.warning("cannot read the signing keys of %s (%s); verifying with those read "
                        "last", self.cred.name, exc)

    def _load(self, force: bool = False) -> None:
        if not force and self.clock() - self._read_at < self.refresh:
            return
        vault = self.runtime.vault(self.cred.vault)
        try:
            value = vault.read(self.cred.path, self.cred.field)
        except NotFound:
            value = None
        if value is None or value.secret is None or not value.metadata.get("key_id"):
            raise PermanentError(
                f"the signing key {self.cred.name} has no key in vault {self.cred.vault!r} at "
                f"{self.cred.path} yet: run `rotator rotate-now {self.cred.name}` once (the "
                "daemon keeps rotating it)")
        kid = str(value.metadata["key_id"])
        accepted = {kid: value.secret}
        for rev in self.store.pending_revocations(credential=self.cred.name):
            if rev.vault_version and rev.key_id not in accepted:
                old = vault.read_version(self.cred.path, self.cred.field, rev.vault_version)
                if old is not None:
                    accepted[rev.key_id] = old
        self._current, self._accepted = (kid, value.secret), accepted
        self._read_at = self.clock()

    def current(self) -> tuple[str, Secret]:
        self._load()
        assert self._current is not None
        return self._current

    def accepted(self, kid: str) -> Secret | None:
        self._load()
        return self._accepted.get(kid)


def issue_token(keys: SigningKeys, agent: str, routes: Sequence[str], ttl: timedelta,
                max_ttl: timedelta, budget: int | None = None,
                now: datetime | None = None) -> tuple[str, Claims]:
    """A signed token for ``agent`` on ``routes``; ``PermanentError`` for a ``ttl`` over
    ``max_ttl``."""
    import jwt

    if ttl <= timedelta(0) or ttl > max_ttl:
        raise PermanentError(f"a token lives at most max_token_ttl ({max_ttl}) of [proxy], and "
                             f"more than 0s; asked for {ttl}")
    if budget is not None and budget < 1:
        raise PermanentError("a token's budget is at least 1 request")
    now = now or datetime.now(UTC)
    claims = Claims(agent, tuple(routes), now.replace(microsecond=0),
                    (now + ttl).replace(microsecond=0), secrets.token_hex(12), budget)
    kid, key = keys.current()
    claims = dataclasses.replace(claims, key_id=kid)
    body: dict[str, Any] = {"iss": ISSUER, "sub": agent, "routes": list(routes),
                            "iat": int(claims.issued_at.timestamp()),
                            "exp": int(claims.expires_at.timestamp()), "jti": claims.token_id}
    if budget is not None:
        body["budget"] = budget
    token = jwt.encode(body, key.reveal(), algorithm=ALGORITHM, headers={"kid": kid})
    return token, claims


def verify_token(keys: SigningKeys, token: str, revoked: dict[str, datetime],
                 leeway: float = 5.0) -> Claims:
    """The claims of a valid token; :class:`Denied` otherwise (401 for a token that is not
    valid, with the reason; never the token)."""
    import jwt

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Denied(401, "invalid_token", "the token is not a rotator token (malformed JWT)"
                     ) from None
    kid = header.get("kid")
    key = keys.accepted(kid) if isinstance(kid, str) else None
    if header.get("alg") != ALGORITHM or key is None:
        raise Denied(401, "invalid_token", "the token's signing key is unknown or retired: "
                     "get a new token")
    try:
        body = jwt.decode(token, key.reveal(), algorithms=[ALGORITHM], issuer=ISSUER,
                          leeway=leeway,
                          options={"require": ["exp", "iat", "sub", "jti", "iss"]})
    except jwt.ExpiredSignatureError:
        raise Denied(401, "token_expired", "the token has expired: get a new one") from None
    except jwt.PyJWTError:
        raise Denied(401, "invalid_token", "the token's signature or claims are invalid"
                     ) from None
    routes = body.get("routes")
    budget = body.get("budget")
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes) or (
            budget is not None and (not isinstance(budget, int) or isinstance(budget, bool))):
        raise Denied(401, "invalid_token", "the token's claims are malformed")
    claims = Claims(str(body["sub"]), tuple(routes),
                    datetime.fromtimestamp(body["iat"], UTC),
                    datetime.fromtimestamp(body["exp"], UTC), str(body["jti"]), budget,
                    str(kid))
    cut = revoked.get(claims.agent)
    if cut is not None and claims.issued_at <= cut:
        raise Denied(401, "token_revoked", f"the tokens of agent {claims.agent} were revoked "
                     "(rotator token revoke): get a new token")
    return claims
