"""SiblingKeys: what never-rotated credentials hold, read at most once per freshness window."""

from __future__ import annotations

import pytest

from rotator.interfaces import Secret, VaultValue
from rotator.sibling_keys import OWN_KEY, SiblingKeys


def _value(text: str | None, key_id: str | None = None) -> VaultValue:
    return VaultValue(secret=Secret(text) if text else None, version="1",
                      metadata={"key_id": key_id} if key_id else {}, companions={})


def test_a_verdict_is_read_once_per_window_and_again_after_it():
    now = [100.0]
    keys = SiblingKeys(fresh_for=5.0, clock=lambda: now[0])
    reads: list[str] = []

    def read() -> VaultValue:
        reads.append("a")
        return _value("sk-shared-value-1234567890")

    shared = keys.fingerprint(Secret("sk-shared-value-1234567890"))
    assert keys.held_by("a", read) == shared
    now[0] += 4.9
    assert keys.held_by("a", read) == shared
    assert len(reads) == 1
    now[0] += 0.2
    assert keys.held_by("a", read) == shared
    assert len(reads) == 2


def test_rotator_written_keys_and_empty_secrets_are_their_own():
    keys = SiblingKeys()
    assert keys.held_by("own", lambda: _value("sk-x-123456789012", key_id="key_1")) == OWN_KEY
    assert keys.held_by("none", lambda: None) == OWN_KEY
    assert keys.held_by("empty", lambda: _value(None)) == OWN_KEY
    other = keys.held_by("other", lambda: _value("sk-other-123456789012"))
    assert other not in (OWN_KEY, keys.fingerprint(Secret("sk-shared-123456789012")))


def test_fingerprints_hold_no_value_and_differ_between_processes():
    first, second = SiblingKeys(), SiblingKeys()
    secret = Secret("sk-leaky-value-abcdefghijkl")
    assert secret.reveal().encode() not in first.fingerprint(secret)
    assert first.fingerprint(secret) != second.fingerprint(secret)


def test_a_failed_read_is_not_remembered():
    keys = SiblingKeys()

    def broken() -> VaultValue:
        raise RuntimeError("vault away")

    with pytest.raises(RuntimeError):
        keys.held_by("a", broken)
    assert keys.held_by("a", lambda: _value("sk-later-123456789012")) != OWN_KEY


def test_holders_reads_only_stale_names_and_finds_the_shared_key():
    now = [0.0]
    keys = SiblingKeys(fresh_for=5.0, clock=lambda: now[0])
    values = {"a": _value("sk-shared-123456789012"), "b": _value("sk-own-123456789012", "k1"),
              "c": _value("sk-shared-123456789012"), "d": None}
    reads: list[str] = []

    def read(name: str) -> VaultValue | None:
        reads.append(name)
        return values[name]

    wanted = keys.fingerprint(Secret("sk-shared-123456789012"))
    assert keys.holders(wanted, ["a", "b", "c", "d"], read) == ["a", "c"]
    assert sorted(reads) == ["a", "b", "c", "d"]
    values["c"] = _value("sk-new-123456789012", "k2")  # rotated elsewhere, still cached
    assert keys.holders(wanted, ["a", "b", "c", "d"], read) == ["a", "c"]
    assert len(reads) == 4
    now[0] = 6.0
    assert keys.holders(wanted, ["a", "b", "c", "d"], read) == ["a"]
    assert len(reads) == 8
