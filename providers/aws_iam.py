"""AWS IAM user access keys, rotated through the IAM API with boto3.

Each credential is one IAM user. The vault field holds the secret access key and the companion
field (``AWS_ACCESS_KEY_ID`` unless ``access_key_id_field`` says otherwise) its access key id,
which is also the key id rotator records: the engine stages both together so agents never read
a secret with the wrong id.

IAM access keys have no name or description to carry the rotation id, so the user's tags do:

- before ``CreateAccessKey`` the user gets ``rotator:creating`` = ``<rotation id> <ids of the
  keys it has now>``; right after, ``rotator:<AccessKeyId>`` = ``<rotation id>``, and
  ``rotator:creating`` goes.
- ``find_by_rotation`` lists the live keys tagged with the rotation id and, while
  ``rotator:creating`` names that rotation, its untagged keys that are not in the list of
  earlier keys and were created at or after the rotation id's time (less a clock-skew margin).
  So a crash between create and tag still finds the new key, and a key someone made by hand in
  the same second as the rotation started is never mistaken for it (revoking that one could be
  an outage).

AWS allows two access keys per user. ``create`` on a user that has two first deletes what is
provably garbage: keys of this very rotation (left by a crash or a timed-out create; the engine
would revoke them anyway) and *inactive* keys rotator tagged (a revocation interrupted between
deactivating and deleting; an inactive key works for nobody). It never deletes an active key
of another rotation or one rotator did not make: it cannot tell which one agents still use, so
it fails with a message saying which keys exist and what to do.

``verify`` signs STS ``GetCallerIdentity`` with the key pair and checks the ARN is the user's,
and also asks IAM (with the admin credentials) that the key exists and is Active: STS may go on
accepting a deleted key for a few seconds (and moto accepts inactive keys).

Admin permissions, on the users rotated (``arn:aws:iam::ACCOUNT:user/...``): ``iam:ListAccessKeys``,
``CreateAccessKey``, ``UpdateAccessKey``, ``DeleteAccessKey``, ``ListUserTags``, ``TagUser``,
``UntagUser``, ``GetAccessKeyLastUsed``. ``sts:GetCallerIdentity`` needs no permission.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, cast

from pydantic import Field, field_validator

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
    transient,
    transport_error,
    warm_up_clients,
)
from rotator.crashpoints import crashpoint
from rotator.errors import (
    CredentialRejected,
    NotFound,
    PermanentError,
    RotatorError,
    TransientError,
)
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    KeyProbe,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
    SecretResolver,
)
from rotator.plugin_support import FOUND_KEY, accepted, params_as

__all__ = ["AwsIamParams", "AwsIamProvider", "AwsIamSettings"]

log = logging.getLogger(__name__)

TAG_PREFIX = "rotator:"
CREATING_TAG = "rotator:creating"
REVOKING = "revoking"
"""Tag value of a key being revoked that rotator had not tagged (an adopted key)."""
CLOCK_SKEW = timedelta(minutes=5)
"""How far this host's clock may run ahead of AWS's without losing a crashed create's key."""
MAX_KEYS = 2
"""AWS's quota of access keys per IAM user."""
_USER_NAME = re.compile(r"^[A-Za-z0-9_+=,.@-]{1,64}$")
_KEY_ID = re.compile(r"^[A-Z0-9]{16,128}$")
_ROTATION_TIME = re.compile(r"^r(\d{14})-")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AwsIamSettings(AwsCredentialRefs):
    """``[providers.NAME]`` for ``type = "aws-iam"``.

    ``access_key_id``/``secret_access_key`` (and ``session_token``) are references to the admin
    credentials (``{ vault, path, field }``, ``{ env }`` or ``{ file }``); without them boto3's
    default chain is used (environment, ``~/.aws``, an instance or pod role).
    """

    region: AwsRegion = Field(description="Region for STS and the partition, e.g. us-east-1.")
    endpoint_url: AwsEndpoint = Field(
        default=None, description="IAM and STS endpoint (a test server such as moto).")
    sts_endpoint_url: AwsEndpoint = Field(
        default=None, description="STS endpoint when it differs from endpoint_url.")
    timeout: float = Field(default=30, gt=0, description="Seconds per request.")


