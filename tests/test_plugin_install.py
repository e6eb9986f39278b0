"""A third-party provider installed as a package: rotator finds it by its entry point.

The tiny plugin in tests/example_plugin is built and installed with pip into a directory of
this test's own (``--target``, put on PYTHONPATH), so the test's environment is left as it was;
then ``rotator check`` accepts its type and ``rotator rotate-now`` rotates through it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harnesses.base import ProviderHarness, SeededCredential
from tests.harnesses.openai import OpenBaoHarness
from tests.protocol import make_protocol_fleet
from tests.support import remember_issued

PLUGIN = Path(__file__).parent / "example_plugin"


class FileKeysHarness(ProviderHarness):
    id = "example-file"

    def __init__(self, keys_file: Path) -> None:
        self.keys_file = keys_file
        keys_file.write_text("{}")

    def _keys(self) -> dict[str, Any]:
        return json.loads(self.keys_file.read_text() or "{}")

    def provider_table(self) -> dict[str, Any]:
        return {"type": "example-file", "keys_file": str(self.keys_file)}

    def seed(self, index: int) -> SeededCredential:
        keys = self._keys()
        key_id, value = f"legacy{index}", f"xk-{secrets.token_urlsafe(24)}"
        keys[key_id] = {"value": value, "name": "legacy", "owner": f"o{index}", "revoked": False}
        self.keys_file.write_text(json.dumps(keys))
        return SeededCredential(params={"owner": f"o{index}"}, field="KEY", value=value,
                                key_id=key_id)

    def key_accepted(self, cred: SeededCredential, value: str,
                     companions: dict[str, str]) -> bool:
        return any(k["value"] == value and not k["revoked"] for k in self._keys().values())

    def live_key_ids(self, cred: SeededCredential) -> set[str]:
        return {i for i, k in self._keys().items()
                if k["owner"] == cred.params["owner"] and not k["revoked"]}


@pytest.fixture
def keys_file(tmp_path: Path) -> Iterator[Path]:
    """The example service's own database: it holds keys by design, so it is removed when the
    test ends (the leak scan searches every file the tests leave for secret values)."""
    path = tmp_path / "service" / "keys.json"
    path.parent.mkdir()
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, built and installed into a private directory."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "src"
    shutil.copytree(PLUGIN, source)  # the build writes into its source tree
    site = work / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(site.glob("rotator_example_plugin-*.dist-info")), "no dist-info installed"
    return site


def test_an_installed_plugin_is_found_and_rotates(tmp_path, openbao, plugin_site, keys_file):
    harness = FileKeysHarness(keys_file)
    fleet = make_protocol_fleet(tmp_path, OpenBaoHarness(openbao), harness, n=2)
    path = os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)

    check = fleet.cli("check", PYTHONPATH=path)
    assert check.returncode == 0, check.stdout + check.stderr
    result = fleet.cli("rotate-now", "--all", "--yes", "--revoke-immediately",
                       "--reason", "plugin test", PYTHONPATH=path)
    assert result.returncode == 0, result.stdout + result.stderr
    remember_issued(k["value"] for k in harness._keys().values())
    fleet.assert_settled()


def test_without_the_plugin_its_type_is_unknown(tmp_path, openbao, keys_file):
    harness = FileKeysHarness(keys_file)
    fleet = make_protocol_fleet(tmp_path, OpenBaoHarness(openbao), harness, n=1)
    check = fleet.cli("check")
    assert check.returncode == 2
    assert 'unknown provider type "example-file"' in check.stderr, check.stderr
