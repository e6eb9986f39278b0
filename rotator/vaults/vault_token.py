"""The vault plugin's token and its life: obtained from the configured source (an environment
variable, a file, an AppRole or Kubernetes login), replaced after a 403 or when the token file
changes, and a token_env/token_file token kept alive as Vault Agent keeps its own (looked up
once, renewed at half its TTL from a timer while no request comes, one WARNING when it cannot
be). Kept apart from the KV logic so each can be read on its own.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator.durations import format_duration
from rotator.errors import PermanentError, RotatorError
from rotator.interfaces import Secret
from rotator.systemd import expand_credentials_directory

if TYPE_CHECKING:
    import hvac

    from rotator.vaults.hashicorp_vault import HashiCorpVaultSettings

__all__ = ["RENEW_AT", "RETRY_SECONDS", "STATIC_TOKENS", "VaultToken", "errors_text"]

log = logging.getLogger("rotator.vaults.hashicorp_vault")

STATIC_TOKENS = ("token_env", "token_file")
RENEW_AT = 0.5
"""A token_env/token_file token is renewed once less than this share of the TTL Vault last
granted it is left: early enough to ride out a Vault that is down for a while."""
RETRY_SECONDS = 30.0
"""Longest wait before a lookup or renewal that failed (Vault unreachable) is tried again."""


def errors_text(exc: Any) -> str:
    """Vault's own error strings, single-lined and scrubbed of any remembered secret."""
    from rotator import redaction

    errors = getattr(exc, "errors", None) or []
    text = "; ".join(" ".join(str(e).replace("*", " ").split()) for e in errors)
    return redaction.scrub(text)


@dataclass
class _Lifetime:
    """What rotator knows of a token_env/token_file token's life, to keep the token alive."""

    renewable: bool
    granted: float
    """The TTL Vault last granted, in seconds; 0 for a token that never expires."""
    expires: float
    """``time.monotonic()`` at which the token expires."""
    capped: bool = False
    """A renewal granted less than asked: the token is at its maximum TTL."""
    refused: str = ""
    """Why Vault refused a renewal, if it did."""
    warned: bool = False
    """The token cannot be kept alive and the WARNING saying so was logged: nothing more to do."""

    def renew_at(self) -> float:
        return self.expires - self.granted * RENEW_AT


