"""The core protocol's guarantees, run over every built-in provider and both vaults.

- kill -9 of the daemon after each step (and between the provider creating a key and anything
  recording it), then a restart: the rotation finishes, one live key, the legacy key revoked;
- agents probing the vault's key while the daemon rotates see no rejected key;
- ``rotate-now --revoke-immediately`` kills the old key at once;
- bad ``params`` are refused by ``rotator check`` with the provider's own message.
"""

from __future__ import annotations

import signal
import tomllib
from collections.abc import Callable, Iterator

import pytest
import tomli_w

from tests.harnesses.aws import AwsIamHarness, SecretsManagerHarness
from tests.harnesses.base import ProviderHarness, VaultHarness
from tests.harnesses.openai import OpenAIHarness, OpenBaoHarness
from tests.protocol import Probe, finished, make_protocol_fleet
from tests.support import stop_daemon, wait_for

PROVIDER_CRASHPOINTS = ["created:create", "effect:create", "after:create", "effect:verify",
                        "effect:store", "effect:revoke"]
"""Where a provider's own code decides recovery: a key made but recorded nowhere, a create
recorded or not (find_by_rotation + revoke clean up), a verify repeated, the vault promoted
with the provider's companions, a revoke repeated. Every point runs for OpenAI in
test_crash_recovery.py and for every vault below; the provider-independent steps (prepare,
health, grace) need not run again for each provider."""

ProviderFactory = Callable[[pytest.FixtureRequest], ProviderHarness]
VaultFactory = Callable[[pytest.FixtureRequest], VaultHarness]

PROVIDERS: dict[str, ProviderFactory] = {
    "openai": lambda request: OpenAIHarness(request.getfixturevalue("fake_openai")),
    "postgres-single": lambda request: request.getfixturevalue("postgres_single"),
    "postgres-alternating": lambda request: request.getfixturevalue("postgres_alternating"),
    "stripe-apikey": lambda request: request.getfixturevalue("stripe_apikey"),
    "stripe-webhook": lambda request: request.getfixturevalue("stripe_webhook"),
    "http-sendgrid": lambda request: request.getfixturevalue("sendgrid_harness"),
    "http-cloudflare": lambda request: request.getfixturevalue("cloudflare_harness"),
    "aws-iam": lambda request: AwsIamHarness(request.getfixturevalue("moto_server")),
}
VAULTS: dict[str, VaultFactory] = {
    "openbao": lambda request: OpenBaoHarness(request.getfixturevalue("openbao")),
    "aws-secretsmanager": lambda request: SecretsManagerHarness(
        request.getfixturevalue("moto_server")),
}


@pytest.fixture(params=sorted(PROVIDERS))
def provider_harness(request: pytest.FixtureRequest) -> Iterator[ProviderHarness]:
    harness = PROVIDERS[request.param](request)
    yield harness
    harness.close()


@pytest.fixture(params=sorted(VAULTS))
def vault_harness(request: pytest.FixtureRequest) -> VaultHarness:
    return VAULTS[request.param](request)


@pytest.fixture
def openbao_harness(request: pytest.FixtureRequest) -> VaultHarness:
    return VAULTS["openbao"](request)


@pytest.fixture
def openai_harness(request: pytest.FixtureRequest) -> ProviderHarness:
    return PROVIDERS["openai"](request)


def _crash_then_recover(tmp_path, vault: VaultHarness, provider: ProviderHarness,
                        point: str) -> None:
    fleet = make_protocol_fleet(tmp_path, vault, provider, n=1)
    cred = fleet.credentials[0]
    crashed = fleet.start_daemon(ROTATOR_CRASHPOINT=point)
    assert crashed.wait(60) == -signal.SIGKILL, "the daemon should have died at the crashpoint"
    if not provider.in_place:
        assert fleet.current_accepted(cred), f"after a crash at {point} the vault's key is dead"
    daemon = fleet.start_daemon()
    store = fleet.store()
    try:
        wait_for(lambda: finished(store), timeout=60, what=f"recovery from {point}")
    finally:
        assert stop_daemon(daemon) == 0
    rotations = store.rotations()
    store.close()
    assert [(r.status, r.outcome) for r in rotations] == [("succeeded", "success")], (
        [r.error for r in rotations])
    fleet.assert_settled()


@pytest.mark.slow
@pytest.mark.parametrize("point", PROVIDER_CRASHPOINTS)
def test_crash_at_each_step_over_every_provider(tmp_path, openbao_harness, provider_harness,
                                                 point):
    if provider_harness.id == "openai":
        pytest.skip("every crashpoint runs for openai in test_crash_recovery.py")
    if point.endswith(":revoke") and not provider_harness.identifies_adopted:
        pytest.skip(f"{provider_harness.id} cannot identify the adopted key: there is no "
                    "revoke in the first rotation to crash in")
    _crash_then_recover(tmp_path, openbao_harness, provider_harness, point)


