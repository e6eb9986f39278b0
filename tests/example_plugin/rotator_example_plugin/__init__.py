"""A third-party provider in a package of its own, as docs/providers.md describes.

Its "service" is a JSON file of keys (``{key_id: {"value", "name", "revoked"}}``), so the test
that installs it needs no server: what matters is that rotator finds the provider through the
``rotator.providers`` entry point of an installed distribution and rotates through it.
"""

from __future__ import annotations

import fcntl
import json
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from rotator.errors import CredentialRejected
from rotator.interfaces import (
    CredentialInfo,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    key_name_for,
)


class FileKeysSettings(PluginSettings):
    keys_file: str


class FileKeysParams(PluginSettings):
    owner: str


class FileKeysProvider(Provider):
    type_name: ClassVar[str] = "example-file"
    settings_model: ClassVar[type[PluginSettings]] = FileKeysSettings
    params_model: ClassVar[type[PluginSettings]] = FileKeysParams

    @contextmanager
    def _keys(self) -> Iterator[dict[str, Any]]:
        path = Path(self.settings.keys_file)  # type: ignore[attr-defined]
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            keys = json.loads(fh.read() or "{}")
            yield keys
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(keys))

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        key_id, value = f"k_{secrets.token_hex(6)}", f"xk-{secrets.token_urlsafe(24)}"
        with self._keys() as keys:
            keys[key_id] = {"value": value, "name": key_name_for(rotation_id),
                            "owner": credential.params.owner, "revoked": False}
        return NewKey(key_id, Secret(value))

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        with self._keys() as keys:
            ok = any(k["value"] == secret.reveal() and not k["revoked"] for k in keys.values())
        if not ok:
            raise CredentialRejected(f"provider {self.name!r}: key refused")

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        with self._keys() as keys:
            if key_id in keys:
                keys[key_id]["revoked"] = True

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        with self._keys() as keys:
            return [i for i, k in keys.items()
                    if k["name"] == key_name_for(rotation_id) and not k["revoked"]]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        with self._keys() as keys:
            found = [i for i, k in keys.items()
                     if k["value"] == secret.reveal() and not k["revoked"]]
        return found[0] if len(found) == 1 else None
