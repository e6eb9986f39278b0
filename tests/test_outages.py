"""A vault or provider that stops serving for a while is one log line, and its recovery one
more, however many attempts the rotations in flight make meanwhile."""

from __future__ import annotations

import logging

import pytest

from rotator.engine import RotationRequest
from rotator.outages import OutageLog
from tests.support import fail_transiently, fleet_engine, make_fleet


@pytest.fixture(autouse=True)
def _vault_token(openbao, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)


def test_a_vault_outage_is_one_line_and_its_recovery_another(tmp_path, openbao, fake_openai,
                                                             caplog):
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2)
    caplog.set_level(logging.DEBUG)
    with fleet_engine(fleet, sleep=lambda s: None) as (engine, runtime):
        fail_transiently(runtime.vault("main"), "read", 5, "vault {name} is sealed: unseal it")
        fail_transiently(runtime.vault("main"), "promote", 3, "vault {name} is sealed: unseal it")
        for cred in fleet.credentials:
            result = engine.rotate(RotationRequest(credential=cred["name"], trigger="manual"))
            assert result.ok, result.message
    fleet.assert_settled()
    outages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "rotator.outages"]
    assert outages == [
        (logging.ERROR, "vault 'main' is not serving: vault 'main' is sealed: unseal it; "
                        "rotations wait and retry"),
        (logging.WARNING, "vault 'main' is serving again after 0s"),
        (logging.ERROR, "vault 'main' is not serving: vault 'main' is sealed: unseal it; "
                        "rotations wait and retry"),
        (logging.WARNING, "vault 'main' is serving again after 0s"),
    ], "two outages (read, then promote): each one line, and its recovery one line"
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 8 and all(r.levelno == logging.DEBUG for r in retries)


def test_outage_log_counts_from_the_first_failure(caplog):
    caplog.set_level(logging.WARNING, logger="rotator.outages")
    now = [100.0]
    outages = OutageLog(monotonic=lambda: now[0])
    outages.failed("provider", "openai", "HTTP 503")
    assert outages.is_out("provider", "openai")
    now[0] = 107.0
    outages.failed("provider", "openai", "HTTP 503")
    outages.succeeded("provider", "openai")
    assert not outages.is_out("provider", "openai")
    outages.succeeded("provider", "openai")  # no outage: nothing to report
    assert [r.getMessage() for r in caplog.records] == [
        "provider 'openai' is not serving: HTTP 503; rotations wait and retry",
        "provider 'openai' is serving again after 7s"]
