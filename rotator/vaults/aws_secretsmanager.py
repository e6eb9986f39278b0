"""AWS Secrets Manager: a secret holds a JSON object of fields, rotated with AWS's staging labels.

``path`` is the SecretId (a name, or an ARN). Its value is a JSON object such as
``{"AWS_ACCESS_KEY_ID": "AKIA...", "AWS_SECRET_ACCESS_KEY": "...", "OTHER": "kept"}``; rotator
changes only a credential's field and its companion fields and keeps every other one. Agents read
the ``AWSCURRENT`` version, as every AWS SDK does by default.

The rotation follows the AWS staging-label protocol:

- ``stage`` writes the whole JSON object with the new key as a new version labelled
  ``AWSPENDING``, with a ``ClientRequestToken`` derived from the rotation id (uuid5), so a
  retried call never makes a second version. The version also gets the label
  ``rotator:<rotation id>``: ``AWSPENDING`` can sit on one version only, and two credentials
  sharing a secret may be rotating at once.
- ``promote`` moves ``AWSCURRENT`` to that version (AWS moves ``AWSPREVIOUS`` to the old one)
  and removes ``AWSPENDING``.
- ``restore`` (rollback) moves ``AWSCURRENT`` back to the old version.

Every move of ``AWSCURRENT`` names the version it is taken from (``RemoveFromVersionId``), which
AWS refuses if another writer moved it meanwhile: a check-and-set. If the secret changed between
``stage`` and ``promote`` (another field rotated, an operator edited it), the staged version
would undo that change, so ``promote`` writes a fresh version with the current JSON and this
rotation's fields instead (the same for ``restore``). Those versions also get ids derived from
the rotation id, which makes every step idempotent.

Metadata cannot live in the JSON agents read, so it lives in secret tags:
``rotator:field:<field>`` = ``<version id> <key id> <rotation id> <rotated at>``, valid for the
current version while the field still holds the value of the version named (like the ``vault``
backend), and ``rotator:staged:<rotation id>`` = the fields a staged rotation writes. Tag values
never hold a secret. A secret that does not exist yet is created holding ``{}`` at the first
``stage`` (AWS makes the first version of a secret current whatever its labels say).

IAM permissions the daemon needs on its secrets: ``secretsmanager:GetSecretValue``,
``DescribeSecret``, ``PutSecretValue``, ``UpdateSecretVersionStage``, ``TagResource``,
``UntagResource``, ``CreateSecret`` (only to create missing secrets), ``ListSecrets`` (health
check; an AccessDenied there still proves the credentials work), and ``kms:Decrypt`` /
``kms:GenerateDataKey`` on a customer-managed KMS key if the secret uses one.

The helpers shared with ``providers/aws_iam.py`` (client factory, error codes) are in
:mod:`rotator.aws`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

from pydantic import Field, model_validator

from rotator.aws import (
    AUTH_CODES,
    DENIED_CODES,
    AwsCredentialRefs,
    AwsEndpoint,
    AwsRegion,
    aws_detail,
    error_code,
    is_transient,
    make_client,
    quiet_sdk_loggers,
    transient,
    transport_error,
    warm_up_clients,
)
from rotator.errors import NotFound, PermanentError, RotatorError, TransientError
from rotator.interfaces import (
    PluginSettings,
    Secret,
    SecretRef,
    StagedCopy,
    StagingInventory,
    Vault,
    VaultValue,
)
from rotator.plugin_support import same_text
from rotator.systemd import expand_credentials_directory

# quiet_sdk_loggers is re-exported: rotator.testing.moto_server imports it from here.
__all__ = ["SecretsManagerSettings", "SecretsManagerVault", "quiet_sdk_loggers"]

log = logging.getLogger(__name__)

# -- the vault ----------------------------------------------------------------------------------

PENDING = "AWSPENDING"
CURRENT = "AWSCURRENT"
PREVIOUS = "AWSPREVIOUS"
LABEL_PREFIX = "rotator:"
"""Staging label ``rotator:<rotation id>`` marks the version a rotation staged."""
META_TAG = "rotator:field:"
STAGED_TAG = "rotator:staged:"
VERSIONS_PER_ROTATION = 16
"""Versions one rotation id may write (each retry with a different content takes one)."""
CAS_ATTEMPTS = 10
_META_KEYS = ("key_id", "rotation_id", "rotated_at")
_NAMESPACE = uuid.UUID("6f0c4a2e-9d1b-5c43-8e57-2b1f6a7d9e30")
_TAG_SAFE = re.compile(r"[A-Za-z0-9+\-._:/@]")
_HEX_PAIR = re.compile(r"[0-9A-F]{2}")
_MAX_TAG_KEY = 128
_MAX_TAG_VALUE = 256


class SecretsManagerSettings(AwsCredentialRefs):
    """``[vaults.NAME]`` with ``type = "aws-secretsmanager"``.

    Explicit credentials may only come from ``{ env }`` or ``{ file }``: a vault cannot read
    its own credentials from a vault.
    """

    region: AwsRegion = Field(description="The region of the secrets, e.g. us-east-1.")
    endpoint_url: AwsEndpoint = Field(
        default=None, description="A VPC or FIPS endpoint, or a test server such as moto.")
    timeout: float = Field(default=10, gt=0, description="Seconds per request.")

    @model_validator(mode="after")
    def _no_vault_refs(self) -> SecretsManagerSettings:
        for name in ("access_key_id", "secret_access_key", "session_token"):
            ref = getattr(self, name)
            if ref is not None and ref.vault is not None:
                raise ValueError(
                    f"{name} of an aws-secretsmanager vault must be {{ env = \"VAR\" }} or "
                    "{ file = \"PATH\" }: a vault cannot read its own credentials from a vault")
        return self


@dataclass(frozen=True)
class _Version:
    """One version of a secret as read: its id, labels, and JSON object."""

    id: str
    stages: tuple[str, ...]
    data: dict[str, Any]


@dataclass(frozen=True)
class _Described:
    stages: dict[str, list[str]]
    """VersionIdsToStages: only versions that carry a label."""
    tags: dict[str, str]


class _Conflict(Exception):
    """``AWSCURRENT`` was not on the version we took it from: another writer moved it."""


def _as_text(value: Any) -> str | None:
    """A JSON field as text; None when absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _escape(text: str) -> str:
    """``text`` in the characters AWS allows in tags, reversibly (``=XX`` per other byte)."""
    out = []
    for ch in text:
        if _TAG_SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode())
    return "".join(out)


