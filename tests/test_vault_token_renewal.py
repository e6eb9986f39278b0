"""A token_env/token_file token is kept alive the way Vault Agent keeps its own, against OpenBao.

A daemon handed ``bao token create -policy=rotator -period=768h`` must still work after 768
hours; tokens with TTLs of seconds show the same in seconds. A token that cannot be kept alive is
reported once, and a rewritten token file is picked up without a restart.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from rotator.errors import PermanentError
from rotator.testing.openbao import OpenBaoDevServer
from tests.support import wait_for
from tests.test_vault_openbao import RW_POLICY, new_value, stage_and_promote, unique

LOGGER = "rotator.vaults.hashicorp_vault"


def token_for(openbao: OpenBaoDevServer, prefix: str, **lifetime: Any) -> str:
    """A token that may read and write under ``prefix`` (plus the default policy, which allows
    lookup-self and renew-self), created by root with ``lifetime`` (ttl, renewable, ...)."""
    policy = f"renewal-{uuid.uuid4().hex[:8]}"
    openbao.write_policy(policy, RW_POLICY.format(p=prefix, meta='"read", "update", "patch"'))
    created = openbao.client().auth.token.create(policies=[policy], **lifetime)
    return str(created["auth"]["client_token"])


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_a_short_lived_token_is_renewed_and_outlives_its_ttl(
        make_vault: Any, openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    prefix = unique("renew")
    token = token_for(openbao, prefix, ttl="4s")
    control = token_for(openbao, prefix, ttl="4s")  # the same token, left to itself
    monkeypatch.setenv("ROTATOR_TEST_SHORT_TOKEN", token)
    vault = make_vault(token_env="ROTATOR_TEST_SHORT_TOKEN")
    path = f"{prefix}/svc"
    started = time.monotonic()
    stage_and_promote(vault, path, "K", new_value(), "key_0")

    while time.monotonic() - started < 5:  # busy: renewed before requests (or by the timer)
        assert vault.read(path, "K").version == "1"
        time.sleep(0.5)
    time.sleep(5)  # idle for longer than the whole TTL: only the timer can keep it alive

    assert stage_and_promote(vault, path, "K", new_value(), "key_1")[1] == "2"
    assert time.monotonic() - started > 10
    with pytest.raises(hvac.exceptions.Forbidden):  # without renewal, rotator's would be too
        openbao.client(control).auth.token.lookup_self()
    assert openbao.client().auth.token.lookup(token)["data"]["ttl"] > 0
    assert "renewed the token from token_env ROTATOR_TEST_SHORT_TOKEN" in caplog.text
    assert warnings(caplog) == []
    assert token not in caplog.text


def test_a_token_that_is_not_renewable_is_reported_once_before_it_expires(
        make_vault: Any, openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    prefix = unique("fixed")
    created = time.monotonic()
    token = token_for(openbao, prefix, ttl="4s", renewable=False)
    monkeypatch.setenv("ROTATOR_TEST_FIXED_TOKEN", token)
    vault = make_vault(token_env="ROTATOR_TEST_FIXED_TOKEN")
    path = f"{prefix}/svc"
    stage_and_promote(vault, path, "K", new_value(), "key_0")
    assert "ROTATOR_TEST_FIXED_TOKEN expires in" in caplog.text  # noted at first use
    assert warnings(caplog) == []  # most of its TTL is left: nothing to warn about yet

    time.sleep(max(created + 2.5 - time.monotonic(), 0))  # less than half of its TTL left
    assert vault.read(path, "K").version == "1"
    assert vault.read(path, "K").version == "1"
    [warning] = warnings(caplog)
    assert "token from token_env ROTATOR_TEST_FIXED_TOKEN is not renewable" in warning
    assert "expires in 1s (at " in warning or "expires in 0s (at " in warning
    assert "Issue a new renewable or periodic token" in warning
    assert "restart rotator" in warning

    time.sleep(max(created + 4.5 - time.monotonic(), 0))
    with pytest.raises(PermanentError, match="has expired and could not be renewed") as caught:
        vault.read(path, "K")
    assert token not in str(caught.value)
    assert len(warnings(caplog)) == 1
    assert token not in caplog.text


def test_a_token_at_its_maximum_ttl_is_reported_once(
        make_vault: Any, openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    prefix = unique("capped")
    token = token_for(openbao, prefix, ttl="2s", explicit_max_ttl="3s")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    vault = make_vault(token_file=str(token_file))
    stage_and_promote(vault, f"{prefix}/svc", "K", new_value(), "key_0")

    # renewals grant 2s, then less: the timer sees it reached its maximum TTL
    [warning] = wait_for(lambda: warnings(caplog), timeout=4, what="the max TTL warning")
    assert f"token from token_file {token_file} has reached its maximum TTL" in warning
    assert f"Write a new token (e.g. `bao token create -policy=rotator -period=768h`) to " \
           f"{token_file}: rotator reads the file again when it changes" in warning
    time.sleep(1.5)  # past its end: still said once
    assert len(warnings(caplog)) == 1
    assert token not in caplog.text


def test_a_rewritten_token_file_is_used_for_the_next_request(
        make_vault: Any, openbao: OpenBaoDevServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    prefix = unique("file")
    first = token_for(openbao, prefix, ttl="1h")
    token_file = tmp_path / "token"
    token_file.write_text(first + "\n")
    vault = make_vault(token_file=str(token_file))
    path = f"{prefix}/svc"
    stage_and_promote(vault, path, "K", new_value(), "key_0")

    # An operator (or Vault Agent's sink) writes a new token; the old one is revoked.
    second = token_for(openbao, prefix, ttl="1h")
    openbao.client().auth.token.revoke(first)
    token_file.write_text(second + "\n")
    assert vault.read(path, "K").version == "1"  # the file changed: read before the request
    assert caplog.text.count("changed; using the token now in it") == 1

    # Rewritten in place with its times put back, so it looks unchanged: the 403 reads it.
    seen = token_file.stat()
    third = token_for(openbao, prefix, ttl="1h")
    assert len(third) == len(second)
    openbao.client().auth.token.revoke(second)
    token_file.write_text(third + "\n")
    os.utime(token_file, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    assert vault.read(path, "K").version == "1"
    assert caplog.text.count("changed; using the token now in it") == 1
    for token in (first, second, third):
        assert token not in caplog.text


def test_a_token_that_never_expires_needs_no_timer(make_vault: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    vault = make_vault()  # the root token: ttl 0
    vault.read_staged(unique(), "K", "r-none")
    assert vault._auth._renewer is None
    assert "does not expire" in caplog.text
    assert warnings(caplog) == []
