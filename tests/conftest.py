"""Shared fixtures: real servers on free loopback ports, started per session, stopped by pid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rotator.testing.fake_openai import FakeOpenAIServer
from rotator.testing.openbao import OpenBaoDevServer


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBaoDevServer]:
    """One real OpenBao dev server for the whole session (tests use distinct paths)."""
    server = OpenBaoDevServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """A fresh stateful fake of the OpenAI Admin API per test."""
    server = FakeOpenAIServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