class AwsIamParams(PluginSettings):
    """``[credentials.params]`` for a credential rotated by an ``aws-iam`` provider."""

    user_name: str = Field(description="The IAM user whose access keys are rotated.")
    access_key_id_field: str = Field(
        default="AWS_ACCESS_KEY_ID",
        description="Vault field written with the access key id beside the secret key.")

    @field_validator("user_name")
    @classmethod
    def _iam_user_name(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("arn:"):
            raise ValueError("user_name must be the IAM user's name, not its ARN (write the "
                             "part after the last '/', e.g. research-agent)")
        if not _USER_NAME.match(value):
            raise ValueError("user_name must be an IAM user name: 1 to 64 letters, digits and "
                             "+ = , . @ _ - (e.g. research-agent)")
        return value

    @field_validator("access_key_id_field")
    @classmethod
    def _field_name(cls, value: str) -> str:
        if not value or _CONTROL.search(value):
            raise ValueError("access_key_id_field must name a vault field, like "
                             "AWS_ACCESS_KEY_ID")
        return value


@dataclass(frozen=True)
class _Key:
    id: str
    active: bool
    created: datetime | None


@dataclass(frozen=True)
class _User:
    """An IAM user's access keys and tags, as listed."""

    name: str
    keys: list[_Key]
    tags: dict[str, str]

    def key(self, key_id: str) -> _Key | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def tag_of(self, key_id: str) -> str | None:
        return self.tags.get(TAG_PREFIX + key_id)

    @property
    def creating(self) -> tuple[str, set[str]] | None:
        """``(rotation id, ids of the keys that existed before its create)``, if pending."""
        raw = self.tags.get(CREATING_TAG)
        if not raw:
            return None
        rid, *before = raw.split(" ")
        return rid, set(before)

    def belongs(self, key: _Key, rotation_id: str) -> bool:
        """Whether ``key`` was created by the rotation ``rotation_id``."""
        tag = self.tag_of(key.id)
        if tag is not None:
            return tag == rotation_id
        creating = self.creating
        if creating is None or creating[0] != rotation_id or key.id in creating[1]:
            return False
        started = _rotation_time(rotation_id)
        return started is None or key.created is None or key.created >= started - CLOCK_SKEW


def _rotation_time(rotation_id: str) -> datetime | None:
    """The UTC time in an engine rotation id (``r20261123131500-1a2b3c4d``), if it has one."""
    found = _ROTATION_TIME.match(rotation_id)
    if not found:
        return None
    try:
        return datetime.strptime(found.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def _arn_user(arn: str) -> str | None:
    """The user name in an IAM user ARN (``arn:aws:iam::123:user/path/name``), else None."""
    resource = arn.split(":", 5)[-1] if arn.count(":") >= 5 else ""
    if not resource.startswith("user/"):
        return None
    return resource.rsplit("/", 1)[-1]


def _params(credential: CredentialInfo) -> AwsIamParams:
    return params_as(credential, AwsIamParams, "aws-iam")


class AwsIamProvider(Provider, KeyProbe):
    """Rotates the access keys of one IAM user per credential.

    Thread-safe: boto3 clients are; the admin clients are built under a lock and dropped when
    AWS refuses the admin credentials, so the next call resolves them again (they may rotate).
    """

    probe_companions: ClassVar[tuple[str, ...]] = ("AWS_ACCESS_KEY_ID",)

    type_name: ClassVar[str] = "aws-iam"
    settings_model: ClassVar[type[PluginSettings]] = AwsIamSettings
    params_model: ClassVar[type[PluginSettings]] = AwsIamParams
    capabilities: ClassVar[Capabilities] = Capabilities(
        create=True, identify=True, verify_revoked=True)

    def __init__(self, name: str, settings: PluginSettings, resolve_secret: SecretResolver) -> None:
        super().__init__(name, settings, resolve_secret)
        self._lock = threading.Lock()
        self._admin: tuple[Any, Any] | None = None

    @property
    def config(self) -> AwsIamSettings:
        return cast(AwsIamSettings, self.settings)

    # -- the Provider contract ------------------------------------------------------------------

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        """A new access key for the user, tagged with ``rotation_id`` (see the module doc)."""
        user_name = _params(credential).user_name
        user = self._settle_creating(self._user(user_name), rotation_id)
        if len(user.keys) >= MAX_KEYS:
            self._make_room(credential, user, rotation_id)
        try:
            with self._admin_call(f"creating an access key for IAM user {user_name}",
                                  user=user_name, action="CreateAccessKey") as iam:
                created = iam.create_access_key(UserName=user_name)["AccessKey"]
        except PermanentError as exc:
            if exc.__cause__ is None or error_code(exc.__cause__) != "LimitExceeded":
                raise
            # There was room a moment ago: IAM may still count a key just deleted (it is
            # eventually consistent). The retry lists the keys again and decides afresh.
            raise TransientError(f"{self.name}: IAM still counts {MAX_KEYS} access keys for "
                                 f"{user_name}; retrying") from exc
        key_id = str(created["AccessKeyId"])
        secret = Secret(str(created["SecretAccessKey"]))
        crashpoint("provider:aws-iam:before-tag")
        try:
            self._tag(user_name, {TAG_PREFIX + key_id: rotation_id})
            self._untag(user_name, [CREATING_TAG])
        except RotatorError as exc:  # the creating tag still leads find_by_rotation to it
            log.warning("%s: access key %s of %s created but not tagged: %s", self.name, key_id,
                        user_name, exc)
        log.info("%s: created access key %s for IAM user %s (%s)", self.name, key_id,
                 user_name, credential.name)
        return NewKey(key_id=key_id, secret=secret)

    def verify(self, credential: CredentialInfo, secret: Secret,
               key_id: str | None = None) -> None:
        """The key exists and is Active in IAM, and STS says the pair is the user's."""
        user_name = _params(credential).user_name
        if not key_id:
            raise PermanentError(f"{self.name}: an AWS secret access key cannot be verified "
                                 f"without its access key id ({credential.name})")
        key = next((k for k in self._keys(user_name) if k.id == key_id), None)
        if key is None:
            raise CredentialRejected(f"{self.name}: access key {key_id} of IAM user "
                                     f"{user_name} does not exist (deleted, or never issued)")
        if not key.active:
            raise CredentialRejected(f"{self.name}: access key {key_id} of IAM user "
                                     f"{user_name} is inactive")
        arn = self._caller_arn(key_id, secret, f"verifying access key {key_id} of {user_name}")
        if _arn_user(arn) != user_name:
            raise CredentialRejected(f"{self.name}: access key {key_id} signs in as {arn}, not "
                                     f"as IAM user {user_name}")

    def found_credential(self, secret: Secret, companions: Mapping[str, str]
                         ) -> CredentialInfo | None:
        """The IAM user IAM says owns the access key id found beside the secret key."""
        key_id = companions.get("AWS_ACCESS_KEY_ID")
        if not key_id:
            return None
        try:
            with self._admin_call(f"finding the owner of access key {key_id}",
                                  action="GetAccessKeyLastUsed",
                                  not_found="no such access key") as iam:
                user = iam.get_access_key_last_used(AccessKeyId=key_id).get("UserName")
        except NotFound:
            return None
        if not user:
            return None
        return CredentialInfo(FOUND_KEY, "", AwsIamParams(user_name=user))

    def probe(self, secret: Secret, companions: Mapping[str, str]) -> bool | None:
        """A found secret access key is live when IAM still has its access key id (the
        ``AWS_ACCESS_KEY_ID`` found beside it) Active for some user and STS signs in as that
        user with the pair: ``verify``, for whichever user IAM says owns the key."""
        key_id = companions.get("AWS_ACCESS_KEY_ID")
        if not key_id:
            return None
        found = self.found_credential(secret, companions)
        if found is None:
            return False
        return accepted(self, secret, found.params, key_id=key_id)

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        """Deactivate, then delete the key, then drop its tag; a key already gone is success."""
        user_name = _params(credential).user_name
        user = self._user(user_name)
        key = user.key(key_id)
        if key is None:
            self._check_not_elsewhere(user_name, key_id, credential)
            if user.tag_of(key_id) is not None:
                self._untag(user_name, [TAG_PREFIX + key_id])
            log.info("%s: access key %s of %s was already gone", self.name, key_id, user_name)
            return
        self._delete_key(user, key)
        log.info("%s: revoked access key %s of IAM user %s", self.name, key_id, user_name)

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        user = self._user(_params(credential).user_name)
        return [k.id for k in user.keys if k.active and user.belongs(k, rotation_id)]

    def identify(self, credential: CredentialInfo, secret: Secret,
                 companions: Mapping[str, str] | None = None) -> str | None:
        """The access key id from the vault's companion field, once IAM and STS confirm that
        it is the user's Active key and that ``secret`` is its secret; None otherwise."""
        params = _params(credential)
        key_id = (companions or {}).get(params.access_key_id_field)
        if not key_id:
            log.info("%s: %s has no %s beside its key: cannot identify it", self.name,
                     credential.name, params.access_key_id_field)
            return None
        key = next((k for k in self._keys(params.user_name) if k.id == key_id), None)
        if key is None or not key.active:
            return None
        try:
            arn = self._caller_arn(key_id, secret, f"identifying access key {key_id}")
        except CredentialRejected:
            return None
        return key_id if _arn_user(arn) == params.user_name else None

    def companion_fields(self, credential: CredentialInfo) -> tuple[str, ...]:
        return (_params(credential).access_key_id_field,)

    def companions(self, credential: CredentialInfo, key_id: str) -> Mapping[str, str]:
        return {_params(credential).access_key_id_field: key_id}

    def check_access(self) -> None:
        """STS says who the admin credentials are; IAM answers (an AccessDenied proves it)."""
        with self._admin_call("asking STS who the admin credentials are",
                              action="GetCallerIdentity", service="sts") as sts:
            sts.get_caller_identity()
        try:
            with self._admin_call("listing access keys", action="ListAccessKeys") as iam:
                iam.list_access_keys(MaxItems=1)
        except PermanentError as exc:
            cause = exc.__cause__
            if cause is None or error_code(cause) not in (*DENIED_CODES, "ValidationError"):
                raise

    def warm_up(self) -> None:
        warm_up_clients(self.config.region, "iam", "sts")

    def close(self) -> None:
        with self._lock:
            clients, self._admin = self._admin, None
        for client in clients or ():
            client.close()

    # -- the two-keys quota ---------------------------------------------------------------------

    def _settle_creating(self, user: _User, rotation_id: str) -> _User:
        """Record the keys that exist before this rotation's create (kept if this rotation
        already recorded them), first turning another rotation's pending record into tags on
        the keys it made, and dropping tags of keys that are gone."""
        tags: dict[str, str] = {}
        creating = user.creating
        if creating is not None and creating[0] == rotation_id:
            return user
        if creating is not None:
            for key in user.keys:
                if user.tag_of(key.id) is None and user.belongs(key, creating[0]):
                    tags[TAG_PREFIX + key.id] = creating[0]
        tags[CREATING_TAG] = " ".join([rotation_id, *(k.id for k in user.keys)])
        live = {k.id for k in user.keys}
        stale = [t for t in user.tags if t.startswith(TAG_PREFIX)
                 and _KEY_ID.match(t[len(TAG_PREFIX):]) and t[len(TAG_PREFIX):] not in live]
        self._tag(user.name, tags)
        if stale:
            self._untag(user.name, stale)
        merged = {k: v for k, v in user.tags.items() if k not in stale}
        merged.update(tags)
        return _User(user.name, user.keys, merged)

    def _make_room(self, credential: CredentialInfo, user: _User, rotation_id: str) -> None:
        """Delete the user's keys that are provably garbage, or explain why none can go."""
        garbage: list[tuple[_Key, str]] = []
        for key in user.keys:
            tag = user.tag_of(key.id)
            if user.belongs(key, rotation_id):
                garbage.append((key, f"left by this rotation ({rotation_id}) before a crash "
                                     "or a timeout"))
            elif not key.active and tag is not None:
                garbage.append((key, "inactive: a revocation was interrupted"
                                if tag == REVOKING else f"inactive, made by rotation {tag}"))
        for key, why in garbage:
            self._delete_key(user, key)
            log.warning("%s: deleted access key %s of IAM user %s to make room (%s)",
                        self.name, key.id, user.name, why)
        left = [k for k in user.keys if k not in {g[0] for g in garbage}]
        if len(left) < MAX_KEYS:
            return
        described = "; ".join(self._describe_key(user, k) for k in left)
        raise PermanentError(
            f"{self.name}: IAM user {user.name} already has {len(left)} access keys, the most "
            f"AWS allows ({described}), and rotator cannot tell which one agents still use, so "
            f"it deletes neither. If an earlier rotation of {credential.name} is in its grace "
            "period, wait until it has revoked the old key (rotator status shows it); "
            "otherwise delete the key that is not in the vault (aws iam delete-access-key "
            f"--user-name {user.name} --access-key-id ID) and rotate again")

    @staticmethod
    def _describe_key(user: _User, key: _Key) -> str:
        tag = user.tag_of(key.id)
        origin = (f"made by rotation {tag}" if tag and tag != REVOKING
                  else "being revoked" if tag else "not made by rotator")
        when = f", created {key.created:%Y-%m-%d %H:%M} UTC" if key.created else ""
        return f"{key.id}: {'active' if key.active else 'inactive'}{when}, {origin}"

    def _delete_key(self, user: _User, key: _Key) -> None:
        """Deactivate (tagging it first if rotator never did, so a crash leaves an inactive
        key the next create can recognise), delete, then untag. Each step is idempotent."""
        tag_key = TAG_PREFIX + key.id
        if key.active:
            if user.tag_of(key.id) is None:
                self._tag(user.name, {tag_key: REVOKING})
            with self._admin_call(f"deactivating access key {key.id} of {user.name}",
                                  user=user.name, action="UpdateAccessKey") as iam:
                iam.update_access_key(UserName=user.name, AccessKeyId=key.id, Status="Inactive")
        try:
            with self._admin_call(f"deleting access key {key.id} of {user.name}",
                                  user=user.name, action="DeleteAccessKey") as iam:
                iam.delete_access_key(UserName=user.name, AccessKeyId=key.id)
        except NotFound:
            pass  # deleted meanwhile
        self._untag(user.name, [tag_key])

    def _check_not_elsewhere(self, user_name: str, key_id: str,
                             credential: CredentialInfo) -> None:
        """A key missing from the user's list is gone, unless it belongs to another user (a
        wrong ``user_name`` must not make revocation a silent success)."""
        try:
            with self._admin_call(f"looking up access key {key_id}", action="GetAccessKeyLastUsed"
                                  ) as iam:
                owner = iam.get_access_key_last_used(AccessKeyId=key_id).get("UserName")
        except TransientError:
            raise
        except RotatorError:
            return  # unknown key, or no permission to ask: it is not this user's, and gone
        if owner and owner != user_name:
            raise PermanentError(
                f"{self.name}: access key {key_id} belongs to IAM user {owner}, not {user_name}:"
                f" check params.user_name of {credential.name}")

    # -- IAM and STS ----------------------------------------------------------------------------

    def _user(self, user_name: str) -> _User:
        """The user's keys and tags, across every page."""
        keys = self._keys(user_name)
        tags: dict[str, str] = {}
        with self._admin_call(
                f"listing the tags of IAM user {user_name}", user=user_name,
                action="ListUserTags",
                not_found=f"IAM user {user_name} does not exist: check params.user_name") as iam:
            for page in iam.get_paginator("list_user_tags").paginate(UserName=user_name):
                tags.update({str(t["Key"]): str(t["Value"]) for t in page["Tags"]})
        return _User(user_name, keys, tags)

    def _keys(self, user_name: str) -> list[_Key]:
        """The user's access keys (active or not), across every page."""
        keys: list[_Key] = []
        with self._admin_call(
                f"listing the access keys of IAM user {user_name}", user=user_name,
                action="ListAccessKeys",
                not_found=f"IAM user {user_name} does not exist: check params.user_name") as iam:
            for page in iam.get_paginator("list_access_keys").paginate(UserName=user_name):
                keys.extend(_Key(str(k["AccessKeyId"]), k.get("Status") == "Active",
                                 k.get("CreateDate")) for k in page["AccessKeyMetadata"])
        return keys

    def _tag(self, user_name: str, tags: Mapping[str, str]) -> None:
        with self._admin_call(f"tagging IAM user {user_name}", user=user_name,
                              action="TagUser") as iam:
            iam.tag_user(UserName=user_name,
                         Tags=[{"Key": k, "Value": v} for k, v in tags.items()])

    def _untag(self, user_name: str, keys: list[str]) -> None:
        with self._admin_call(f"untagging IAM user {user_name}", user=user_name,
                              action="UntagUser") as iam:
            iam.untag_user(UserName=user_name, TagKeys=keys)

    def _caller_arn(self, key_id: str, secret: Secret, action: str) -> str:
        """STS ``GetCallerIdentity`` signed with the key pair: the ARN it signs in as."""
        import botocore.exceptions

        sts = make_client("sts", region=self.config.region, endpoint_url=self._sts_endpoint(),
                          timeout=self.config.timeout,
                          credentials={"aws_access_key_id": key_id,
                                       "aws_secret_access_key": secret.reveal()})
        where = f"{self.name}: {action}"
        try:
            return str(sts.get_caller_identity()["Arn"])
        except botocore.exceptions.ParamValidationError:
            raise PermanentError(f"{where}: botocore refused the request parameters") from None
        except botocore.exceptions.ClientError as exc:
            code, detail = error_code(exc), aws_detail(exc)
            if is_transient(exc):
                raise transient(exc, f"{where}: AWS could not answer now ({detail})") from exc
            if code in AUTH_CODES or code in DENIED_CODES:
                raise CredentialRejected(f"{where}: AWS refused the key ({code})") from exc
            raise PermanentError(f"{where}: AWS refused the request ({detail})") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise cast(RotatorError, transport_error(exc, where, "asking STS")) from exc
        finally:
            sts.close()

    def _sts_endpoint(self) -> str | None:
        return self.config.sts_endpoint_url or self.config.endpoint_url

    def _admin_clients(self) -> tuple[Any, Any]:
        """``(iam, sts)`` with the admin credentials, built (and resolved) on first use."""
        with self._lock:
            if self._admin is None:
                cfg = self.config
                creds = cfg.boto_credentials(lambda ref, _: self.resolve_secret(ref).reveal())
                self._admin = (
                    make_client("iam", region=cfg.region, endpoint_url=cfg.endpoint_url,
                                timeout=cfg.timeout, credentials=creds),
                    make_client("sts", region=cfg.region, endpoint_url=self._sts_endpoint(),
                                timeout=cfg.timeout, credentials=creds))
            return self._admin

    def _forget_admin(self, clients: tuple[Any, Any]) -> None:
        with self._lock:
            if self._admin is clients:
                self._admin = None

    @contextmanager
    def _admin_call(self, what: str, *, action: str, user: str | None = None,
                    not_found: str | None = None, service: str = "iam") -> Iterator[Any]:
        """Yield the admin client of ``service`` (IAM API ``action`` is named in a missing
        permission's message); translate botocore exceptions raised inside."""
        import botocore.exceptions

        clients = self._admin_clients()
        where = f"{self.name}: {what}"
        try:
            yield clients[0] if service == "iam" else clients[1]
        except botocore.exceptions.ParamValidationError:
            raise PermanentError(f"{where}: botocore refused the request parameters") from None
        except botocore.exceptions.ClientError as exc:
            code, detail = error_code(exc), aws_detail(exc)
            if is_transient(exc):
                raise transient(exc, f"{where}: AWS could not answer now ({detail})") from exc
            if code == "NoSuchEntity":
                raise NotFound(f"{where}: {not_found or 'not found'} ({detail})") from exc
            if code in AUTH_CODES:
                self._forget_admin(clients)
                raise PermanentError(
                    f"{where}: AWS refused the admin credentials ({detail}); check "
                    f"access_key_id/secret_access_key of [providers.{self.name}]") from exc
            if code in DENIED_CODES:
                on = f" on user {user}" if user else ""
                raise PermanentError(f"{where}: the admin identity is not allowed to ({detail});"
                                     f" grant it {service}:{action}{on}") from exc
            if code == "LimitExceeded":
                raise PermanentError(f"{where}: an AWS quota is reached ({detail})") from exc
            raise PermanentError(f"{where}: AWS refused the request ({detail})") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise cast(RotatorError, transport_error(exc, where, what)) from exc
