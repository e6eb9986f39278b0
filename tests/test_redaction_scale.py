"""redaction.scrub: the same answer with a few remembered values and with thousands."""

from __future__ import annotations

import random
import string

import pytest

from rotator import redaction


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(redaction, "_values", set())
    monkeypatch.setattr(redaction, "_index", {})
    monkeypatch.setattr(redaction, "_longest_first", ())


def _value(rng: random.Random, length: int = 40) -> str:
    return "sk-" + "".join(rng.choice(string.ascii_letters + string.digits)
                           for _ in range(length))


def test_few_and_many_values_scrub_alike(fresh):
    rng = random.Random(7)
    first = [_value(rng) for _ in range(10)]
    for value in first:
        redaction.remember(value)
    text = f"a {first[0]} b {first[3]}{first[3]} c sk-not-remembered-1234567 {first[9]}."
    few = redaction.scrub(text)
    assert few == ("a [REDACTED] b [REDACTED][REDACTED] c sk-not-remembered-1234567 "
                   "[REDACTED].")
    for _ in range(5000):
        redaction.remember(_value(rng))
    assert redaction._longest_first == ()  # scanning now
    assert redaction.scrub(text) == few
    assert redaction.scrub("short") == "short"
    assert redaction.scrub("no secret here at all, just words") == \
        "no secret here at all, just words"


def test_a_longer_value_sharing_a_prefix_is_masked_whole(fresh):
    for i in range(100):
        redaction.remember(f"unrelated-value-{i:04d}")
    redaction.remember("sk-proj-AAAA")
    redaction.remember("sk-proj-AAAA-and-more")
    assert redaction.scrub("x sk-proj-AAAA-and-more y sk-proj-AAAA z") == \
        "x [REDACTED] y [REDACTED] z"