def _unescape(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "=" and _HEX_PAIR.fullmatch(text[i + 1:i + 3]):
            raw.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode())
            i += 1
    return raw.decode(errors="replace")


def _tag_key(prefix: str, name: str) -> str:
    key = prefix + _escape(name)
    if len(key) > _MAX_TAG_KEY:
        key = prefix + "sha256:" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return key


def version_id(rotation_id: str, n: int) -> str:
    """The ``n``-th version id (and ClientRequestToken) a rotation may write."""
    return str(uuid.uuid5(_NAMESPACE, f"{rotation_id}#{n}"))


def _owned(rotation_id: str) -> dict[str, int]:
    return {version_id(rotation_id, n): n for n in range(VERSIONS_PER_ROTATION)}


def _staged_ids(stages: Mapping[str, list[str]], tags: Mapping[str, str]) -> set[str]:
    """Rotation ids with a staging label or a record of staged fields on a secret (a record
    whose key had to be hashed names no id: its label still does)."""
    found = {label[len(LABEL_PREFIX):] for labels in stages.values() for label in labels
             if label.startswith(LABEL_PREFIX)}
    found |= {_unescape(key[len(STAGED_TAG):]) for key in tags
              if key.startswith(STAGED_TAG) and not key.startswith(STAGED_TAG + "sha256:")}
    return found


