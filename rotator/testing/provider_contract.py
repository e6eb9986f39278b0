"""The contract every :class:`~rotator.interfaces.Provider` plugin is held to, as a pytest suite.

The engine relies on more than the method signatures: that a created key works at once, that it
can be found again by its rotation id after a crash, that ``revoke`` is safe to repeat, that a
revoked key is refused, and that no secret ever reaches an exception. Built-in providers run this
suite, and a third-party plugin runs the same one by subclassing :class:`ProviderContract` in its
own test module and supplying four fixtures::

    from rotator.testing.provider_contract import ProviderContract

    class TestMyProviderContract(ProviderContract):
        pass  # the fixtures below come from the module, a conftest.py, or methods here

- ``provider``: a constructed provider instance, pointed at a test server or a sandbox account.
- ``credential``: a :class:`~rotator.interfaces.CredentialInfo` whose ``params`` is an instance
  of the provider's ``params_model``.
- ``key_accepted``: a callable ``(raw_secret: str) -> bool`` telling, independently of the
  provider under test, whether the service accepts that key right now.
- ``live_key_ids``: a callable ``() -> set[str]`` returning the ids of the credential's live keys.

The base class has no ``Test`` prefix, so pytest collects it only through a subclass. Keys the
suite creates are revoked when each test ends, so it can run against a real sandbox account.
Assertion messages name what broke and never show a secret value (this module is not rewritten
by pytest, and a failing assert must not print a key into a CI log).
"""

from __future__ import annotations

import random
import secrets
import string
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from rotator.errors import CredentialRejected, RotatorError
from rotator.interfaces import (
    Capabilities,
    CredentialInfo,
    NewKey,
    PluginSettings,
    Provider,
    Secret,
)

__all__ = [
    "KeyAccepted",
    "LiveKeyIds",
    "MakeKey",
    "ProviderContract",
    "assert_no_secret_in_exception",
    "lookalike",
    "new_rotation_id",
    "settings_model_rejects_unknown_keys",
]

KeyAccepted = Callable[[str], bool]
"""``key_accepted(raw_secret)``: whether the service accepts the key right now."""
LiveKeyIds = Callable[[], set[str]]
"""``live_key_ids()``: ids of the credential's live (not revoked) keys at the service."""
MakeKey = Callable[..., NewKey]
"""``make_key(rotation_id=None)``: ``provider.create`` with clean-up at the end of the test."""

_UNKNOWN_KEY = "rotator_contract_unknown_key"


def new_rotation_id() -> str:
    """A fresh rotation id shaped like the engine's (``r<UTC timestamp>-<8 hex>``)."""
    return f"r{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(4)}"


def lookalike(value: str) -> str:
    """A random string shaped like ``value``: same length, same leading prefix, and each later
    letter or digit replaced by a random one of its kind, so it parses like a key of the same
    service without being one (its redacted form differs too)."""
    keep = len(value) // 3
    rng = random.SystemRandom()
    out = []
    for ch in value[keep:]:
        if ch in string.digits:
            out.append(rng.choice(string.digits))
        elif ch in string.ascii_lowercase:
            out.append(rng.choice(string.ascii_lowercase))
        elif ch in string.ascii_uppercase:
            out.append(rng.choice(string.ascii_uppercase))
        else:
            out.append(ch)
    return value[:keep] + "".join(out)


def assert_no_secret_in_exception(
    exc: BaseException, values: Sequence[Secret | str], what: str
) -> None:
    """Fail if ``str``/``repr``/args of ``exc`` or of anything chained to it shows a value.

    The chain counts because a logged traceback prints every cause. The failure message names
    the exception type only, never the value found, and this frame is hidden from pytest's
    traceback so its arguments (the values) are not printed either.
    """
    __tracebackhide__ = True
    raw = [v.reveal() if isinstance(v, Secret) else v for v in values]
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 20:
        texts = (str(seen), repr(seen), repr(getattr(seen, "args", ())))
        leaked = any(value in text for value in raw for text in texts)
        assert not leaked, (
            f"{what}: a secret value appears in {type(seen).__name__} "
            f"(at depth {depth} of the exception chain)"
        )
        seen = seen.__cause__ or seen.__context__
        depth += 1


