"""HashiCorp Vault and OpenBao, KV version 2.

A rotated key becomes a new version of the secret at ``path``, written with check-and-set over
the other fields so a concurrent writer is never overwritten. KV v2 custom metadata belongs to the
whole secret, not to a version, and several credentials may share one secret, so rotator records
per field: ``<field>.key_id``, ``<field>.rotation_id``, ``<field>.rotated_at`` and
``<field>.version`` (the version it wrote). Those apply to the current version only while the
field still holds the value rotator wrote; a key written by hand afterwards reads as adopted.

New keys are staged at ``<staging_path>/<path>/<rotation_id>`` in the same mount before they are
promoted, so a crash never leaves a created key only in process memory. Metadata is updated with
a JSON merge patch (the ``patch`` capability), so two credentials of one secret rotating at once
cannot erase each other's records; without that capability rotator falls back to read-and-update.

The least policy the daemon's token needs is ``deploy/vault/rotator-policy.hcl``
(``tests/test_vault_policy.py`` runs the daemon with exactly that policy and shows each stanza
is needed).

A token given by ``token_env`` or ``token_file`` is kept alive the way Vault Agent keeps its own:
looked up (``auth/token/lookup-self``) when first used and renewed (``auth/token/renew-self``,
both in the ``default`` policy) once less than half of the TTL Vault last granted is left,
before a request and from a timer thread while the daemon is idle. A token that cannot be kept
alive (not renewable, or at its maximum TTL) is reported once with a WARNING saying when it
expires. A ``token_file`` is read again when it changes (a Vault Agent sink, an operator writing
a new token) and after a 403; AppRole and Kubernetes tokens are replaced by logging in again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, cast
from urllib.parse import quote, unquote

from pydantic import Field, field_validator, model_validator

from rotator import redaction
from rotator.errors import NotFound, PermanentError, RotatorError, TransientError
from rotator.interfaces import (
    PluginSettings,
    Secret,
    StagedCopy,
    StagingInventory,
    Vault,
    VaultValue,
    WriteAccessCheck,
)
from rotator.plugin_support import same_text
from rotator.vaults.kv_http import KvHttp
from rotator.vaults.recent import RecentCache
from rotator.vaults.vault_token import VaultToken, errors_text

if TYPE_CHECKING:
    import hvac

__all__ = ["AppRoleAuth", "HashiCorpVault", "HashiCorpVaultSettings", "KubernetesAuth"]

T = TypeVar("T")

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 10
"""Writes lost to another writer of the same secret before giving up (each loss is progress)."""
_META_KEYS = ("key_id", "rotation_id", "rotated_at")
_DEFAULT_JWT = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_NO_ROUTE = "no handler for route"
_CAS_MISMATCH = "check-and-set"


class AppRoleAuth(PluginSettings):
    """AppRole login: the role id from an environment variable, the secret id from a file."""

    role_id_env: str
    secret_id_file: str
    mount: str = "approle"


class KubernetesAuth(PluginSettings):
    """Kubernetes auth login with the pod's service-account token."""

    role: str
    jwt_file: str = _DEFAULT_JWT
    mount: str = "kubernetes"


class HashiCorpVaultSettings(PluginSettings):
    """``[vaults.NAME]`` with ``type = "vault"``; exactly one way to authenticate."""

    url: str
    mount: str = "secret"
    token_env: str | None = None
    token_file: str | None = None
    approle: AppRoleAuth | None = None
    kubernetes: KubernetesAuth | None = None
    namespace: str | None = None
    staging_path: str = "rotator/pending"
    timeout: float = Field(default=10, gt=0)
    verify_tls: bool | str = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("mount", "staging_path")
    @classmethod
    def _vault_path(cls, value: str) -> str:
        value = value.strip("/")
        if not value:
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_auth_method(self) -> HashiCorpVaultSettings:
        chosen = [name for name in ("token_env", "token_file", "approle", "kubernetes")
                  if getattr(self, name) is not None]
        if len(chosen) != 1:
            found = f" (found {', '.join(chosen)})" if chosen else ""
            raise ValueError(
                f"set exactly one of token_env, token_file, approle, kubernetes{found}")
        return self

    @property
    def auth_method(self) -> Literal["token_env", "token_file", "approle", "kubernetes"]:
        if self.token_env is not None:
            return "token_env"
        if self.token_file is not None:
            return "token_file"
        return "approle" if self.approle is not None else "kubernetes"