VAULT_CRASHPOINTS = ["created:create", "effect:create", "after:create", "effect:verify",
                     "effect:store", "after:store", "effect:revoke"]
"""Where a vault's own code decides recovery: stage repeated or found, read_staged, promote
repeated, the previous version read for the revoke check."""


@pytest.mark.slow
@pytest.mark.parametrize("point", VAULT_CRASHPOINTS)
def test_crash_at_each_step_over_every_vault(tmp_path, vault_harness, openai_harness, point):
    if vault_harness.id == "openbao":
        pytest.skip("openbao with openai is covered by the provider parametrisation")
    _crash_then_recover(tmp_path, vault_harness, openai_harness, point)


def _no_outage(tmp_path, vault: VaultHarness, provider: ProviderHarness) -> None:
    if provider.in_place:
        pytest.skip(f"{provider.id} replaces the one key in place: a short outage is by design "
                    "(use the alternating strategy for none)")
    fleet = make_protocol_fleet(tmp_path, vault, provider, n=3, interval="2s", grace="1s",
                                settings={"max_concurrent_rotations": 3})
    probes = [Probe(fleet, cred).start() for cred in fleet.credentials]
    daemon = fleet.start_daemon()
    store = fleet.store()

    def successes(name: str) -> int:
        return sum(1 for r in store.rotations(name, limit=1000) if r.outcome == "success")

    try:
        wait_for(lambda: all(successes(c.name) >= 3 for c in fleet.credentials), timeout=120,
                 what="three rotations of every credential")
        fleet.config.write_text(fleet.config.read_text().replace('"2s"', '"30d"'))
        wait_for(lambda: finished(store), timeout=60, what="the last grace to end")
    finally:
        code = stop_daemon(daemon)
        for probe in probes:
            probe.stop()
    store.close()
    assert code == 0
    assert sum(p.successes for p in probes) > 50
    assert [p.rejections for p in probes] == [0] * len(probes), "an agent read a dead key"
    fleet.assert_settled()


@pytest.mark.slow
def test_no_outage_over_every_provider(tmp_path, openbao_harness, provider_harness):
    _no_outage(tmp_path, openbao_harness, provider_harness)


@pytest.mark.slow
def test_no_outage_over_every_vault(tmp_path, vault_harness, openai_harness):
    if vault_harness.id == "openbao":
        pytest.skip("openbao with openai is covered by the provider parametrisation")
    _no_outage(tmp_path, vault_harness, openai_harness)


def test_revoke_immediately_kills_the_old_key_at_once(tmp_path, openbao_harness,
                                                      provider_harness):
    """A routine rotation leaves the legacy key in a 1 h grace; an emergency rotation then
    kills both the key it replaces and the one still in grace (on AWS IAM that also needs the
    room: two keys per user)."""
    fleet = make_protocol_fleet(tmp_path, openbao_harness, provider_harness, n=1, grace="1h")
    cred = fleet.credentials[0]
    legacy = cred.seeded.key_id or ""
    first = fleet.cli("rotate-now", cred.name, "--yes")
    assert first.returncode == 0, first.stdout + first.stderr
    (middle,) = provider_harness.live_key_ids(cred.seeded) - {legacy}
    result = fleet.cli("rotate-now", cred.name, "--revoke-immediately", "--yes",
                       "--reason", "leaked in a prompt")
    assert result.returncode == 0, result.stdout + result.stderr
    live = provider_harness.live_key_ids(cred.seeded)
    assert middle not in live, "the key the emergency rotation replaced is still live"
    if provider_harness.identifies_adopted:
        assert legacy not in live, "the key still in its grace period is still live"
    fleet.assert_settled()


def test_bad_params_are_refused_by_check_with_the_providers_message(
        tmp_path, openbao_harness, provider_harness):
    bad = provider_harness.bad_params()
    if bad is None:
        pytest.skip(f"{provider_harness.id} has no params to get wrong")
    params, fragment = bad
    fleet = make_protocol_fleet(tmp_path, openbao_harness, provider_harness, n=1)
    doc = tomllib.loads(fleet.config.read_text())
    doc["credentials"][0]["params"] = params
    fleet.config.write_text(tomli_w.dumps(doc))
    result = fleet.cli("check")
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert fragment in output and "rotation-policies.toml:" in output, output
