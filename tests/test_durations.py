"""Durations: the one grammar shared by the policy file and the command line."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rotator.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "expected"), [
    ("90d", timedelta(days=90)),
    ("12h", timedelta(hours=12)),
    ("15m", timedelta(minutes=15)),
    ("30s", timedelta(seconds=30)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("2w", timedelta(weeks=2)),
    ("0s", timedelta(0)),
    ("0", timedelta(0)),
    (" 10m ", timedelta(minutes=10)),
    ("1H", timedelta(hours=1)),
])
def test_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", "  ", "90x", "-5m", "5", "1.5h", "h", "30m1h", "1h1h", "1 h", "d90", "1h 30m",
    "99999999999999d",
])
def test_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration") as info:
        parse_duration(text)
    assert "examples: 30d, 12h, 1h30m" in str(info.value)


def test_message_quotes_the_input() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("90x")
    assert str(info.value).startswith('"90x" is not a duration (examples: 30d, 12h')


def test_non_string_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_duration(90)  # type: ignore[arg-type]


@pytest.mark.parametrize(("td", "text"), [
    (timedelta(0), "0s"),
    (timedelta(days=1, hours=2), "1d2h"),
    (timedelta(days=90), "90d"),
    (timedelta(hours=1, minutes=30), "1h30m"),
    (timedelta(seconds=59, milliseconds=900), "59s"),
    (timedelta(minutes=-5), "-5m"),
])
def test_format(td: timedelta, text: str) -> None:
    assert format_duration(td) == text


@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_format_parse_round_trip(seconds: int) -> None:
    td = timedelta(seconds=seconds)
    assert parse_duration(format_duration(td)) == td


@given(st.text(max_size=20))
def test_parse_only_raises_value_error(text: str) -> None:
    try:
        result = parse_duration(text)
    except ValueError:
        return
    assert result >= timedelta(0)
