"""The contract every :class:`~rotator.interfaces.Vault` plugin is held to, as a pytest suite.

The "no outage" and "nothing orphaned" invariants rest on the vault as much as on the engine: a
staged key must stay invisible to agents until promoted, promotion must keep the secret's other
fields and the previous version, every step must be safe to repeat after a crash, and rollback
must bring the old key back. Built-in vaults run this suite; a third-party vault plugin runs it
by subclassing :class:`VaultContract` in its own test module and supplying two fixtures::

    from rotator.testing.vault_contract import VaultContract

    class TestMyVaultContract(VaultContract):
        pass

- ``vault``: a constructed vault instance with read and write access under the test paths.
- ``new_path``: a fresh path, unused by any other test, for each test.

Everything is written through the vault under test itself (stage then promote), so the suite
needs no second client. Version ids are treated as opaque strings. Assertion messages never show
a secret value (this module is not rewritten by pytest, and a failing assert must not print a
key into a CI log).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from rotator.errors import NotFound, RotatorError, TransientError
from rotator.interfaces import Secret, StagingInventory, Vault
from rotator.testing.provider_contract import (
    assert_no_secret_in_exception,
    new_rotation_id,
    settings_model_rejects_unknown_keys,
)

__all__ = ["VaultContract"]


class VaultContract:
    """Subclass as ``TestXxxContract`` and supply ``vault`` and ``new_path`` fixtures.

    ``field_a`` and ``field_b`` are the two fields of one secret the suite rotates; override
    :meth:`new_secret` if the vault restricts what a value may look like.
    """

    field_a: ClassVar[str] = "API_KEY"
    field_b: ClassVar[str] = "OTHER_API_KEY"

    # -- hooks a plugin's test class may override ----------------------------------------------

    def new_secret(self) -> Secret:
        """A fresh random value, shaped like an API key."""
        return Secret(f"sk-contract-{secrets.token_urlsafe(32)}")

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def metadata(key_id: str, rotation_id: str) -> dict[str, str]:
        """What the engine passes to ``promote``/``restore``."""
        return {
            "key_id": key_id,
            "rotation_id": rotation_id,
            "rotated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def put(
        self, vault: Vault, path: str, field: str, secret: Secret, key_id: str
    ) -> tuple[str, str]:
        """Stage and promote ``secret`` as one rotation would; ``(rotation_id, version)``."""
        rotation_id = new_rotation_id()
        vault.stage(path, field, secret, rotation_id)
        version = vault.promote(path, field, rotation_id, self.metadata(key_id, rotation_id))
        return rotation_id, version

    @staticmethod
    def current(vault: Vault, path: str, field: str) -> tuple[Secret | None, str | None]:
        value = vault.read(path, field)
        return value.secret, value.version

    # -- static guarantees ---------------------------------------------------------------------

    def test_type_name_and_settings_model(self, vault: Vault) -> None:
        """``type_name`` is the non-empty ``type`` of ``[vaults.NAME]`` and its entry point
        name; ``settings_model`` refuses unknown keys so ``rotator check`` reports them."""
        cls = type(vault)
        assert isinstance(cls.type_name, str) and cls.type_name.strip(), (
            f"{cls.__qualname__}.type_name must be a non-empty str"
        )
        settings_model_rejects_unknown_keys(
            cls.settings_model, f"{cls.__qualname__}.settings_model"
        )

    # -- read and stage ------------------------------------------------------------------------

    def test_read_of_a_missing_path_raises_not_found(self, vault: Vault, new_path: str) -> None:
        """``read`` of a path holding no secret raises :class:`NotFound` (not a transient error
        to retry, not None); ``read_staged`` there returns None."""
        with pytest.raises(NotFound):
            vault.read(new_path, self.field_a)
        assert vault.read_staged(new_path, self.field_a, new_rotation_id()) is None, (
            "read_staged at a path where nothing was staged must return None"
        )

    def test_a_staged_key_is_only_for_its_rotation_and_not_current(
        self, vault: Vault, new_path: str
    ) -> None:
        """A staged key is returned by ``read_staged`` for its own rotation id only, staging
        twice is harmless, and agents (``read``) keep seeing the current key until promote."""
        old = self.new_secret()
        _, old_version = self.put(vault, new_path, self.field_a, old, "key_old")
        staged, rotation_id = self.new_secret(), new_rotation_id()
        vault.stage(new_path, self.field_a, staged, rotation_id)
        vault.stage(new_path, self.field_a, staged, rotation_id)

        same = vault.read_staged(new_path, self.field_a, rotation_id) == staged
        assert same, "read_staged did not return the key staged by the same rotation id"
        other = vault.read_staged(new_path, self.field_a, new_rotation_id())
        assert other is None, "read_staged returned a key for a rotation id that staged none"
        secret, version = self.current(vault, new_path, self.field_a)
        unchanged = secret == old and version == old_version
        assert unchanged, "staging changed what agents read: the current value or version"

    def test_a_staged_key_on_a_new_path_is_not_readable_as_current(
        self, vault: Vault, new_path: str
    ) -> None:
        """Staging at a path with no secret yet does not create a current value for agents."""
        staged = self.new_secret()
        vault.stage(new_path, self.field_a, staged, new_rotation_id())
        try:
            secret, _ = self.current(vault, new_path, self.field_a)
        except NotFound:
            return
        assert secret != staged, "a staged key is readable as the current value before promote"

    # -- promote -------------------------------------------------------------------------------

    def test_promote_makes_it_current_keeps_other_fields_and_the_previous_version(
        self, vault: Vault, new_path: str
    ) -> None:
        """``promote`` makes the staged key current and returns that version; the other fields
        of the secret are kept; the value it replaced stays readable with ``read_version``."""
        a1, b1, a2 = self.new_secret(), self.new_secret(), self.new_secret()
        _, v_a1 = self.put(vault, new_path, self.field_a, a1, "key_a1")
        _, v_b1 = self.put(vault, new_path, self.field_b, b1, "key_b1")
        assert isinstance(v_a1, str) and isinstance(v_b1, str) and v_a1 != v_b1, (
            f"promote must return a new version id each time (got {v_a1!r}, {v_b1!r})"
        )
        a_kept = self.current(vault, new_path, self.field_a) == (a1, v_b1)
        assert a_kept, f"promoting {self.field_b} lost {self.field_a} or did not report the version"

        _, v_a2 = self.put(vault, new_path, self.field_a, a2, "key_a2")
        assert v_a2 not in (v_a1, v_b1), f"promote returned an old version id {v_a2!r}"
        now_a = self.current(vault, new_path, self.field_a) == (a2, v_a2)
        assert now_a, f"after promote, read({self.field_a}) is not the new key at version {v_a2}"
        b_kept = self.current(vault, new_path, self.field_b) == (b1, v_a2)
        assert b_kept, f"promoting {self.field_a} changed or dropped {self.field_b}"
        previous = vault.read_version(new_path, self.field_a, v_b1) == a1
        assert previous, f"read_version({v_b1!r}) does not return the previous {self.field_a}"
        first = vault.read_version(new_path, self.field_a, v_a1) == a1
        assert first, f"read_version({v_a1!r}) does not return the first {self.field_a}"

    def test_promote_is_idempotent_per_rotation(self, vault: Vault, new_path: str) -> None:
        """A second ``promote`` with the same rotation id returns the same version and writes
        no new one, even once the staged copy is discarded (a crash between promote and the
        record of it makes the engine run promote again)."""
        self.put(vault, new_path, self.field_a, self.new_secret(), "key_old")
        new, rotation_id = self.new_secret(), new_rotation_id()
        vault.stage(new_path, self.field_a, new, rotation_id)
        meta = self.metadata("key_new", rotation_id)
        version = vault.promote(new_path, self.field_a, rotation_id, meta)
        again = vault.promote(new_path, self.field_a, rotation_id, meta)
        assert again == version, f"second promote returned {again!r}, first {version!r}"
        vault.discard_staged(new_path, rotation_id)
        after_discard = vault.promote(new_path, self.field_a, rotation_id, meta)
        assert after_discard == version, (
            f"promote after discard_staged returned {after_discard!r}, expected {version!r}"
        )
        still = self.current(vault, new_path, self.field_a) == (new, version)
        assert still, "a repeated promote wrote a new version or changed the value"

    def test_metadata_records_key_and_rotation_per_field(self, vault: Vault, new_path: str) -> None:
        """The current version's metadata for a field carries the ``key_id`` and ``rotation_id``
        of the rotation that wrote it, is kept when another field rotates, and never holds a
        secret."""
        a, b = self.new_secret(), self.new_secret()
        rid_a, _ = self.put(vault, new_path, self.field_a, a, "key_a")
        rid_b, _ = self.put(vault, new_path, self.field_b, b, "key_b")
        meta_a = dict(vault.read(new_path, self.field_a).metadata)
        meta_b = dict(vault.read(new_path, self.field_b).metadata)
        assert meta_a.get("key_id") == "key_a" and meta_a.get("rotation_id") == rid_a, (
            f"metadata of {self.field_a} is {meta_a}, expected key_id 'key_a', "
            f"rotation_id {rid_a!r}"
        )
        assert meta_b.get("key_id") == "key_b" and meta_b.get("rotation_id") == rid_b, (
            f"metadata of {self.field_b} is {meta_b}, expected key_id 'key_b', "
            f"rotation_id {rid_b!r}"
        )
        shown = " ".join(f"{k}={v}" for meta in (meta_a, meta_b) for k, v in meta.items())
        leaked = a.reveal() in shown or b.reveal() in shown
        assert not leaked, "vault metadata contains a secret value"

    # -- restore -------------------------------------------------------------------------------

    def test_restore_brings_the_old_key_back_idempotently(
        self, vault: Vault, new_path: str
    ) -> None:
        """``restore`` of the previous version makes the old value current again (rollback),
        keeps the other fields and the new key's version readable, records the metadata it is
        given, and a second call returns the same version without writing another."""
        b, old, new = self.new_secret(), self.new_secret(), self.new_secret()
        self.put(vault, new_path, self.field_b, b, "key_b")
        _, v_old = self.put(vault, new_path, self.field_a, old, "key_old")
        rotation_id, v_new = self.put(vault, new_path, self.field_a, new, "key_new")

        undo = f"{rotation_id}/rollback"
        meta = self.metadata("key_old", undo)
        restored = vault.restore(new_path, self.field_a, v_old, undo, meta)
        value = vault.read(new_path, self.field_a)
        back = value.secret == old and value.version == restored
        assert back, f"after restore({v_old!r}) the old key is not current at {restored!r}"
        assert restored != v_new, "restore returned the version it was meant to undo"
        assert value.metadata.get("key_id") == "key_old", (
            f"metadata after restore is {dict(value.metadata)}, expected key_id 'key_old'"
        )
        b_kept = vault.read(new_path, self.field_b).secret == b
        assert b_kept, f"restore of {self.field_a} changed or dropped {self.field_b}"
        new_readable = vault.read_version(new_path, self.field_a, v_new) == new
        assert new_readable, "after restore the new key's version is no longer readable"

        again = vault.restore(new_path, self.field_a, v_old, undo, meta)
        assert again == restored, f"second restore returned {again!r}, first {restored!r}"
        same = self.current(vault, new_path, self.field_a) == (old, restored)
        assert same, "a repeated restore wrote a new version or changed the value"

    def test_companions_become_current_with_the_key_and_roll_back_with_it(
        self, vault: Vault, new_path: str
    ) -> None:
        """Companion fields (an AWS access key id beside its secret) are staged with the key,
        become current in the same version on ``promote``, are read back by ``read``, and
        ``restore`` brings the old ones back with the old key."""
        companion = "KEY_ID"
        old, new = self.new_secret(), self.new_secret()
        first = new_rotation_id()
        vault.stage(new_path, self.field_a, old, first, {companion: "id-old"})
        v_old = vault.promote(new_path, self.field_a, first, self.metadata("id-old", first))
        second = new_rotation_id()
        vault.stage(new_path, self.field_a, new, second, {companion: "id-new"})
        hidden = vault.read(new_path, self.field_a, (companion,)).companions.get(companion)
        assert hidden == "id-old", f"a staged companion is already current ({hidden!r})"
        v_new = vault.promote(new_path, self.field_a, second, self.metadata("id-new", second))
        value = vault.read(new_path, self.field_a, (companion,))
        together = value.secret == new and value.version == v_new
        assert together, "after promote the new key is not current"
        assert dict(value.companions) == {companion: "id-new"}, (
            f"companions after promote are {dict(value.companions)}, expected id-new")
        undo = f"{second}/rollback"
        vault.restore(new_path, self.field_a, v_old, undo, self.metadata("id-old", undo),
                      (companion,))
        back = vault.read(new_path, self.field_a, (companion,))
        assert back.secret == old, "restore did not bring the old key back"
        assert dict(back.companions) == {companion: "id-old"}, (
            f"companions after restore are {dict(back.companions)}, expected id-old")
        missing = vault.read(new_path, self.field_a, ("NO_SUCH_FIELD",)).companions
        assert dict(missing) == {}, f"a missing companion was reported as {dict(missing)}"

    # -- discard_staged ------------------------------------------------------------------------

    def test_discard_staged_is_idempotent(self, vault: Vault, new_path: str) -> None:
        """After ``discard_staged`` the staged key is gone (``read_staged`` returns None); a
        second discard, or one where nothing was ever staged, is success."""
        rotation_id = new_rotation_id()
        vault.stage(new_path, self.field_a, self.new_secret(), rotation_id)
        vault.discard_staged(new_path, rotation_id)
        gone = vault.read_staged(new_path, self.field_a, rotation_id)
        assert gone is None, "read_staged still returns a key after discard_staged"
        vault.discard_staged(new_path, rotation_id)
        vault.discard_staged(new_path, new_rotation_id())

    def test_discard_staged_leaves_other_rotations_and_the_current_key(
        self, vault: Vault, new_path: str
    ) -> None:
        """Discarding one rotation's staged key leaves another rotation's staged key and the
        current value alone."""
        current = self.new_secret()
        _, version = self.put(vault, new_path, self.field_a, current, "key_cur")
        mine, theirs = new_rotation_id(), new_rotation_id()
        kept = self.new_secret()
        vault.stage(new_path, self.field_a, self.new_secret(), mine)
        vault.stage(new_path, self.field_a, kept, theirs)
        vault.discard_staged(new_path, mine)
        other = vault.read_staged(new_path, self.field_a, theirs) == kept
        assert other, "discard_staged removed another rotation's staged key"
        same = self.current(vault, new_path, self.field_a) == (current, version)
        assert same, "discard_staged changed the current value"
        vault.discard_staged(new_path, theirs)

    def test_staging_inventory_lists_what_is_staged_until_it_is_discarded(
        self, vault: Vault, new_path: str
    ) -> None:
        """A vault that is a ``StagingInventory`` lists every key staged in it, by path and
        rotation id (what ``rotator status`` and ``check --online`` report as leftovers once
        the rotation ended), and forgets each once it is discarded, promoted or not. No
        listing holds a value."""
        if not isinstance(vault, StagingInventory):
            pytest.skip(f"{type(vault).__name__} is not a StagingInventory")

        def staged_here() -> list[tuple[str, str]]:
            return sorted((c.path, c.rotation_id) for c in vault.staged_copies()
                          if c.path == new_path)

        assert vault.staged_rotations(new_path) == [], "a fresh path has nothing staged"
        assert staged_here() == [], "a fresh path has nothing staged"
        promoted, left = new_rotation_id(), new_rotation_id()
        values = [self.new_secret(), self.new_secret()]
        vault.stage(new_path, self.field_a, values[0], promoted)
        vault.stage(new_path, self.field_a, values[1], left)
        assert sorted(vault.staged_rotations(new_path)) == sorted([promoted, left])
        assert staged_here() == sorted([(new_path, promoted), (new_path, left)])
        listing = repr(vault.staged_copies())
        assert not any(v.reveal() in listing for v in values), "a staged copy shows its value"
        vault.promote(new_path, self.field_a, promoted, self.metadata("key_p", promoted))
        vault.discard_staged(new_path, promoted)
        assert vault.staged_rotations(new_path) == [left]
        assert staged_here() == [(new_path, left)]
        vault.discard_staged(new_path, left)
        assert vault.staged_rotations(new_path) == []
        assert staged_here() == []

    # -- errors --------------------------------------------------------------------------------

    def test_misuse_fails_permanently_without_showing_a_secret(
        self, vault: Vault, new_path: str
    ) -> None:
        """Promoting a rotation that staged nothing, and restoring a field that a version does
        not have, raise a :class:`RotatorError` that is not transient (a retry cannot fix
        them) and whose message and chain show no secret; the current key is untouched."""
        current, staged = self.new_secret(), self.new_secret()
        _, version = self.put(vault, new_path, self.field_a, current, "key_cur")
        staged_by = new_rotation_id()
        vault.stage(new_path, self.field_a, staged, staged_by)
        values = [current, staged]

        nobody = new_rotation_id()
        with pytest.raises(RotatorError) as caught:
            vault.promote(new_path, self.field_a, nobody, self.metadata("key_x", nobody))
        assert not isinstance(caught.value, TransientError), (
            "promote of a rotation that staged nothing raised a TransientError; retrying "
            "cannot fix it"
        )
        assert_no_secret_in_exception(caught.value, values, "promote with nothing staged")

        with pytest.raises(RotatorError) as caught:
            vault.restore(
                new_path, "NO_SUCH_FIELD", version, nobody, self.metadata("key_x", nobody)
            )
        assert not isinstance(caught.value, TransientError), (
            "restore of a field the version lacks raised a TransientError; retrying cannot fix it"
        )
        assert_no_secret_in_exception(caught.value, values, "restore of a missing field")

        same = self.current(vault, new_path, self.field_a) == (current, version)
        assert same, "a failed promote or restore changed the current value"
        still = vault.read_staged(new_path, self.field_a, staged_by) == staged
        assert still, "a failed promote of another rotation lost this rotation's staged key"
        vault.discard_staged(new_path, staged_by)