class SecretsManagerVault(Vault, StagingInventory):
    """AWS Secrets Manager; see the module docstring for the protocol and the layout.

    Thread-safe: boto3 clients are; the one client is built under a lock and dropped when AWS
    refuses its credentials, so that the next call reads them again (they may be rotated).
    """

    type_name: ClassVar[str] = "aws-secretsmanager"
    settings_model: ClassVar[type[PluginSettings]] = SecretsManagerSettings

    def __init__(self, name: str, settings: PluginSettings) -> None:
        super().__init__(name, settings)
        self.cfg = cast(SecretsManagerSettings, settings)
        self._lock = threading.Lock()
        self._sm: Any = None

    # -- Vault contract -------------------------------------------------------------------------

    def read(self, path: str, field: str, companions: Sequence[str] = ()) -> VaultValue:
        path, field = self._check(path, field)
        current = self._get(path, CURRENT)
        if current is None:
            raise NotFound(f"{self._where(path)}: no such secret (or it has no AWSCURRENT "
                           "version)")
        described = self._describe(path)
        metadata = self._field_metadata(path, field, current, described)
        value = _as_text(current.data.get(field))
        found = {name: text for name in companions
                 if (text := _as_text(current.data.get(name))) is not None}
        return VaultValue(secret=Secret(value) if value is not None else None,
                          version=current.id, metadata=metadata, companions=found)

    def read_version(self, path: str, field: str, version: str) -> Secret | None:
        path, field = self._check(path, field)
        found = self._get(path, version_id=version)
        if found is None:
            raise NotFound(f"{self._where(path)}: no version {version}")
        value = _as_text(found.data.get(field))
        return Secret(value) if value is not None else None

    def stage(self, path: str, field: str, secret: Secret, rotation_id: str,
              companions: Mapping[str, str] | None = None) -> None:
        path, field = self._check(path, field)
        self._check_rotation(rotation_id)
        ours = {k: str(v) for k, v in (companions or {}).items() if k != field}
        ours[field] = secret.reveal()
        names = [field, *(k for k in ours if k != field)]
        staged_tag = " ".join(_escape(n) for n in names)
        if len(staged_tag) > _MAX_TAG_VALUE:
            raise PermanentError(f"{self._where(path)}: the names of field {field!r} and its "
                                 "companions are too long to record in a tag (256 characters)")
        current = self._ensure_current(path, rotation_id)
        # The record of which fields are ours goes first: promote needs it for this version.
        self._tag(path, {_tag_key(STAGED_TAG, rotation_id): staged_tag},
                  what="recording the staged fields")
        content = dict(current.data)
        content.update(ours)
        self._put_owned(path, rotation_id, content, [PENDING, self._label(rotation_id)],
                        what=f"staging a new key for field {field!r}")
        log.debug("%s: rotation %s staged field %s as AWSPENDING", self._where(path),
                  rotation_id, field)

    def read_staged(self, path: str, field: str, rotation_id: str) -> Secret | None:
        path, field = self._check(path, field)
        self._check_rotation(rotation_id)
        staged = self._get(path, self._label(rotation_id))
        if staged is None or staged.id not in _owned(rotation_id):
            return None
        value = _as_text(staged.data.get(field))
        return Secret(value) if value is not None else None

    def discard_staged(self, path: str, rotation_id: str) -> None:
        path = self._check_path(path)
        self._check_rotation(rotation_id)
        described = self._describe(path)
        if described is None:
            return
        self._clear_staging(path, rotation_id, described)

    def staged_rotations(self, path: str) -> list[str]:
        """Rotation ids whose staging label (``rotator:<rotation id>``) or record of staged
        fields is still on the secret (one DescribeSecret call)."""
        path = self._check_path(path)
        described = self._describe(path)
        if described is None:
            return []
        return sorted(_staged_ids(described.stages, described.tags))

    def staged_copies(self) -> list[StagedCopy]:
        """Staging labels and records of staged fields on every secret of the region that
        this identity may list (ListSecrets, 100 secrets a page; it returns labels and tags,
        so no secret is read or described)."""
        found: list[StagedCopy] = []
        where = f"vault {self.name!r}"
        token: str | None = None
        while True:
            args: dict[str, Any] = {"MaxResults": 100}
            if token:
                args["NextToken"] = token
            page = self._call("list_secrets", where, "listing secrets for staged keys", **args)
            for entry in page.get("SecretList") or ():
                name = str(entry.get("Name") or entry.get("ARN") or "")
                stages = {str(k): list(v)
                          for k, v in (entry.get("SecretVersionsToStages") or {}).items()}
                tags = {str(t["Key"]): str(t.get("Value", "")) for t in entry.get("Tags") or ()}
                found.extend(StagedCopy(
                    path=name, rotation_id=rotation_id,
                    location=f"secret {name}: label {self._label(rotation_id)} and tag "
                    f"{_tag_key(STAGED_TAG, rotation_id)}")
                    for rotation_id in _staged_ids(stages, tags))
            token = page.get("NextToken")
            if not token:
                return sorted(found, key=lambda c: (c.path, c.rotation_id))

    def promote(self, path: str, field: str, rotation_id: str,
                metadata: Mapping[str, str]) -> str:
        path, field = self._check(path, field)
        self._check_rotation(rotation_id)
        self._meta_value("0" * 36, metadata, rotation_id)  # too long for a tag: fail first
        owned = _owned(rotation_id)
        where = self._where(path)
        for attempt in range(CAS_ATTEMPTS):
            described = self._describe(path)
            current = self._get(path, CURRENT)
            if described is None or current is None:
                raise PermanentError(f"{where}: the secret is gone; nothing staged by rotation "
                                     f"{rotation_id} can be promoted")
            done = current.id in owned or self._field_metadata(
                path, field, current, described).get("rotation_id") == rotation_id
            if done:  # promoted before a crash: only finish the records
                self._set_metadata(path, field, current.id, metadata, rotation_id, described)
                self._clear_staging(path, rotation_id, described)
                return current.id
            staged = self._get(path, self._label(rotation_id))
            names = self._staged_names(described, rotation_id)
            if staged is None or staged.id not in owned or names is None \
                    or _as_text(staged.data.get(field)) is None or names[0] != field:
                raise PermanentError(f"{where}: no key staged by rotation {rotation_id} for "
                                     f"field {field!r}; it cannot be promoted")
            desired = dict(current.data)
            desired.update({k: staged.data[k] for k in names if k in staged.data})
            target = staged.id
            if staged.data != desired:
                # The secret changed since stage: promoting the staged version would undo that.
                target = self._put_owned(path, rotation_id, desired, [self._label(rotation_id)],
                                         what=f"re-staging field {field!r} on the current "
                                         "version")
            try:
                self._move_current(path, target, current.id)
            except _Conflict:
                self._backoff(attempt)
                continue
            self._set_metadata(path, field, target, metadata, rotation_id, None)
            self._clear_staging(path, rotation_id, self._describe(path))
            log.info("%s: field %s of rotation %s is now AWSCURRENT (version %s)", where, field,
                     rotation_id, target)
            return target
        raise TransientError(f"{where}: AWSCURRENT moved {CAS_ATTEMPTS} times while field "
                             f"{field!r} was being promoted; retrying later")

    def restore(self, path: str, field: str, version: str, rotation_id: str,
                metadata: Mapping[str, str], companions: Sequence[str] = ()) -> str:
        path, field = self._check(path, field)
        self._check_rotation(rotation_id)
        self._meta_value("0" * 36, metadata, rotation_id)
        where = self._where(path)
        names = [field, *(c for c in companions if c != field)]
        for attempt in range(CAS_ATTEMPTS):
            old = self._get(path, version_id=version)
            if old is None:
                raise PermanentError(f"{where}: version {version} is gone; the old key cannot "
                                     "be restored from it")
            if _as_text(old.data.get(field)) is None:
                raise PermanentError(f"{where}: version {version} has no field {field!r} to "
                                     "restore")
            current = self._get(path, CURRENT)
            if current is None:
                raise PermanentError(f"{where}: the secret has no AWSCURRENT version to roll "
                                     "back")
            desired = dict(current.data)
            for name in names:  # a companion the old version lacked must not outlive rollback
                if name in old.data:
                    desired[name] = old.data[name]
                else:
                    desired.pop(name, None)
            if desired == current.data:  # restored before a crash, or never changed
                self._set_metadata(path, field, current.id, metadata, rotation_id, None)
                if self._label(rotation_id) in current.stages:
                    self._remove_label(path, self._label(rotation_id), current.id)
                return current.id
            if desired == old.data:
                target = old.id  # the documented rollback: AWSCURRENT back to the old version
            else:
                target = self._put_owned(path, rotation_id, desired, [self._label(rotation_id)],
                                         what=f"restoring field {field!r}")
            try:
                self._move_current(path, target, current.id)
            except _Conflict:
                self._backoff(attempt)
                continue
            self._set_metadata(path, field, target, metadata, rotation_id, None)
            if target != old.id:
                self._remove_label(path, self._label(rotation_id), target)
            log.info("%s: field %s restored from version %s (now AWSCURRENT: %s)", where, field,
                     version, target)
            return target
        raise TransientError(f"{where}: AWSCURRENT moved {CAS_ATTEMPTS} times while field "
                             f"{field!r} was being restored; retrying later")

    def health(self) -> None:
        """One cheap call; an AccessDenied still proves the endpoint and credentials work."""
        try:
            self._call("list_secrets", f"vault {self.name!r}", "listing secrets", MaxResults=1)
        except PermanentError as exc:
            if error_code(exc.__cause__ or exc) in DENIED_CODES:
                return
            raise

    def warm_up(self) -> None:
        warm_up_clients(self.cfg.region, "secretsmanager")

    def close(self) -> None:
        with self._lock:
            client, self._sm = self._sm, None
        if client is not None:
            client.close()

    # -- versions and labels --------------------------------------------------------------------

    def _ensure_current(self, path: str, rotation_id: str) -> _Version:
        """The current version, after creating the secret as ``{}`` if it has none: AWS makes
        the first version of a secret current whatever labels it is given."""
        current = self._get(path, CURRENT)
        if current is not None:
            return current
        token = str(uuid.uuid5(_NAMESPACE, f"{rotation_id}#create"))
        if self._describe(path) is None:
            if path.startswith("arn:"):
                raise NotFound(f"{self._where(path)}: no such secret; create it, or name it "
                               "by its name so rotator can create it")
            try:
                self._call("create_secret", self._where(path), "creating the secret",
                           Name=path, SecretString="{}", ClientRequestToken=token,
                           Description="Managed by rotator")
            except RotatorError as exc:
                if error_code(exc.__cause__ or exc) != "ResourceExistsException":
                    raise
        else:
            self._call("put_secret_value", self._where(path), "writing a first, empty version",
                       SecretId=path, SecretString="{}", ClientRequestToken=token)
        current = self._get(path, CURRENT)
        if current is None:
            raise TransientError(f"{self._where(path)}: the new secret has no AWSCURRENT "
                                 "version yet")
        return current

    def _put_owned(self, path: str, rotation_id: str, content: dict[str, Any],
                   labels: list[str], *, what: str) -> str:
        """A version of this rotation holding exactly ``content`` and carrying ``labels``.

        Reuses the rotation's version with that content if there is one (a retry after a
        crash or a timeout); otherwise writes the next of its derived version ids. A version
        cannot change once written (moto does not enforce that; AWS does), so each content
        gets its own id.
        """
        where = self._where(path)
        for n in range(VERSIONS_PER_ROTATION):
            vid = version_id(rotation_id, n)
            existing = self._get(path, version_id=vid)
            if existing is None:
                try:
                    answer = self._call(
                        "put_secret_value", where, what, SecretId=path, ClientRequestToken=vid,
                        SecretString=json.dumps(content), VersionStages=labels)
                except RotatorError as exc:
                    if error_code(exc.__cause__ or exc) != "ResourceExistsException":
                        raise
                    existing = self._get(path, version_id=vid)  # a concurrent retry won
                    if existing is None:
                        raise
                else:
                    missing = [lb for lb in labels if lb not in answer.get("VersionStages", ())]
                    if missing:
                        self._attach(path, vid, missing)
                    return vid
            if existing.data == content:
                self._attach(path, vid, [lb for lb in labels if lb not in existing.stages])
                return vid
        raise PermanentError(f"{where}: rotation {rotation_id} already wrote "
                             f"{VERSIONS_PER_ROTATION} versions; start a new rotation")

    def _attach(self, path: str, vid: str, labels: list[str]) -> None:
        """Put ``labels`` (never AWSCURRENT) on ``vid``, taking each from where it is now."""
        if not labels:
            return
        described = self._describe(path)
        stages = described.stages if described else {}
        for label in labels:
            holder = next((v for v, s in stages.items() if label in s and v != vid), None)
            args: dict[str, Any] = {"SecretId": path, "VersionStage": label,
                                    "MoveToVersionId": vid}
            if holder is not None:
                args["RemoveFromVersionId"] = holder  # AWS requires it; moto does not check
            self._call("update_secret_version_stage", self._where(path),
                       f"labelling version {vid} {label}", **args)

    def _move_current(self, path: str, target: str, current: str) -> None:
        """Move AWSCURRENT from ``current`` to ``target`` (AWS moves AWSPREVIOUS along), or
        raise ``_Conflict`` if AWSCURRENT is no longer on ``current``."""
        if target == current:
            return
        try:
            self._call("update_secret_version_stage", self._where(path),
                       f"moving AWSCURRENT to version {target}", SecretId=path,
                       VersionStage=CURRENT, MoveToVersionId=target,
                       RemoveFromVersionId=current)
        except PermanentError as exc:
            if error_code(exc.__cause__ or exc) == "InvalidParameterException":
                raise _Conflict() from exc
            raise

    def _remove_label(self, path: str, label: str, vid: str) -> None:
        try:
            self._call("update_secret_version_stage", self._where(path),
                       f"removing label {label} from version {vid}", SecretId=path,
                       VersionStage=label, RemoveFromVersionId=vid)
        except PermanentError as exc:
            if error_code(exc.__cause__ or exc) != "InvalidParameterException":
                raise  # else: the label was not (or no longer) there

    def _clear_staging(self, path: str, rotation_id: str, described: _Described | None) -> None:
        """Remove this rotation's staging label, AWSPENDING where it is on one of this
        rotation's versions, then the record of its staged fields (the label goes first: the
        record must exist as long as the label does)."""
        if described is None:
            return
        label, owned = self._label(rotation_id), _owned(rotation_id)
        for vid, stages in described.stages.items():
            if PENDING in stages and vid in owned:
                self._remove_label(path, PENDING, vid)
            if label in stages:
                self._remove_label(path, label, vid)
        key = _tag_key(STAGED_TAG, rotation_id)
        if key in described.tags:
            self._untag(path, [key], what="forgetting the staged fields")

    # -- metadata in tags -----------------------------------------------------------------------

    def _meta_value(self, vid: str, metadata: Mapping[str, str], rotation_id: str) -> str:
        meta = {k: str(metadata.get(k, "")) for k in _META_KEYS}
        meta["rotation_id"] = meta["rotation_id"] or rotation_id
        value = " ".join(_escape(x) for x in (vid, meta["key_id"], meta["rotation_id"],
                                              meta["rotated_at"]))
        if len(value) > _MAX_TAG_VALUE:
            raise PermanentError(f"vault {self.name!r}: key id, rotation id and time are too "
                                 "long to record in a secret tag (256 characters)")
        return value

    def _set_metadata(self, path: str, field: str, vid: str, metadata: Mapping[str, str],
                      rotation_id: str, described: _Described | None) -> None:
        key, value = _tag_key(META_TAG, field), self._meta_value(vid, metadata, rotation_id)
        if described is not None and described.tags.get(key) == value:
            return
        self._tag(path, {key: value}, what=f"recording metadata of field {field!r}")

    def _field_metadata(self, path: str, field: str, current: _Version,
                        described: _Described | None) -> dict[str, str]:
        """What rotator recorded for ``field``, if it still describes the current value."""
        raw = described.tags.get(_tag_key(META_TAG, field)) if described else None
        parts = raw.split(" ") if raw else []
        if len(parts) != 4:
            return {}
        vid, key_id, rotation_id, rotated_at = (_unescape(p) for p in parts)
        if vid != current.id:
            now = _as_text(current.data.get(field))
            then = self._get(path, version_id=vid)
            was = _as_text(then.data.get(field)) if then is not None else None
            if now is None or was is None or not same_text(now, was):
                return {}
        return {"key_id": key_id, "rotation_id": rotation_id, "rotated_at": rotated_at}

    def _staged_names(self, described: _Described, rotation_id: str) -> list[str] | None:
        raw = described.tags.get(_tag_key(STAGED_TAG, rotation_id))
        return [_unescape(p) for p in raw.split(" ")] if raw else None

    def _tag(self, path: str, tags: Mapping[str, str], *, what: str) -> None:
        self._call("tag_resource", self._where(path), what, SecretId=path,
                   Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    def _untag(self, path: str, keys: list[str], *, what: str) -> None:
        self._call("untag_resource", self._where(path), what, SecretId=path, TagKeys=keys)

    # -- reading --------------------------------------------------------------------------------

    def _get(self, path: str, stage: str | None = None, *,
             version_id: str | None = None) -> _Version | None:
        """The version with label ``stage`` or id ``version_id``; None if there is none.

        The label is always given: moto answers a read without one with a stale version.
        """
        args: dict[str, Any] = {"SecretId": path}
        if version_id is not None:
            args["VersionId"] = version_id
            what = f"reading version {version_id}"
        else:
            args["VersionStage"] = stage or CURRENT
            what = f"reading the {stage or CURRENT} version"
        try:
            answer = self._call("get_secret_value", self._where(path), what, **args)
        except NotFound:
            return None
        return _Version(id=str(answer["VersionId"]),
                        stages=tuple(answer.get("VersionStages") or ()),
                        data=self._parse(path, answer))

    def _parse(self, path: str, answer: Mapping[str, Any]) -> dict[str, Any]:
        text = answer.get("SecretString")
        problem = f"{self._where(path)} (version {answer.get('VersionId')})"
        fix = ('rotator keeps fields in a JSON object such as {"API_KEY": "..."}: store the '
               "value under a field name, or point `path` at a JSON secret")
        if text is None:
            raise PermanentError(f"{problem} holds binary data, not a JSON object; {fix}")
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # never quote the text: it may be a bare key
        if not isinstance(data, dict):
            raise PermanentError(f"{problem} is not a JSON object; {fix}")
        return data

    def _describe(self, path: str) -> _Described | None:
        try:
            answer = self._call("describe_secret", self._where(path), "describing the secret",
                                SecretId=path)
        except NotFound:
            return None
        if answer.get("DeletedDate"):
            raise PermanentError(f"{self._where(path)} is scheduled for deletion: restore it "
                                 "(aws secretsmanager restore-secret) or fix `path`")
        return _Described(
            stages={str(k): list(v) for k, v in (answer.get("VersionIdsToStages") or {}).items()},
            tags={str(t["Key"]): str(t.get("Value", "")) for t in answer.get("Tags") or ()})

    # -- the boto3 boundary ---------------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._sm is None:
                cfg = self.cfg
                creds = cfg.boto_credentials(self._resolve)
                self._sm = make_client("secretsmanager", region=cfg.region,
                                       endpoint_url=cfg.endpoint_url, timeout=cfg.timeout,
                                       credentials=creds)
            return self._sm

    def _forget_client(self, client: Any) -> None:
        with self._lock:
            if self._sm is client:
                self._sm = None

    def _resolve(self, ref: SecretRef, setting: str) -> str:
        if ref.env is not None:
            value = os.environ.get(ref.env, "").strip()
            if not value:
                raise PermanentError(f"vault {self.name!r}: environment variable {ref.env} "
                                     f"({setting}) is not set or empty")
            return value
        assert ref.file is not None
        try:
            value = Path(expand_credentials_directory(ref.file)).read_text(
                encoding="utf-8").strip()
        except OSError as exc:
            raise PermanentError(f"vault {self.name!r}: cannot read {setting} file {ref.file} "
                                 f"({exc.strerror})") from None
        if not value:
            raise PermanentError(f"vault {self.name!r}: {setting} file {ref.file} is empty")
        return value

    def _call(self, method: str, where: str, what: str, **kwargs: Any) -> Any:
        """``client.<method>(**kwargs)`` with botocore's exceptions as rotator errors."""
        import botocore.exceptions

        client = self._client()
        try:
            return getattr(client, method)(**kwargs)
        except botocore.exceptions.ParamValidationError:
            # Its text can quote parameter values, secrets included: not chained.
            raise PermanentError(f"{where}: botocore refused the parameters of {what}") from None
        except botocore.exceptions.ClientError as exc:
            raise self._translate(exc, client, where, what) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise cast(RotatorError, transport_error(exc, where, what)) from exc

    def _translate(self, exc: Exception, client: Any, where: str, what: str) -> RotatorError:
        code, detail = error_code(exc), aws_detail(exc)
        if is_transient(exc):
            return transient(exc, f"{where}: AWS could not answer {what} now ({detail})")
        if code == "ResourceNotFoundException":
            return NotFound(f"{where}: not found while {what}")
        if code in AUTH_CODES:
            self._forget_client(client)
            return PermanentError(f"{where}: AWS refused the vault's credentials while {what} "
                                  f"({detail}); check the credentials of [vaults.{self.name}]")
        if code in DENIED_CODES:
            return PermanentError(f"{where}: the vault's AWS identity may not do this: {what} "
                                  f"({detail}); grant it the permissions listed in the "
                                  "aws-secretsmanager documentation")
        if code == "DecryptionFailure" or code.startswith("KMS"):
            return PermanentError(f"{where}: KMS refused {what} ({detail}); allow the vault's "
                                  "identity to use the secret's KMS key")
        if code == "InvalidRequestException" and "deleted" in detail.lower():
            return PermanentError(f"{where} is scheduled for deletion: restore it (aws "
                                  "secretsmanager restore-secret) or fix `path`")
        return PermanentError(f"{where}: AWS refused {what} ({detail})")

    # -- small helpers --------------------------------------------------------------------------

    def _where(self, path: str) -> str:
        return f"vault {self.name!r}: secret {path}"

    @staticmethod
    def _label(rotation_id: str) -> str:
        return LABEL_PREFIX + rotation_id

    def _check_rotation(self, rotation_id: str) -> None:
        if not rotation_id or len(self._label(rotation_id)) > 256:
            raise PermanentError(f"vault {self.name!r}: a rotation id of 1 to 248 characters "
                                 "is needed to stage, promote or restore")

    def _check_path(self, path: str) -> str:
        clean = path.strip()
        if not clean:
            raise PermanentError(f"vault {self.name!r}: empty secret path")
        return clean

    def _check(self, path: str, field: str) -> tuple[str, str]:
        if not field:
            raise PermanentError(f"vault {self.name!r}: empty field name for {path}")
        return self._check_path(path), field

    @staticmethod
    def _backoff(attempt: int, sleep: Callable[[float], None] = time.sleep) -> None:
        sleep(random.uniform(0, 0.05 * (attempt + 1)))