@dataclass(frozen=True)
class _Version:
    """One version of a KV v2 secret as read; ``data`` is None when deleted or destroyed."""

    number: int
    data: dict[str, Any] | None
    custom: dict[str, str]


class _CasConflict(Exception):
    """Another writer created a version between our read and our write."""


def _as_text(value: Any) -> str | None:
    """A field's value as text, or None when it is absent or empty (KV values may be JSON)."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


_STANDBY = "standby"
"""In Vault's error text: a standby node that cannot serve the request right now."""


class HashiCorpVault(Vault, StagingInventory, WriteAccessCheck):
    """KV v2 on HashiCorp Vault or OpenBao; see the module docstring for the layout it keeps.

    Thread-safe: each thread gets its own ``hvac.Client`` (a ``requests`` session is not meant to
    be shared), all of them using one token obtained under a lock and replaced by logging in again
    when Vault answers 403 (an AppRole or Kubernetes token that expired, a token file rewritten).
    A token_env/token_file token is renewed under the same lock, before a request when it is due
    and from one timer thread (started only for a token that expires) while no request comes.
    """

    type_name: ClassVar[str] = "vault"
    settings_model: ClassVar[type[PluginSettings]] = HashiCorpVaultSettings

    def __init__(self, name: str, settings: PluginSettings) -> None:
        super().__init__(name, settings)
        self.cfg = cast(HashiCorpVaultSettings, settings)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[hvac.Client] = []
        self._auth = VaultToken(name, self.cfg, self._new_client, self._translate)
        self._kv = KvHttp(self.cfg.url, timeout=self.cfg.timeout, verify=self.cfg.verify_tls,
                          namespace=self.cfg.namespace)
        # What this process just read or wrote (see rotator.vaults.recent): the latest
        # version read (only ever the base of a check-and-set write) and the keys it staged,
        # so a rotation does not read them back over the network.
        self._latest: RecentCache[_Version] = RecentCache()
        self._staged: RecentCache[dict[str, Any]] = RecentCache()

    # -- Vault contract ---------------------------------------------------------------------------

    def read(self, path: str, field: str, companions: Sequence[str] = ()) -> VaultValue:
        path, field = self._check(path, field)
        current = self._get(path, what=f"reading {self._where(path)}")
        if current is None or current.data is None:
            raise NotFound(f"vault {self.name!r}: no secret at {self._where(path)}")
        self._latest.put(path, current)
        value = _as_text(current.data.get(field))
        metadata = self._field_metadata(path, field, current)
        found = {name: text for name in companions
                 if (text := _as_text(current.data.get(name))) is not None}
        return VaultValue(secret=Secret(value) if value is not None else None,
                          version=str(current.number), metadata=metadata, companions=found)

    def read_version(self, path: str, field: str, version: str) -> Secret | None:
        path, field = self._check(path, field)
        number = self._version_number(version)
        found = self._get(path, number, what=f"reading version {number} of {self._where(path)}")
        if found is None:
            raise NotFound(f"vault {self.name!r}: no version {number} of {self._where(path)}")
        if found.data is None:
            return None
        value = _as_text(found.data.get(field))
        return Secret(value) if value is not None else None

    def stage(self, path: str, field: str, secret: Secret, rotation_id: str,
              companions: Mapping[str, str] | None = None) -> None:
        path, field = self._check(path, field)
        staged = self._staged_path(path, rotation_id)
        payload = {"value": secret.reveal(), "rotation_id": rotation_id, "field": field,
                   "companions": dict(companions or {})}
        self._write(staged, payload, cas=None, what=f"staging a new key at {self._where(staged)}")
        self._staged.put(staged, payload)

    def read_staged(self, path: str, field: str, rotation_id: str) -> Secret | None:
        path, field = self._check(path, field)
        staged = self._staged_path(path, rotation_id)
        data = self._staged_data(staged)
        if data is None:
            return None
        if data.get("rotation_id") != rotation_id or data.get("field") != field:
            return None
        value = _as_text(data.get("value"))
        return Secret(value) if value is not None else None

    def discard_staged(self, path: str, rotation_id: str) -> None:
        path = self._check_path(path)
        staged = self._staged_path(path, rotation_id)
        mount = self.cfg.mount

        def delete(client: hvac.Client) -> None:
            import hvac.exceptions

            try:
                self._kv.request("DELETE", f"{mount}/metadata/{quote(staged)}", client.token)
            except hvac.exceptions.InvalidPath as exc:
                if _NO_ROUTE in errors_text(exc):
                    raise
                # nothing staged: already discarded

        self._call(delete, what=f"discarding the staged key at {self._where(staged)}",
                   capability=f'"delete" on "{mount}/metadata/{staged}"')
        self._staged.pop(staged)

    def missing_write_access(self, path: str, field: str) -> list[str]:
        """Ask the server (``sys/capabilities-self``, in the default policy) what this token
        may do on each path a rotation of ``path`` writes; nothing is written."""
        path, field = self._check(path, field)
        mount = self.cfg.mount
        staged = self._staged_path(path, "preflight")
        needs = {
            f"{mount}/data/{path}": ({"create", "read", "update"}, "the secret"),
            f"{mount}/metadata/{path}": ({"patch"}, "its metadata (or read and update)"),
            f"{mount}/data/{staged}": ({"create", "read", "update"}, "the staged copy"),
            f"{mount}/metadata/{staged}": ({"delete"}, "discarding the staged copy"),
        }

        def ask(client: hvac.Client) -> Any:
            return client.sys.get_capabilities(list(needs))

        answer = self._call(ask, what="asking what the token may write",
                            capability='"update" on "sys/capabilities-self" (the default policy)')
        granted = answer.get("data", answer) if isinstance(answer, dict) else {}
        missing = []
        for where, (wanted, what) in needs.items():
            has = set(granted.get(where) or [])
            if "root" in has:
                continue
            if where == f"{mount}/metadata/{path}" and {"read", "update"} <= has:
                continue  # read-and-update works where patch is not granted
            lacking = sorted(wanted - has)
            if lacking:
                missing.append(f"vault {self.name!r}: the token may not "
                               f"{' or '.join(lacking)} {where} ({what})")
        return missing

    def staged_rotations(self, path: str) -> list[str]:
        """Rotation ids with a staged copy under ``staging_path``/``path`` (one LIST call)."""
        path = self._check_path(path)
        folder = f"{self.cfg.staging_path}/{path}"
        return self._list_folder(folder)[1]

    def staged_copies(self) -> list[StagedCopy]:
        """Every key staged under ``staging_path``: one LIST per folder, walked depth first.

        A staged copy is ``<staging_path>/<path>/<rotation id>`` and a rotation id never holds
        a ``/`` (it is quoted), so each leaf is a rotation id and its folder names the path.
        """
        root = self.cfg.staging_path
        found: list[StagedCopy] = []
        folders = [root]
        while folders:
            folder = folders.pop()
            subfolders, rotation_ids = self._list_folder(folder)
            folders.extend(f"{folder}/{name}" for name in subfolders)
            path = folder[len(root) + 1:]
            if not path:
                continue  # a leaf right under staging_path was not staged by rotator
            found.extend(StagedCopy(
                path=path, rotation_id=rotation_id,
                location=f"{self.cfg.mount}/{folder}/{quote(rotation_id, safe='')}")
                for rotation_id in rotation_ids)
        return sorted(found, key=lambda c: (c.path, c.rotation_id))

    def _list_folder(self, folder: str) -> tuple[list[str], list[str]]:
        """``(subfolders, leaves)`` of a KV v2 folder (names unquoted); empty when it does not
        exist."""
        mount = self.cfg.mount

        def listing(client: hvac.Client) -> tuple[list[str], list[str]]:
            import hvac.exceptions

            try:
                answer = client.secrets.kv.v2.list_secrets(folder, mount_point=mount)
            except hvac.exceptions.InvalidPath as exc:
                if _NO_ROUTE in errors_text(exc):
                    raise
                return [], []  # nothing staged there
            keys = [str(k) for k in answer["data"]["keys"]]
            return ([k.rstrip("/") for k in keys if k.endswith("/")],
                    [unquote(k) for k in keys if not k.endswith("/")])

        return self._call(listing, what=f"listing staged keys under {self._where(folder)}",
                          capability=f'"list" on "{mount}/metadata/{folder}/*"')

    def promote(
        self, path: str, field: str, rotation_id: str, metadata: Mapping[str, str]
    ) -> str:
        path, field = self._check(path, field)
        where = self._where(path)
        # The version this process read last is only the base of the check-and-set write:
        # if another version came since, the write is refused and the secret read again.
        current = self._latest.get(path) or self._get(path, what=f"reading {where}")
        if current is not None and current.data is not None:
            recorded = self._field_metadata(path, field, current)
            if recorded.get("rotation_id") == rotation_id:
                return str(current.number)
        data = self._staged_data(self._staged_path(path, rotation_id)) or {}
        value = _as_text(data.get("value"))
        if value is None or data.get("rotation_id") != rotation_id or data.get("field") != field:
            raise PermanentError(
                f"vault {self.name!r}: no key staged by rotation {rotation_id} for "
                f"{where}#{field}; it cannot be promoted")
        companions = {str(k): str(v) for k, v in (data.get("companions") or {}).items()}
        return self._write_field(path, field, value, metadata, rotation_id,
                                 verb="written", first=current, companions=companions)

    def restore(
        self, path: str, field: str, version: str, rotation_id: str, metadata: Mapping[str, str],
        companions: Sequence[str] = (),
    ) -> str:
        path, field = self._check(path, field)
        where = self._where(path)
        number = self._version_number(version)
        old = self._get(path, number, what=f"reading version {number} of {where}")
        if old is None or old.data is None:
            raise PermanentError(
                f"vault {self.name!r}: version {number} of {where} is missing, deleted or "
                "destroyed; the old key cannot be restored from it (undelete it, or raise "
                "max_versions)")
        old_value = _as_text(old.data.get(field))
        if old_value is None:
            raise PermanentError(
                f"vault {self.name!r}: version {number} of {where} has no field {field!r} "
                "to restore")
        old_companions = {name: text for name in companions
                          if (text := _as_text(old.data.get(name))) is not None}
        return self._write_field(path, field, old_value, metadata, rotation_id,
                                 verb="restored", companions=old_companions)

    def _write_field(self, path: str, field: str, value: str, metadata: Mapping[str, str],
                     rotation_id: str, *, verb: str, first: _Version | None = None,
                     companions: Mapping[str, str] | None = None) -> str:
        """Make ``value`` the current value of ``field`` (and ``companions`` theirs; other
        fields kept) with check-and-set, retrying when another writer got there first; if it
        is already current (written before a crash), only finish its metadata record."""
        companions = dict(companions or {})
        where = self._where(path)
        current = first
        for attempt in range(CAS_ATTEMPTS):
            if current is None or attempt:
                current = self._get(path, what=f"reading {where}")
            live = current if current is not None and current.data is not None else None
            present = _as_text(live.data.get(field)) if live and live.data else None
            if (live is not None and present is not None and same_text(present, value)
                    and all(live.data.get(k) == v for k, v in companions.items())):
                if self._field_metadata(path, field, live).get("rotation_id") != rotation_id:
                    self._set_field_metadata(path, field, live.number, metadata, rotation_id)
                return str(live.number)
            data = dict(live.data or {}) if live is not None else {}
            data.update(companions)
            data[field] = value
            try:
                number = self._write(path, data, cas=current.number if current else 0,
                                     what=f"writing field {field!r} of {where}")
            except _CasConflict:
                self._backoff(attempt)
                continue
            finally:
                data.clear()
            self._set_field_metadata(path, field, number, metadata, rotation_id)
            return str(number)
        raise TransientError(
            f"vault {self.name!r}: {where} changed {CAS_ATTEMPTS} times while field {field!r} "
            f"was being {verb}; retrying later")

    def warm_up(self) -> None:
        import hvac
        import hvac.exceptions  # noqa: F401

    def health(self) -> None:
        """Reachable, unsealed, our credentials accepted, and ``mount`` really is KV v2."""
        where = f"vault {self.name!r} at {self.cfg.url}"

        def status(client: hvac.Client) -> None:
            answer = client.sys.read_health_status(method="GET")
            if isinstance(answer, dict):
                return
            try:
                body = answer.json()
            except ValueError:
                body = {}
            if body.get("sealed"):
                raise TransientError(f"{where} is sealed: unseal it (bao/vault operator unseal)")
            if body.get("initialized") is False:
                raise PermanentError(f"{where} is not initialized: run `operator init`")
            if answer.status_code >= 500:
                raise TransientError(f"{where} reports itself unhealthy "
                                     f"(HTTP {answer.status_code})")
            # 429/472/473: a standby that forwards requests to the active node is fine.

        self._call(status, what="checking health", capability='"read" on "sys/health"')
        looked = self._call(lambda c: c.auth.token.lookup_self(),
                            what="checking the daemon's token",
                            capability='"read" on "auth/token/lookup-self" (the default policy)')
        self._check_renewal(looked)
        self._check_mount()

    def _check_renewal(self, looked: Any) -> None:
        """See ``VaultToken.check_renewal``: a token that cannot renew itself fails here."""
        self._auth.check_renewal(looked, lambda ttl: self._call(
            lambda c: c.auth.token.renew_self(increment=ttl),
            what="renewing the daemon's token",
            capability='"update" on "auth/token/renew-self" (the default policy)'))

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.adapter.close()
        self._local = threading.local()
        self._kv.close()
        self._auth.close()

    # -- reading and writing ----------------------------------------------------------------------

    def _get(self, path: str, version: int | None = None, *, what: str) -> _Version | None:
        """One version (latest if None); None when the secret or the version never existed."""
        mount = self.cfg.mount

        def get(client: hvac.Client) -> _Version | None:
            import hvac.exceptions

            query = "" if version is None else f"?version={version}"
            try:
                answer = self._kv.request("GET", f"{mount}/data/{quote(path)}{query}",
                                          client.token)
            except hvac.exceptions.InvalidPath as exc:
                body = exc.json if isinstance(exc.json, dict) else {}
                meta = ((body.get("data") or {}).get("metadata")) if body else None
                if meta:  # a deleted or destroyed version: it exists, without data
                    return _Version(int(meta["version"]), None, meta.get("custom_metadata") or {})
                if _NO_ROUTE in errors_text(exc):
                    raise
                return None
            meta = answer["data"]["metadata"]
            return _Version(int(meta["version"]), dict(answer["data"]["data"] or {}),
                            dict(meta.get("custom_metadata") or {}))

        return self._call(get, what=what, capability=f'"read" on "{mount}/data/{path}"')

    def _staged_data(self, staged: str) -> dict[str, Any] | None:
        """What is staged at ``staged``: as this process wrote it, else read from the vault."""
        data = self._staged.get(staged)
        if data is not None:
            return data
        found = self._get(staged, what=f"reading the staged key at {self._where(staged)}")
        return found.data if found is not None else None

    def _write(self, path: str, data: dict[str, Any], *, cas: int | None, what: str) -> int:
        """Write a new version; raises :class:`_CasConflict` if ``cas`` is no longer current."""
        mount = self.cfg.mount

        def write(client: hvac.Client) -> int:
            import hvac.exceptions

            options = {} if cas is None else {"cas": cas}
            try:
                answer = self._kv.request("POST", f"{mount}/data/{quote(path)}", client.token,
                                          body={"options": options, "data": data})
            except hvac.exceptions.InvalidRequest as exc:
                if _CAS_MISMATCH in errors_text(exc):
                    raise _CasConflict from None
                raise
            return int(answer["data"]["version"])

        self._latest.pop(path)
        return self._call(write, what=what,
                          capability=f'"create" and "update" on "{mount}/data/{path}"')

    def _field_metadata(self, path: str, field: str, current: _Version) -> dict[str, str]:
        """What rotator recorded for ``field``, if it still describes the current value.

        The record names the version rotator wrote; a later version written for another field
        keeps this field's value, so the record holds as long as the value is unchanged.
        """
        custom = current.custom
        recorded = custom.get(f"{field}.version")
        if recorded is None:
            return {}
        metadata = {k: custom[f"{field}.{k}"] for k in _META_KEYS if f"{field}.{k}" in custom}
        if recorded == str(current.number):
            return metadata
        try:
            number = int(recorded)
        except ValueError:
            return {}
        if number > current.number or current.data is None:
            return {}
        then = self._get(path, number, what=f"reading version {number} of {self._where(path)}")
        if then is None or then.data is None:
            return {}
        before, now = _as_text(then.data.get(field)), _as_text(current.data.get(field))
        if before is None or now is None or not same_text(before, now):
            return {}
        return metadata

    def _set_field_metadata(self, path: str, field: str, version: int,
                            metadata: Mapping[str, str], rotation_id: str) -> None:
        """Record ``field``'s metadata for ``version``, leaving other fields' records alone."""
        values: dict[str, str | None] = {k: (metadata.get(k) or None) for k in _META_KEYS}
        values["rotation_id"] = rotation_id
        values["version"] = str(version)
        patch = {f"{field}.{k}": v for k, v in values.items()}
        mount = self.cfg.mount
        where = self._where(path)

        def merge(client: hvac.Client) -> bool:
            import hvac.exceptions

            try:
                self._kv.request("PATCH", f"{mount}/metadata/{quote(path)}", client.token,
                                 body={"custom_metadata": patch},
                                 content_type="application/merge-patch+json")
            except (hvac.exceptions.Forbidden, hvac.exceptions.UnexpectedError):
                return False  # no "patch" capability, or a server without PATCH (405)
            return True

        def read_and_update(client: hvac.Client) -> None:
            kv = client.secrets.kv.v2
            answer = kv.read_secret_metadata(path, mount_point=mount)
            custom = dict(answer["data"].get("custom_metadata") or {})
            for key, value in patch.items():
                if value is None:
                    custom.pop(key, None)
                else:
                    custom[key] = value
            kv.update_metadata(path, custom_metadata=custom, mount_point=mount)

        metadata_path = f"{mount}/metadata/{path}"
        if not self._call(merge, what=f"recording metadata of {where}",
                          capability=f'"patch" on "{metadata_path}"'):
            self._call(read_and_update, what=f"recording metadata of {where}",
                       capability=f'"patch" (or "read" and "update") on "{metadata_path}"')

    def _check_mount(self) -> None:
        """Fail clearly if ``mount`` is missing or is KV version 1 (writes would go astray)."""
        import hvac.exceptions

        mount = self.cfg.mount

        def describe(client: hvac.Client) -> dict[str, Any] | None:
            try:
                answer = client.adapter.get(f"/v1/sys/internal/ui/mounts/{quote(mount)}")
            except hvac.exceptions.Forbidden:
                # Vault answers 403 both for a missing mount and for one the token cannot use.
                raise NotFound(
                    f"vault {self.name!r}: no KV v2 mount {mount!r} at {self.cfg.url} that "
                    "this token can use; check `mount` and the token's policy") from None
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath):
                return None  # an older server without this endpoint: reads will tell
            return answer.get("data") if isinstance(answer, dict) else None

        info = self._call(describe, what=f"looking up mount {mount!r}",
                          capability=f'"read" on "sys/internal/ui/mounts/{mount}"')
        if not info:
            return
        kind = info.get("type")
        version = str((info.get("options") or {}).get("version", ""))
        if kind != "kv" or version != "2":
            found = f"{kind} version {version}" if kind == "kv" else str(kind)
            raise PermanentError(
                f"vault {self.name!r}: mount {mount!r} at {self.cfg.url} is {found}, not KV "
                "version 2; check `mount`")

    # -- calls, errors and authentication -------------------------------------------------------

    def _call(self, fn: Callable[[hvac.Client], T], *, what: str, capability: str) -> T:
        """Run ``fn`` with this thread's client; translate failures; log in again once on 403."""
        import hvac.exceptions
        import urllib3.exceptions

        relogged = False
        while True:
            generation, client = self._client()
            try:
                return fn(client)
            except hvac.exceptions.Forbidden as exc:
                if not relogged and self._auth.relogin(generation):
                    relogged = True
                    continue
                if self._auth.expired:
                    raise PermanentError(
                        f"vault {self.name!r} at {self.cfg.url} denied {what}: permission "
                        f"denied; the token from {self._auth.source()} has expired and could "
                        f"not be renewed. {self._auth.new_token_hint()}") from exc
                raise PermanentError(
                    f"vault {self.name!r} at {self.cfg.url} denied {what}: permission denied; "
                    f"the token's policy needs {capability} (or the token has expired, or mount "
                    f"{self.cfg.mount!r} does not exist)") from exc
            except (hvac.exceptions.VaultError, OSError, urllib3.exceptions.HTTPError) as exc:
                # requests' errors are OSErrors; urllib3's come from the KV hot path (KvHttp)
                raise self._translate(exc, what) from exc

    def _translate(self, exc: Exception, what: str) -> RotatorError:
        """An hvac or requests exception as a rotator error; never quotes a request body."""
        import hvac.exceptions as hx
        import requests
        import urllib3.exceptions as ux

        where = f"vault {self.name!r} at {self.cfg.url}"
        if isinstance(exc, ux.MaxRetryError) and exc.reason is not None:
            exc = exc.reason  # what really went wrong (retries are off: the one attempt)
        if isinstance(exc, requests.exceptions.SSLError | ux.SSLError):
            return PermanentError(
                f"{where}: TLS verification failed while {what}; set verify_tls to the CA "
                "bundle that signed the server's certificate")
        if isinstance(exc, ux.NewConnectionError):  # also a ConnectTimeoutError in urllib3 2
            return TransientError(f"{where} is unreachable while {what} "
                                  f"({type(exc).__name__}); is it running?")
        if isinstance(exc, requests.Timeout | ux.TimeoutError):
            return TransientError(f"{where} did not answer within {self.cfg.timeout:g}s while "
                                  f"{what}")
        if isinstance(exc, requests.RequestException | ux.HTTPError):
            return TransientError(f"{where} is unreachable while {what} "
                                  f"({type(exc).__name__}); is it running?")
        if isinstance(exc, ConnectionError | TimeoutError):  # refused or reset below requests
            return TransientError(f"{where} is unreachable while {what} "
                                  f"({type(exc).__name__}); is it running?")
        if isinstance(exc, OSError):  # e.g. verify_tls names a CA bundle that is not there
            return PermanentError(f"{where}: {what} failed: {redaction.scrub(str(exc))}")
        detail = errors_text(exc)
        suffix = f": {detail}" if detail else ""
        if isinstance(exc, hx.InvalidPath):
            if _NO_ROUTE in detail:
                return NotFound(f"{where}: no KV v2 mount {self.cfg.mount!r} (while {what}); "
                                "check `mount`")
            return NotFound(f"{where}: not found while {what}")
        # "Not serving right now" (sealed, standby, restarting, overloaded) is transient for
        # every operation: the same request succeeds once an operator unseals it or the
        # active node is back, and a rotation must wait for that, not fail.
        if "sealed" in detail.lower():
            return TransientError(f"{where} is sealed while {what}: unseal it "
                                  "(bao/vault operator unseal)")
        if isinstance(exc, hx.VaultDown) or _STANDBY in detail.lower():
            return TransientError(f"{where} is unavailable while {what}{suffix}")
        if isinstance(exc, hx.RateLimitExceeded):
            return TransientError(f"{where} rate-limited {what}{suffix}")
        if isinstance(exc, hx.InternalServerError | hx.BadGateway | hx.PreconditionFailed):
            return TransientError(f"{where} failed {what}{suffix}")
        if isinstance(exc, hx.UnexpectedError):
            # No 4xx that means "your request is wrong" lands here (400/401/403/404 have
            # classes); what does is a standby's 472/473, a proxy's 504, a redirect.
            return TransientError(f"{where} is not serving {what} right now{suffix}")
        if isinstance(exc, hx.Unauthorized):
            return PermanentError(f"{where} refused the daemon's credentials while {what}"
                                  f"{suffix}")
        if isinstance(exc, hx.VaultNotInitialized):
            return PermanentError(f"{where} is not initialized: run `operator init`")
        return PermanentError(f"{where} rejected {what}{suffix}")

    def _new_client(self, token: str = "") -> hvac.Client:
        import hvac

        # token="" keeps hvac from reading VAULT_TOKEN or ~/.vault-token on its own.
        return hvac.Client(url=self.cfg.url, token=token, timeout=self.cfg.timeout,
                           verify=self.cfg.verify_tls, namespace=self.cfg.namespace)

    def _client(self) -> tuple[int, hvac.Client]:
        """This thread's client, carrying the current token (logging in first if needed, and
        renewing a token_env/token_file token that is due)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        generation, token = self._auth.current()
        client.token = token.reveal()
        return generation, client

    # -- small helpers --------------------------------------------------------------------------

    def _where(self, path: str) -> str:
        return f"{self.cfg.mount}/{path}"

    def _staged_path(self, path: str, rotation_id: str) -> str:
        if not rotation_id:
            raise PermanentError("a rotation id is needed to stage a key")
        return f"{self.cfg.staging_path}/{path}/{quote(rotation_id, safe='')}"

    def _check_path(self, path: str) -> str:
        clean = path.strip("/")
        if not clean:
            raise PermanentError(f"vault {self.name!r}: empty secret path")
        return clean

    def _check(self, path: str, field: str) -> tuple[str, str]:
        if not field:
            raise PermanentError(f"vault {self.name!r}: empty field name for {path}")
        return self._check_path(path), field

    def _version_number(self, version: str) -> int:
        try:
            number = int(version)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            raise PermanentError(f"vault {self.name!r}: {version!r} is not a KV v2 version number")
        return number

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(random.uniform(0, 0.02 * (attempt + 1)))
