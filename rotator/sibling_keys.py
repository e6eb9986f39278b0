"""Which key each never-rotated credential holds, remembered for a few seconds.

Before an old key is revoked, the engine asks whether another credential of the same provider
still reads it: one key several agents shared before ``rotator import`` gave each a credential
(``Engine._still_held_by``). Only credentials rotator has not rotated yet can hold such a key,
and at the start of a fleet-wide ``rotate-now --all`` that is every credential: reading each of
them again for every revocation made the batch quadratic in vault reads (100 credentials, about
5,000 reads). Here each such credential is read at most once per ``fresh_for`` seconds and its
answer kept as a verdict: "holds a key of its own" (rotator's metadata names it, or nothing is
there) or the fingerprint of the value it holds.

A fingerprint is an HMAC-SHA-256 of the value under a key drawn for this process: it never
leaves memory and cannot be turned back into the value. The cost of remembering is that a key
written by hand (or by ``rotator import``) into a never-rotated credential's secret within the
last ``fresh_for`` seconds may be missed; that is the same race a read has with a write that
lands just after it, made a few seconds wider.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rotator.interfaces import Secret, VaultValue

__all__ = ["OWN_KEY", "SiblingKeys"]

OWN_KEY = b""
"""The verdict for a credential that holds no adopted key: rotator wrote its key, or it has none."""

FRESH_FOR = 5.0


@dataclass(frozen=True)
class _Verdict:
    read_at: float
    fingerprint: bytes


class SiblingKeys:
    """Fingerprints of the keys never-rotated credentials hold; thread-safe."""

    def __init__(self, fresh_for: float = FRESH_FOR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._key = secrets.token_bytes(32)
        self._fresh_for = fresh_for
        self._clock = clock
        self._lock = threading.Lock()
        self._verdicts: dict[str, _Verdict] = {}
        self._reading: dict[str, threading.Lock] = {}

    def fingerprint(self, secret: Secret) -> bytes:
        return hmac.new(self._key, secret.reveal().encode(), hashlib.sha256).digest()

    def holders(self, wanted: bytes, names: Sequence[str],
                read: Callable[[str], VaultValue | None]) -> list[str]:
        """Those of ``names`` that hold the key whose fingerprint is ``wanted``; each is read
        (``read(name)``) only when its last answer is older than ``fresh_for`` (see
        ``held_by``). A fresh answer costs a dictionary lookup and no lock: one revocation in
        a fleet of thousands asks about every other never-rotated credential."""
        now = self._clock()
        found = []
        for name in names:
            known = self._verdicts.get(name)  # a dict read is atomic; writes go under the lock
            if known is not None and now - known.read_at < self._fresh_for:
                verdict = known.fingerprint
            else:
                verdict = self.held_by(name, lambda name=name: read(name))  # type: ignore[misc]
            if verdict == wanted:
                found.append(name)
        return found

    def held_by(self, name: str, read: Callable[[], VaultValue | None]) -> bytes:
        """The fingerprint of the adopted key ``name`` holds, or ``OWN_KEY``; ``read`` (the
        credential's current vault value, None when there is none) runs only when the last
        answer is older than ``fresh_for``, and for one caller at a time: workers asking
        together wait for that one read. Errors of ``read`` propagate and are not kept."""
        with self._lock:
            reading = self._reading.setdefault(name, threading.Lock())
        with reading:
            now = self._clock()
            with self._lock:
                known = self._verdicts.get(name)
            if known is not None and now - known.read_at < self._fresh_for:
                return known.fingerprint
            current = read()
            if current is None or current.secret is None or current.metadata.get("key_id"):
                verdict = OWN_KEY
            else:
                verdict = self.fingerprint(current.secret)
            with self._lock:
                self._verdicts[name] = _Verdict(now, verdict)
            return verdict