def file_signature(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten in place or replaced by a rename (Vault Agent)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev



class VaultToken:
    """The one token every thread of a vault plugin uses, and its life.

    ``new_client(token)`` makes an hvac client; ``translate(exc, what)`` turns an hvac or
    requests error into a rotator error (both are the plugin's). Thread-safe.
    """

    def __init__(self, name: str, cfg: HashiCorpVaultSettings,
                 new_client: Callable[..., hvac.Client],
                 translate: Callable[[Exception, str], RotatorError]) -> None:
        self.name, self.cfg = name, cfg
        self._new_client, self._translate = new_client, translate
        self._lock = threading.Lock()
        self._token: Secret | None = None
        self._generation = 0
        # token_env/token_file only, all guarded by _lock:
        self._life: _Lifetime | None = None  # None until the current token is looked up
        self._retry_at = 0.0  # no lookup or renewal before this (one just failed)
        self._token_file_seen: tuple[int, int, int, int] | None = None
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()  # the renewer looks again now (new token, closing)
        self._renewal_checked = -1  # the token generation health() saw renew itself

    def current(self) -> tuple[int, Secret]:
        """The token to send now and its generation (logging in first if needed, switching to
        a rewritten token file, renewing a token_env/token_file token that is due)."""
        with self._lock:
            if self._token is None:
                self._use_token(self._obtain_token())
            else:
                self._reread_token_file()
            self._schedule(self._keep_alive())
            assert self._token is not None
            return self._generation, self._token

    @property
    def expired(self) -> bool:
        """A token_env/token_file token rotator knows has run out."""
        with self._lock:
            life = self._life
        return life is not None and time.monotonic() >= life.expires

    def check_renewal(self, looked: Any, renew: Callable[[int], Any]) -> None:
        """A token_env/token_file token that expires must be able to renew itself, or the
        daemon dies with it: ``renew(ttl)`` it once per token (by its own TTL, which changes
        nothing) so that a policy lacking ``auth/token/renew-self`` fails the start-up check,
        not a rotation weeks later. Once per token: readiness probes call health() often."""
        if self.cfg.auth_method not in STATIC_TOKENS:
            return
        data = looked.get("data") or {} if isinstance(looked, dict) else {}
        ttl = int(data.get("ttl") or 0)
        with self._lock:
            generation = self._generation
            if self._renewal_checked == generation or ttl <= 0 or not data.get("renewable"):
                return
        renew(ttl)
        with self._lock:
            self._renewal_checked = generation

    def close(self) -> None:
        """Stop the renewal timer."""
        with self._lock:
            renewer, self._renewer = self._renewer, None
            self._wake.set()
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=self.cfg.timeout + 1)

    def relogin(self, generation: int) -> bool:
        """Get a fresh token after a 403; False when that cannot change anything."""
        with self._lock:
            if generation != self._generation:
                return True  # another thread already logged in again
            fresh = self._obtain_token()
            if self.cfg.auth_method in STATIC_TOKENS and self._token is not None \
                    and fresh == self._token:
                return False
            self._use_token(fresh)
            return True

    def _use_token(self, token: Secret) -> None:
        """Make ``token`` the one every thread uses from now on; called with the lock held."""
        self._token = token
        self._generation += 1
        self._life = None
        self._retry_at = 0.0
        self._wake.set()

    def _obtain_token(self) -> Secret:
        """A token from the configured source; called with ``self._lock`` held."""
        cfg = self.cfg
        if cfg.token_env is not None:
            return Secret(self._from_env(cfg.token_env, "token_env", "the Vault token"))
        if cfg.token_file is not None:
            # Looked at before reading: a rewrite racing the read is still seen as a change.
            seen = file_signature(expand_credentials_directory(cfg.token_file))
            token = Secret(self._from_file(cfg.token_file, "token_file", "the Vault token"))
            self._token_file_seen = seen
            return token
        if cfg.approle is not None:
            approle = cfg.approle
            role_id = self._from_env(approle.role_id_env, "approle.role_id_env", "the role id")
            secret_id = Secret(self._from_file(approle.secret_id_file, "approle.secret_id_file",
                                               "the AppRole secret id"))
            return self._login(
                lambda c: c.auth.approle.login(role_id, secret_id.reveal(), use_token=False,
                                               mount_point=approle.mount),
                f"AppRole login (auth mount {approle.mount!r})",
                "check approle.role_id_env and approle.secret_id_file (a secret id may have "
                "expired or reached its use limit)")
        assert cfg.kubernetes is not None
        kube = cfg.kubernetes
        jwt = Secret(self._from_file(kube.jwt_file, "kubernetes.jwt_file",
                                     "the service-account token"))
        return self._login(
            lambda c: c.auth.kubernetes.login(kube.role, jwt.reveal(), use_token=False,
                                              mount_point=kube.mount),
            f"Kubernetes login as role {kube.role!r} (auth mount {kube.mount!r})",
            "check that the role exists and binds this pod's service account and namespace")

    def _login(self, fn: Callable[[hvac.Client], Any], what: str, fix: str) -> Secret:
        import hvac.exceptions

        client = self._new_client()
        try:
            answer = fn(client)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden,
                hvac.exceptions.Unauthorized) as exc:
            raise PermanentError(f"vault {self.name!r} at {self.cfg.url} refused the {what}"
                                 f": {errors_text(exc) or 'denied'}; {fix}") from exc
        except hvac.exceptions.InvalidPath as exc:
            raise PermanentError(f"vault {self.name!r} at {self.cfg.url}: {what} failed, no "
                                 "such auth mount; check `mount` of the auth settings") from exc
        except (hvac.exceptions.VaultError, OSError) as exc:  # requests' errors are OSErrors
            raise self._translate(exc, what) from exc
        finally:
            client.adapter.close()
        return Secret(str(answer["auth"]["client_token"]))

    # -- keeping a token_env/token_file token alive ----------------------------------------------

    def _reread_token_file(self) -> None:
        """Switch to the token in ``token_file`` if the file changed; called with the lock held.

        A file that cannot be read right now (being replaced, emptied) keeps the current token;
        it is tried again on the next request, and a 403 reads it again in any case.
        """
        if self.cfg.token_file is None or self._token is None:
            return
        if file_signature(expand_credentials_directory(self.cfg.token_file)) \
                == self._token_file_seen:
            return
        try:
            fresh = self._obtain_token()
        except PermanentError as exc:
            log.debug("%s; keeping the current token for now", exc)
            return
        if fresh != self._token:
            log.info("vault %r: token_file %s changed; using the token now in it", self.name,
                     self.cfg.token_file)
            self._use_token(fresh)

    def _keep_alive(self) -> float | None:
        """Look up a token_env/token_file token once, renew it when due, and warn once if it
        cannot be kept alive; called with the lock held, never raises.

        Returns the seconds until the token needs attention again, or None if it never will
        (a token that does not expire, one already warned about, a token from a login).
        """
        if self._token is None or self.cfg.auth_method not in STATIC_TOKENS:
            return None
        now = time.monotonic()
        if now < self._retry_at:
            return self._retry_at - now
        life = self._life
        try:
            if life is None:
                life = self._life = self._look_up_token()
            if life.granted <= 0 or life.warned:
                return None
            if now < life.renew_at():
                return life.renew_at() - now
            if life.renewable:
                self._renew_token(life)
                if life.renewable and not life.capped:
                    return max(life.renew_at() - time.monotonic(), 0.0)
            self._warn_expiring(life)
            return None
        # Vault unreachable, sealed or failing (the request will say so too), or an answer
        # without the expected fields: never fail a request over its token's renewal.
        except (RotatorError, LookupError, TypeError, ValueError) as exc:
            granted = life.granted if life is not None else 0.0
            retry = min(RETRY_SECONDS, max(1.0, granted / 10))
            self._retry_at = now + retry
            log.warning("vault %r: could not %s the token from %s, trying again in %s: %s",
                        self.name, "renew" if life is not None else "look up",
                        self.source(), format_duration(timedelta(seconds=retry)), exc)
            return retry

    def _look_up_token(self) -> _Lifetime:
        """The current token's lifetime, from ``auth/token/lookup-self``."""
        import hvac.exceptions

        asked = time.monotonic()
        try:
            answer = self._token_call(lambda c: c.auth.token.lookup_self(),
                                      "looking up the daemon's token")
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
            log.warning(
                "vault %r: the token from %s may not look itself up (%s): rotator cannot renew "
                "it. Give it the default policy (auth/token/lookup-self and renew-self), or "
                "it has already expired or been revoked", self.name, self.source(),
                errors_text(exc) or "refused")
            return _Lifetime(renewable=False, granted=0, expires=math.inf)
        data = answer["data"]
        ttl = int(data.get("ttl") or 0)
        if ttl <= 0:
            log.debug("vault %r: the token from %s does not expire", self.name,
                      self.source())
            return _Lifetime(renewable=False, granted=0, expires=math.inf)
        granted = max(ttl, int(data.get("creation_ttl") or 0), int(data.get("period") or 0))
        renewable = bool(data.get("renewable"))
        log.info("vault %r: the token from %s expires in %s and is %s", self.name,
                 self.source(), format_duration(timedelta(seconds=ttl)),
                 "renewable: rotator renews it when less than half of its TTL is left"
                 if renewable else "not renewable")
        return _Lifetime(renewable=renewable, granted=granted, expires=asked + ttl)

    def _renew_token(self, life: _Lifetime) -> None:
        """Renew the current token by its last granted TTL (``auth/token/renew-self``); less
        than asked means it has reached its maximum TTL and will expire whatever we do."""
        import hvac.exceptions

        increment = max(int(life.granted), 1)
        asked = time.monotonic()
        try:
            answer = self._token_call(lambda c: c.auth.token.renew_self(increment=increment),
                                      "renewing the daemon's token")
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
            life.renewable = False
            life.refused = errors_text(exc) or "refused"
            return
        lease = int((answer.get("auth") or {}).get("lease_duration") or 0)
        life.expires = asked + lease
        if lease < increment:
            life.capped = True
        else:
            life.granted = lease
        log.debug("vault %r: renewed the token from %s for %s", self.name, self.source(),
                  format_duration(timedelta(seconds=lease)))

    def _token_call(self, fn: Callable[[hvac.Client], Any], what: str) -> Any:
        """``fn`` on a client of its own holding the current token, so any thread may call it;
        403 and 400 are raised as they are, other failures as rotator errors."""
        import hvac.exceptions

        assert self._token is not None
        client = self._new_client(self._token.reveal())
        try:
            return fn(client)
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
            raise
        except (hvac.exceptions.VaultError, OSError) as exc:  # requests' errors are OSErrors
            raise self._translate(exc, what) from exc
        finally:
            client.adapter.close()

    def _warn_expiring(self, life: _Lifetime) -> None:
        """Say once, with the time left and what to do, that this token will expire."""
        if life.warned:
            return
        life.warned = True
        left = max(life.expires - time.monotonic(), 0.0)
        at = datetime.now(UTC) + timedelta(seconds=left)
        if life.capped:
            why = "has reached its maximum TTL and cannot be renewed any further"
        elif life.refused:
            why = f"could not be renewed ({life.refused})"
        else:
            why = "is not renewable"
        log.warning("vault %r: the token from %s %s; it expires in %s (at %s UTC) and every "
                    "request to this vault fails after that. %s", self.name,
                    self.source(), why, format_duration(timedelta(seconds=left)),
                    at.strftime("%Y-%m-%d %H:%M:%S"), self.new_token_hint())

    def _schedule(self, delay: float | None) -> None:
        """Have the timer thread look at the token when ``delay`` is not None; lock held."""
        if delay is None or (self._renewer is not None and self._renewer.is_alive()):
            return
        self._renewer = threading.Thread(target=self._renew_in_background, daemon=True,
                                         name=f"rotator-vault-{self.name}-token")
        self._renewer.start()

    def _renew_in_background(self) -> None:
        """Keep the token alive while the daemon makes no requests (rotations can be weeks
        apart; a periodic token is not); ends when nothing is left to do or on close()."""
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    if self._renewer is not me:
                        return
                    self._wake.clear()
                    self._reread_token_file()
                    delay = self._keep_alive()
                    if delay is None:
                        self._renewer = None  # under the lock: a new token starts a new timer
                        return
                self._wake.wait(max(delay, 0.05))  # never a busy loop
        finally:  # an unexpected error: let the next request start a new timer
            with self._lock:
                if self._renewer is me:
                    self._renewer = None

    def source(self) -> str:
        if self.cfg.token_file is not None:
            return f"token_file {self.cfg.token_file}"
        if self.cfg.token_env is not None:
            return f"token_env {self.cfg.token_env}"
        return f"the {self.cfg.auth_method} login"

    def new_token_hint(self) -> str:
        example = "e.g. `bao token create -policy=rotator -period=768h`"
        if self.cfg.token_file is not None:
            return (f"Write a new token ({example}) to {self.cfg.token_file}: rotator reads the "
                    "file again when it changes, no restart needed")
        return (f"Issue a new renewable or periodic token ({example}), put it in "
                f"{self.cfg.token_env} and restart rotator")

    def _from_env(self, variable: str, setting: str, thing: str) -> str:
        value = os.environ.get(variable, "").strip()
        if not value:
            raise PermanentError(
                f"vault {self.name!r}: environment variable {variable} ({setting}) is not set "
                f"or empty; export {thing} in it")
        return value

    def _from_file(self, path: str, setting: str, thing: str) -> str:
        path = expand_credentials_directory(path)
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().strip()
        except OSError as exc:
            raise PermanentError(
                f"vault {self.name!r}: cannot read {setting} {path} ({exc.strerror}); put "
                f"{thing} there or fix the path") from exc
        if not value:
            raise PermanentError(f"vault {self.name!r}: {setting} {path} is empty; put {thing} "
                                 "there")
        return value