def settings_model_rejects_unknown_keys(model: type[Any], label: str) -> None:
    """Fail unless ``model`` is a :class:`PluginSettings` subclass that refuses unknown keys.

    ``rotator check`` relies on it to report a misspelt key instead of silently ignoring it.
    """
    __tracebackhide__ = True
    assert isinstance(model, type) and issubclass(model, PluginSettings), (
        f"{label} must be a subclass of rotator.interfaces.PluginSettings"
    )
    with pytest.raises(ValidationError) as caught:
        model.model_validate({_UNKNOWN_KEY: "x"})
    extra = [e for e in caught.value.errors() if e["loc"] == (_UNKNOWN_KEY,)]
    assert extra and extra[0]["type"] == "extra_forbidden", (
        f"{label} accepted an unknown key: keep model_config extra='forbid' from PluginSettings"
    )


class ProviderContract:
    """Subclass as ``TestXxxContract`` and supply the fixtures listed in the module docstring.

    Class attributes tune the suite for services that are not instantly consistent (set
    ``consistency_timeout`` to the seconds a new or revoked key may take to take effect there).
    Override :meth:`lookalike_secret` or :meth:`unknown_key_id` if the defaults do not produce
    strings the service would parse as a key or a key id.
    """

    consistency_timeout: ClassVar[float] = 0.0
    """Seconds to keep polling for a new key to work, or a revoked one to stop working."""
    poll_interval: ClassVar[float] = 0.5
    _key_ids: ClassVar[dict[Secret, str]] = {}
    """Key id of each secret made by ``make_key`` (``verify`` needs it for AWS-like services)."""

    # -- hooks a plugin's test class may override ----------------------------------------------

    def lookalike_secret(self, secret: str) -> str:
        """A string shaped like a key of this service that is no key at all."""
        return lookalike(secret)

    def unknown_key_id(self, known: str) -> str:
        """A key id shaped like ``known`` that the service has never issued."""
        return lookalike(known)

    # -- fixtures the suite itself provides ----------------------------------------------------

    @pytest.fixture
    def make_key(self, provider: Provider, credential: CredentialInfo) -> Iterator[MakeKey]:
        """``provider.create`` for the test, skipped when the provider cannot create keys.

        Every key made is revoked when the test ends (revoke is idempotent, so a test that
        revoked it already is fine), so nothing outlives the test at a real service.
        """
        if not provider.capabilities.create:
            pytest.skip(
                f"provider {provider.type_name!r} cannot create keys (capabilities.create is "
                "False): the create-based contract tests do not apply"
            )
        made: list[NewKey] = []

        def make(rotation_id: str | None = None) -> NewKey:
            rid = rotation_id or new_rotation_id()
            if provider.capabilities.in_place:
                new = provider.generate(credential, rid)
                provider.apply(credential, new)
            else:
                new = provider.create(credential, rid)
            made.append(new)
            self._key_ids[new.secret] = new.key_id
            return new

        yield make
        for new in made:
            provider.revoke(credential, new.key_id)

    # -- helpers -------------------------------------------------------------------------------

    def _eventually(self, check: Callable[[], bool]) -> bool:
        """``check()`` until it holds or ``consistency_timeout`` passes; its last answer."""
        deadline = time.monotonic() + self.consistency_timeout
        while True:
            if check():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)

    def _verify_eventually(
        self, provider: Provider, credential: CredentialInfo, secret: Secret
    ) -> None:
        deadline = time.monotonic() + self.consistency_timeout
        while True:
            try:
                provider.verify(credential, secret, key_id=self._key_ids.get(secret))
                return
            except CredentialRejected:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(self.poll_interval)

    def _rejected_after_revoke(
        self, provider: Provider, credential: CredentialInfo, secret: Secret
    ) -> CredentialRejected | None:
        """The ``CredentialRejected`` that ``verify`` raises once the revoke has taken effect."""
        deadline = time.monotonic() + self.consistency_timeout
        while True:
            try:
                provider.verify(credential, secret, key_id=self._key_ids.get(secret))
            except CredentialRejected as exc:
                return exc
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.poll_interval)

    # -- static guarantees ---------------------------------------------------------------------

    def test_type_name_and_capabilities(self, provider: Provider) -> None:
        """``type_name`` is the non-empty name the policy file and the entry point use, and
        ``capabilities`` is a :class:`Capabilities` the engine and ``rotator check`` can read."""
        cls = type(provider)
        assert isinstance(cls.type_name, str) and cls.type_name.strip(), (
            f"{cls.__qualname__}.type_name must be a non-empty str (the policy file's `type`)"
        )
        assert isinstance(cls.capabilities, Capabilities), (
            f"{cls.__qualname__}.capabilities must be a rotator.interfaces.Capabilities"
        )

    def test_settings_and_params_models_reject_unknown_keys(self, provider: Provider) -> None:
        """``settings_model`` and ``params_model`` are :class:`PluginSettings` subclasses that
        refuse unknown keys, so ``rotator check`` reports a misspelt option."""
        cls = type(provider)
        name = cls.__qualname__
        settings_model_rejects_unknown_keys(cls.settings_model, f"{name}.settings_model")
        settings_model_rejects_unknown_keys(cls.params_model, f"{name}.params_model")

    def test_entry_point_loads_this_class(self, provider: Provider) -> None:
        """If a ``rotator.providers`` entry point is registered under ``type_name``, it loads
        this very class (the daemon finds plugins only that way)."""
        from importlib.metadata import entry_points

        cls = type(provider)
        eps = [ep for ep in entry_points(group="rotator.providers") if ep.name == cls.type_name]
        if not eps:
            pytest.skip(
                f"no rotator.providers entry point named {cls.type_name!r} is installed "
                "(pip install -e . after adding it to pyproject.toml)"
            )
        loaded = eps[0].load()
        assert loaded is cls, (
            f"entry point {cls.type_name!r} = {eps[0].value} loads {loaded!r}, not {cls!r}"
        )

    # -- create --------------------------------------------------------------------------------

    def test_create_returns_a_working_key(
        self, make_key: MakeKey, key_accepted: KeyAccepted, live_key_ids: LiveKeyIds
    ) -> None:
        """``create`` returns a :class:`NewKey` with a non-empty ``key_id`` and a
        :class:`Secret` the service accepts, and the key is live for the credential."""
        before = live_key_ids()
        new = make_key()
        assert isinstance(new, NewKey), f"create returned {type(new).__name__}, not NewKey"
        assert isinstance(new.key_id, str) and new.key_id, "create returned an empty key_id"
        assert isinstance(new.secret, Secret), "NewKey.secret must be a rotator Secret"
        accepted = self._eventually(lambda: key_accepted(new.secret.reveal()))
        assert accepted, f"the service does not accept the key {new.key_id} that create returned"
        after = live_key_ids()
        assert after - before == {new.key_id}, (
            f"create should add exactly key {new.key_id} to the credential's live keys; "
            f"added {sorted(after - before)}"
        )

    def test_new_key_repr_hides_the_secret(self, make_key: MakeKey) -> None:
        """``repr``/``str`` of the :class:`NewKey` (what a stray log line would show) never
        contain the secret value."""
        new = make_key()
        shown = (repr(new), str(new), repr(new.secret), str(new.secret), f"{new.secret}")
        leaked = any(new.secret.reveal() in text for text in shown)
        assert not leaked, "repr/str of NewKey shows the secret"

    # -- find_by_rotation ----------------------------------------------------------------------

    def test_find_by_rotation_finds_only_its_own_rotation(
        self, provider: Provider, credential: CredentialInfo, make_key: MakeKey
    ) -> None:
        """The key is found by the rotation id it was created with, and not by any other, even
        one that extends or shortens it: after a crash the engine revokes what this returns,
        so a loose match would revoke another rotation's key."""
        rotation_id = new_rotation_id()
        new = make_key(rotation_id)
        found = provider.find_by_rotation(credential, rotation_id)
        assert found == [new.key_id], (
            f"find_by_rotation({rotation_id!r}) returned {found}, expected [{new.key_id!r}]"
        )
        again = provider.find_by_rotation(credential, rotation_id)
        assert again == found, "find_by_rotation is not stable when called twice"
        for other in (new_rotation_id(), rotation_id + "0", rotation_id[:-1]):
            others = provider.find_by_rotation(credential, other)
            assert new.key_id not in others, (
                f"find_by_rotation({other!r}) lists key {new.key_id} of rotation {rotation_id!r}"
            )
            assert others == [], f"find_by_rotation({other!r}) of an unused id returned {others}"

    def test_find_by_rotation_forgets_a_revoked_key(
        self, provider: Provider, credential: CredentialInfo, make_key: MakeKey
    ) -> None:
        """After ``revoke`` the key is no longer listed: clean-up after a crash must not try
        to revoke it again forever, and must not count it as orphaned."""
        rotation_id = new_rotation_id()
        new = make_key(rotation_id)
        provider.revoke(credential, new.key_id)
        found = provider.find_by_rotation(credential, rotation_id)
        assert new.key_id not in found, (
            f"find_by_rotation({rotation_id!r}) still lists revoked key {new.key_id}"
        )

    # -- verify --------------------------------------------------------------------------------

    def test_verify_accepts_a_new_key(
        self, provider: Provider, credential: CredentialInfo, make_key: MakeKey
    ) -> None:
        """``verify`` returns (raises nothing) for a key ``create`` just made, and again when
        called a second time (the engine may repeat it after a crash)."""
        new = make_key()
        self._verify_eventually(provider, credential, new.secret)
        provider.verify(credential, new.secret, key_id=new.key_id)

    def test_verify_rejects_a_revoked_key_without_showing_it(
        self,
        provider: Provider,
        credential: CredentialInfo,
        make_key: MakeKey,
        key_accepted: KeyAccepted,
    ) -> None:
        """After ``revoke``, ``verify`` raises :class:`CredentialRejected` (not a transient
        error, not a bare SDK exception), and neither that exception nor its chain shows the
        key. Skipped for a provider that says it cannot tell (``capabilities.verify_revoked``)."""
        if not provider.capabilities.verify_revoked:
            pytest.skip(
                f"provider {provider.type_name!r} cannot confirm a revoked key is refused "
                "(capabilities.verify_revoked is False)"
            )
        new = make_key()
        provider.revoke(credential, new.key_id)
        refused = self._eventually(lambda: not key_accepted(new.secret.reveal()))
        assert refused, f"the service still accepts key {new.key_id} after revoke"
        try:
            rejected = self._rejected_after_revoke(provider, credential, new.secret)
        except Exception as exc:  # whatever escapes must not show the key either
            assert_no_secret_in_exception(exc, [new.secret], "verify of a revoked key")
            raise AssertionError(
                f"verify of revoked key {new.key_id} raised {type(exc).__name__}, expected "
                "rotator.errors.CredentialRejected (translate the SDK's 401/403 into it)"
            ) from None
        assert rejected is not None, f"verify accepted key {new.key_id} after it was revoked"
        assert_no_secret_in_exception(rejected, [new.secret], "verify of a revoked key")

    # -- revoke --------------------------------------------------------------------------------

    def test_revoke_is_idempotent_and_touches_only_that_key(
        self,
        provider: Provider,
        credential: CredentialInfo,
        make_key: MakeKey,
        key_accepted: KeyAccepted,
        live_key_ids: LiveKeyIds,
    ) -> None:
        """Revoking twice is success, so is revoking an id the service never issued ("already
        gone is success"), and only the named key dies: the credential's other key still works."""
        doomed, kept = make_key(), make_key()
        provider.revoke(credential, doomed.key_id)
        provider.revoke(credential, doomed.key_id)
        provider.revoke(credential, self.unknown_key_id(doomed.key_id))
        live = live_key_ids()
        assert doomed.key_id not in live, f"key {doomed.key_id} is still live after revoke"
        assert kept.key_id in live, f"revoking {doomed.key_id} also removed {kept.key_id}"
        still = key_accepted(kept.secret.reveal())
        assert still, f"revoking {doomed.key_id} made the other key {kept.key_id} stop working"

    # -- identify ------------------------------------------------------------------------------

    def test_identify_finds_a_key_it_created(
        self, provider: Provider, credential: CredentialInfo, make_key: MakeKey
    ) -> None:
        """``identify`` of a live key's secret returns that key's id, so a key that rotator
        adopts (it did not create it) can be revoked at its first rotation."""
        if not provider.capabilities.identify:
            pytest.skip(
                f"provider {provider.type_name!r} cannot identify keys "
                "(capabilities.identify is False)"
            )
        new = make_key()
        found = provider.identify(credential, new.secret,
                                  provider.companions(credential, new.key_id))
        assert found == new.key_id, f"identify returned {found!r}, expected {new.key_id!r}"

    def test_identify_returns_none_for_an_unknown_key(
        self, provider: Provider, credential: CredentialInfo, make_key: MakeKey
    ) -> None:
        """``identify`` of a string shaped like a key that the service never issued returns
        None rather than a guess: a wrong id would revoke some other agent's key."""
        new = make_key()
        fake = Secret(self.lookalike_secret(new.secret.reveal()))
        try:
            found = provider.identify(credential, fake,
                                      provider.companions(credential, new.key_id))
        except RotatorError as exc:
            raise AssertionError(
                f"identify of an unknown key raised {type(exc).__name__}; it must return None"
            ) from None
        assert found is None, f"identify of an unknown key returned {found!r}, expected None"
