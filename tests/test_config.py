"""The policy file: every problem at once, each with file, line and key; nothing else escapes."""

from __future__ import annotations

import re
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import tomli_w
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rotator import plugins
from rotator.config import (
    SECRETS_NEVER_HERE,
    CredentialConfig,
    Policies,
    Problem,
    SecretRef,
    _Locator,
    load_policies,
    parse_policies,
    resolve_config_path,
)
from rotator.errors import ConfigError
from rotator.interfaces import Capabilities, CredentialInfo, NewKey, PluginSettings, Provider
from rotator.policy import decide

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "data" / "bad_policies"
EXPECT = re.compile(r"# expect: (\d+|-): (.*)$")

BASE = textwrap.dedent("""\
    [vaults.main]
    type = "vault"
    url = "http://127.0.0.1:8200"
    token_env = "VAULT_TOKEN"

    [providers.openai-prod]
    type = "openai"
    project_id = "proj_1"
    admin_key = { vault = "main", path = "rotator/openai-admin", field = "key" }
    """)


def credential(name: str, extra: str = "", params: str = 'service_account_id = "svc_1"'
               ) -> str:
    agent = name.split("/")[0]
    return textwrap.dedent(f"""
        [[credentials]]
        name = "{name}"
        agent = "{agent}"
        provider = "openai-prod"
        vault = "main"
        path = "agents/{name}"
        field = "OPENAI_API_KEY"
        """) + textwrap.dedent(extra) + f"[credentials.params]\n{params}\n"


def problems_of(text: str, source: str = "rotation-policies.toml") -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_policies(text, source)
    return info.value.problems


# -- the corpus ------------------------------------------------------------------------------


def _expectations(path: Path) -> list[tuple[int | None, str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        match = EXPECT.match(line)
        if match is None:
            break
        key, message = match.group(2).split(": ", 1)
        out.append((None if match.group(1) == "-" else int(match.group(1)), key, message))
    return out


CORPUS_FILES = sorted(CORPUS.glob("*.toml"))


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) >= 12
    for path in CORPUS_FILES:
        assert _expectations(path), f"{path.name} has no '# expect:' first line"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_bad_policy_corpus(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policies(path)
    problems = info.value.problems
    shown = "\n".join(str(p) for p in problems)
    for line, key, message in _expectations(path):
        matching = [p for p in problems if p.line == line and p.key == key
                    and message in p.message]
        assert matching, f"expected {line}: {key}: {message!r} among:\n{shown}"
        where = f"{path}" if line is None else f"{path}:{line}"
        place = f"{where}: {key}: " if key else f"{where}: "
        assert str(matching[0]).startswith(place)
    order = [(p.line is None, p.line or 0) for p in problems]  # by line, file-wide ones last
    assert order == sorted(order)
    assert all(p.file == str(path) for p in problems)


def test_inline_secrets_are_never_echoed() -> None:
    path = CORPUS / "inline_secrets.toml"
    with pytest.raises(ConfigError) as info:
        load_policies(path)
    output = "\n".join([str(info.value), repr(info.value.problems),
                        *(str(p) for p in info.value.problems)])
    assert "SECRET" not in output  # every planted secret value contains it
    assert "hvs.CAES" not in output and "sk-" not in output and "sk_live" not in output


# -- the example and the basics --------------------------------------------------------------


def test_example_policy_file_is_valid() -> None:
    policies = load_policies(ROOT / "rotation-policies.toml")
    assert policies.vaults["main"].type == "vault"
    assert policies.providers["openai-prod"].type == "openai"
    assert len(policies.credentials) >= 2
    assert any(c.schedule and c.window for c in policies.credentials)
    assert any(c.health_check.type == "http" for c in policies.credentials)
    assert any(c.on_rotate and c.on_rotate.type == "command" for c in policies.credentials)
    for cred in policies.credentials:
        assert cred.line > 0
        assert getattr(cred.params, "service_account_id", "").startswith("svc_")


def test_defaults_and_helpers() -> None:
    text = ('[rotator]\ndefault_interval = "45d"\ndefault_grace = "5m"\n' + BASE
            + credential("a/openai") + credential("b/openai", 'grace = "0s"\n')
            + credential("c/openai", 'schedule = "0 3 * * MON"\n'))
    policies = parse_policies(text)
    a, b, c = policies.credentials
    assert (a.interval, a.grace, a.schedule) == (timedelta(days=45), timedelta(minutes=5), None)
    assert b.grace == timedelta(0)
    assert (c.interval, c.schedule) == (None, "0 3 * * MON")
    assert a.health_check.type == "none" and a.on_rotate is None
    assert policies.settings.jitter == timedelta(minutes=10)
    assert policies.settings.max_concurrent_rotations == 8
    assert policies.credential("b/openai") is b
    assert policies.by_agent("c") == (c,)
    assert policies.by_provider("openai-prod") == (a, b, c)
    with pytest.raises(KeyError):
        policies.credential("nope")
    spec = a.schedule_spec(timedelta(minutes=3))
    assert (spec.credential, spec.interval, spec.jitter) == ("a/openai", timedelta(days=45),
                                                             timedelta(minutes=3))
    with pytest.raises(ValidationError):
        a.name = "x"  # type: ignore[misc]


NO_CREDENTIALS = ("the policy file has no [[credentials]]: nothing to rotate (see "
                  "rotation-policies.toml for an example)")


@pytest.mark.parametrize("text", ["", "\n# truncated\n", '[rotator]\njitter = "1m"\n', BASE],
                         ids=["empty", "comment", "settings-only", "no-credentials"])
def test_a_file_without_credentials_is_an_error(text: str) -> None:
    """A daemon reloading an empty or truncated file must not silently manage nothing."""
    [problem] = problems_of(text)
    assert (problem.line, problem.key, problem.message) == (None, "credentials", NO_CREDENTIALS)
    assert str(problem) == f"rotation-policies.toml: credentials: {NO_CREDENTIALS}"


def test_empty_credentials_array_is_an_error() -> None:
    [problem] = problems_of("credentials = []\n" + BASE)
    assert (problem.key, problem.message) == ("credentials", NO_CREDENTIALS)


def test_credentials_as_a_string_is_a_type_error() -> None:
    [problem] = problems_of('credentials = "x"\n' + BASE)
    assert (problem.line, problem.key) == (1, "credentials")
    assert problem.message == ("credentials must be an array of tables: write [[credentials]] "
                               "sections")
    # A real key there is still a secret, and never echoed.
    [problem] = problems_of('credentials = "sk-proj-SECRETVALUE12345"\n' + BASE)
    assert "secrets never go in the policy file" in problem.message
    assert "SECRETVALUE" not in str(problem)


def test_file_written_by_tomli_w_loads() -> None:
    doc: dict[str, Any] = {
        "rotator": {"state_url": "sqlite:////tmp/x.db", "jitter": "0s", "poll_interval": "1s",
                    "metrics_address": "127.0.0.1:0"},
        "vaults": {"main": {"type": "vault", "url": "http://127.0.0.1:1", "token_env": "T"}},
        "providers": {"openai-test": {"type": "openai", "project_id": "p",
                                      "admin_key": {"env": "OPENAI_ADMIN_KEY"}}},
        "credentials": [{"name": f"agent-{i}/openai", "agent": f"agent-{i}",
                         "provider": "openai-test", "vault": "main", "path": f"p/{i}",
                         "field": "F", "interval": "30d", "grace": "0s",
                         "params": {"service_account_id": f"svc_{i}"},
                         "health_check": {"type": "http", "url": "http://a/h",
                                          "expect_json": {"key_id": "{key_id}"}}}
                        for i in range(3)],
    }
    policies = parse_policies(tomli_w.dumps(doc))
    assert [c.name for c in policies.credentials] == [f"agent-{i}/openai" for i in range(3)]
    assert policies.credentials[0].health_check.expect_json == {"key_id": "{key_id}"}


def test_problem_format_matches_the_spec() -> None:
    creds = "".join(credential(f"agent-{i}/openai") for i in range(3))
    text = BASE + creds + credential("agent-3/openai", 'interval = "90x"\n')
    line = text.splitlines().index('interval = "90x"') + 1
    [problem] = problems_of(text)
    assert str(problem) == (f'rotation-policies.toml:{line}: credentials[3].interval: '
                            '"90x" is not a duration (examples: 30d, 12h, 1h30m)')


def test_every_problem_is_reported_at_once() -> None:
    text = ('[rotator]\njitter = "x"\n' + BASE
            + credential("a/openai", 'interval = "1y"\n')
            + credential("b/openai", 'window = "nope"\n', params="")
            + credential("a/openai").replace('"openai-prod"', '"nope"'))
    problems = problems_of(text)
    keys = {p.key for p in problems}
    assert {"rotator.jitter", "credentials[0].interval", "credentials[1].window",
            "credentials[1].params.service_account_id", "credentials[2].name",
            "credentials[2].provider"} <= keys


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_policies(tmp_path / "nope.toml")
    [problem] = info.value.problems
    assert problem.line is None and "-c PATH" in problem.message
    assert "$ROTATOR_CONFIG" in problem.message
    assert str(problem).startswith(f"{tmp_path / 'nope.toml'}: no policy file")


def test_directory_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_policies(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'[rotator]\njitter = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_policies(binary)
    assert info.value.problems[0].line == 2


def test_a_number_too_large_for_python_is_invalid_toml() -> None:
    [problem] = problems_of("x = " + "1" * 5000 + "\n")
    assert problem.message == "invalid TOML: a number is too large"


def test_resolve_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROTATOR_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("rotation-policies.toml")
    monkeypatch.setenv("ROTATOR_CONFIG", "/etc/rotator/p.toml")
    assert resolve_config_path(None) == Path("/etc/rotator/p.toml")
    assert resolve_config_path("mine.toml") == Path("mine.toml")


def test_secret_ref_forms() -> None:
    assert str(SecretRef(env="X")) == "env X"
    assert str(SecretRef(file="/f")) == "file /f"
    assert str(SecretRef(vault="m", path="p", field="f")) == "vault m:p#f"
    for bad in ({}, {"env": "X", "file": "y"}, {"vault": "m", "path": "p"}, {"env": ""},
                {"envv": "X"}):
        with pytest.raises(ValidationError):
            SecretRef.model_validate(bad)
    with pytest.raises(ValidationError) as info:
        SecretRef.model_validate("sk-live-value-123456")
    assert "sk-live" not in str(info.value)


def test_secret_heuristics_leave_references_alone() -> None:
    text = BASE.replace('token_env = "VAULT_TOKEN"',
                        'approle = { role_id_env = "ROLE_ID", secret_id_file = "/run/s" }')
    text += credential("a/openai", textwrap.dedent("""\
        [credentials.health_check]
        type = "http"
        url = "http://agent/h"
        expect_json = { token = "{key_id}", "auth.key" = "{key_id}" }
        """))
    policies = parse_policies(text)
    assert policies.credentials[0].health_check.expect_json == {"token": "{key_id}",
                                                                "auth.key": "{key_id}"}


def test_vault_reading_its_own_token_from_itself() -> None:
    text = BASE.replace('token_env = "VAULT_TOKEN"',
                        'token_env = "VAULT_TOKEN"\n'
                        'extra_key = { vault = "main", path = "p", field = "f" }')
    problems = problems_of(text)
    assert any(p.key == "vaults.main.extra_key.vault" and "its own" in p.message
               for p in problems)


# -- providers that cannot create keys -------------------------------------------------------


class _NoCreateProvider(Provider):
    type_name: ClassVar[str] = "revoke-only"
    capabilities: ClassVar[Capabilities] = Capabilities(create=False)

    def create(self, credential: CredentialInfo, rotation_id: str) -> NewKey:
        raise NotImplementedError

    def verify(self, credential: CredentialInfo, secret: Any) -> None:
        return None

    def revoke(self, credential: CredentialInfo, key_id: str) -> None:
        return None

    def find_by_rotation(self, credential: CredentialInfo, rotation_id: str) -> list[str]:
        return []


@pytest.fixture
def revoke_only(monkeypatch: pytest.MonkeyPatch) -> None:
    real_types, real_class = plugins.provider_types, plugins.provider_class
    monkeypatch.setattr(plugins, "provider_types", lambda: sorted([*real_types(), "revoke-only"]))
    monkeypatch.setattr(plugins, "provider_class", lambda name: _NoCreateProvider
                        if name == "revoke-only" else real_class(name))


REVOKE_ONLY = BASE + '\n[providers.ant]\ntype = "revoke-only"\n'


def _revoke_only_credential(extra: str) -> str:
    return credential("a/ant", extra, params="").replace('provider = "openai-prod"',
                                                         'provider = "ant"')


@pytest.mark.usefixtures("revoke_only")
def test_provider_that_cannot_create_needs_manual_only() -> None:
    problems = problems_of(REVOKE_ONLY + _revoke_only_credential('interval = "30d"\n'))
    [problem] = [p for p in problems if p.key == "credentials[0].provider"]
    assert "scheduled rotation is impossible" in problem.message
    assert "manual_only = true" in problem.message and "--revoke-first" in problem.message


@pytest.mark.usefixtures("revoke_only")
def test_manual_only_credential_loads_and_is_never_due() -> None:
    policies = parse_policies(REVOKE_ONLY + _revoke_only_credential("manual_only = true\n"))
    cred = policies.credential("a/ant")
    assert (cred.manual_only, cred.interval, cred.schedule) == (True, None, None)
    spec = cred.schedule_spec(timedelta(0))
    from datetime import UTC, datetime
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert decide(spec, None, now, now, rotating=False).reason == "manual_only"


# -- robustness ------------------------------------------------------------------------------


def test_unexpected_errors_become_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> list[str]:
        raise RuntimeError("kaboom sk-should-not-show")

    monkeypatch.setattr(plugins, "vault_types", boom)
    with pytest.raises(ConfigError) as info:
        parse_policies(BASE)
    [problem] = info.value.problems
    assert "RuntimeError" in problem.message and "bug in rotator" in problem.message
    assert "sk-should" not in str(problem)


def test_plugin_validator_crash_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class Crashy(PluginSettings):
        service_account_id: str

        def model_post_init(self, context: Any) -> None:
            raise RuntimeError("plugin bug")

    real = plugins.provider_class("openai")
    patched = type("Patched", (real,), {"params_model": Crashy})
    monkeypatch.setattr(plugins, "provider_class",
                        lambda name: patched if name == "openai" else real)
    problems = problems_of(BASE + credential("a/openai"))
    assert any(p.key == "credentials[0].params" and "bug in that plugin" in p.message
               for p in problems)


def test_locator_maps_every_kind_of_key() -> None:
    text = textwrap.dedent('''\
        title = """
        [not.a.table]
        fake = 1
        """
        a.b."c.d" = 1          # line 5
        [tbl]
        k = { x = 1, y = { z = [1, {w = 2}] } }   # line 7
        arr = [
          "one",
          { q = 1 },           # line 10
        ]
        [[items]]
        v = 1                  # line 13
        [items.sub]
        s = 'lit'              # line 15
        [[items]]
        [[items.inner]]
        n = 1                  # line 18
        [[items.inner]]
        n = 2                  # line 20
        "quoted key" = 3       # line 21
        ''')
    import tomllib
    tomllib.loads(text)  # the locator only ever sees valid TOML
    loc = _Locator(text)
    assert loc.line_for(("title",)) == 1
    assert loc.line_for(("not",)) is None
    assert loc.line_for(("a", "b", "c.d")) == 5
    assert loc.line_for(("tbl", "k", "y", "z", 1, "w")) == 7
    assert loc.line_for(("tbl", "arr", 1, "q")) == 10
    assert loc.line_for(("items", 0, "v")) == 13
    assert loc.line_for(("items", 0, "sub", "s")) == 15
    assert loc.line_for(("items", 0, "sub", "missing")) == 14
    assert loc.line_for(("items", 1)) == 16
    assert loc.line_for(("items", 1, "inner", 1, "n")) == 20
    assert loc.line_for(("items", 1, "inner", 1, "quoted key")) == 21
    assert loc.line_for(("items", 1, "inner", 0, "nope")) == 17


# -- property: nothing but ConfigError, whatever the input -----------------------------------

KEYS = st.sampled_from([
    "rotator", "vaults", "providers", "credentials", "main", "openai-prod", "type", "vault",
    "openai", "url", "token_env", "token_file", "name", "agent", "provider", "path", "field",
    "interval", "schedule", "window", "grace", "params", "health_check", "on_rotate", "run",
    "admin_key", "env", "file", "service_account_id", "attempts", "timeout", "jitter",
    "manual_only", "expect_json", "expect_status", "project_id", "method", "line", "x",
    "max_concurrent_rotations", "approle", "kubernetes", "verify_tls", "base_url",
])
PLANTED = "sk-planted0123456789"
SCALARS = st.one_of(
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["30d", "90x", "0s", "vault", "openai", "main", "openai-prod", "a/b",
                     "Mon-Fri 09:00-17:00 UTC", "22:00-02:00 Europe/Berlin", "0 3 * * MON",
                     "0 3 * * 1", "http://127.0.0.1:8200", "http", "command", "none", "",
                     "{key_id}", PLANTED]),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
TABLE = st.dictionaries(KEYS, VALUES, max_size=6)
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "rotator": TABLE,
    "vaults": st.dictionaries(st.sampled_from(["main", "bad name", "x"]),
                              st.one_of(TABLE, st.just({"type": "vault",
                                                        "url": "http://127.0.0.1:8200",
                                                        "token_env": "T"}))),
    "providers": st.dictionaries(st.sampled_from(["openai-prod", "p"]),
                                 st.one_of(TABLE, st.just({"type": "openai", "project_id": "p",
                                                           "admin_key": {"env": "K"}}))),
    "credentials": st.one_of(st.lists(TABLE, max_size=3), VALUES),
})
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HypothesisHealthCheck.too_slow])


def _only_config_errors(text: str) -> None:
    try:
        parse_policies(text)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem, Problem)
            assert PLANTED not in str(problem)


@FAST
@given(PLAUSIBLE)
def test_random_documents_raise_only_config_error(doc: dict[str, Any]) -> None:
    _only_config_errors(tomli_w.dumps(doc))


@FAST
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_random_top_levels_raise_only_config_error(doc: dict[str, Any]) -> None:
    _only_config_errors(tomli_w.dumps(doc))


@FAST
@given(st.text(max_size=200))
def test_random_text_raises_only_config_error(text: str) -> None:
    _only_config_errors(text)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HypothesisHealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.toml"
    path.write_bytes(data)
    try:
        load_policies(path)
    except ConfigError as exc:
        assert exc.problems


def test_mutations_of_the_example_raise_only_config_error() -> None:
    """Every single-line deletion of the example file still gives Policies or ConfigError."""
    lines = (ROOT / "rotation-policies.toml").read_text().splitlines()
    for i in range(len(lines)):
        _only_config_errors("\n".join(lines[:i] + lines[i + 1:]))


def test_credential_model_rejects_user_line_key() -> None:
    problems = problems_of(BASE + credential("a/openai", "line = 3\n"))
    assert any(p.key == "credentials[0].line" and "unknown key" in p.message for p in problems)
    assert CredentialConfig.model_fields["line"].default == 0


# -- identifiers, vault paths, huge values, the state store's path ---------------------------

KEY_PREFIXED_NAMES = textwrap.dedent("""\
    [vaults.sk-vault]
    type = "vault"
    url = "http://127.0.0.1:8200"
    token_env = "VAULT_TOKEN"

    [providers.sk-openai]
    type = "openai"
    project_id = "proj_1"
    admin_key = { vault = "sk-vault", path = "sk-admin/openai", field = "sk-admin-key" }

    [[credentials]]
    name = "sk-agent/openai"
    agent = "sk-agent"
    provider = "sk-openai"
    vault = "sk-vault"
    path = "agents/sk-agent/openai"
    field = "sk-api-key"
    [credentials.params]
    service_account_id = "svc_1"
    [credentials.health_check]
    type = "none"
    """)


def test_names_and_vault_paths_may_look_like_key_prefixes() -> None:
    policies = parse_policies(KEY_PREFIXED_NAMES)
    cred = policies.credential("sk-agent/openai")
    assert (cred.agent, cred.provider, cred.vault, cred.path, cred.field) == (
        "sk-agent", "sk-openai", "sk-vault", "agents/sk-agent/openai", "sk-api-key")
    assert str(policies.providers["sk-openai"].settings.admin_key) == (  # type: ignore[attr-defined]
        "vault sk-vault:sk-admin/openai#sk-admin-key")


@pytest.mark.parametrize(("old", "new", "key"), [
    ('service_account_id = "svc_1"', 'service_account_id = "sk-proj-SECRETVALUE12345"',
     "credentials[0].params.service_account_id"),
    ('project_id = "proj_1"', 'project_id = "sk-proj-SECRETVALUE12345"',
     "providers.sk-openai.project_id"),
    ('type = "none"', 'type = "http"\nurl = "https://u:SECRETVALUE@agent/h"',
     "credentials[0].health_check.url"),
    ('name = "sk-agent/openai"', 'name = "https://u:SECRETVALUE@agent/x"', "credentials[0].name"),
    ('path = "agents/sk-agent/openai"', 'path = "-----BEGIN PRIVATE KEY-----SECRETVALUE"',
     "credentials[0].path"),
    ('field = "sk-admin-key"', 'field = "-----BEGIN PRIVATE KEY-----SECRETVALUE"',
     "providers.sk-openai.admin_key.field"),
])
def test_real_secrets_are_still_flagged(old: str, new: str, key: str) -> None:
    assert KEY_PREFIXED_NAMES.count(old) == 1
    problems = problems_of(KEY_PREFIXED_NAMES.replace(old, new))
    assert [(p.key, p.message) for p in problems] == [(key, SECRETS_NEVER_HERE)]
    assert "SECRETVALUE" not in "\n".join(str(p) for p in problems)


def test_key_like_identifiers_are_kept_out_of_messages() -> None:
    """A name is not flagged for its prefix, but a message about it does not repeat it
    either, in case it really was a key pasted into the wrong place."""
    text = KEY_PREFIXED_NAMES.replace('provider = "sk-openai"',
                                      'provider = "sk-proj-SECRETVALUE12345"')
    [problem] = problems_of(text)
    assert problem.key == "credentials[0].provider"
    assert problem.message.startswith('no provider named "<redacted>"')


def test_vault_paths_are_checked_in_secret_references() -> None:
    for bad in ("/rotator/admin", "rotator/../admin", "rotator//admin", "rotator/admin\x00"):
        with pytest.raises(ValidationError) as info:
            SecretRef(vault="main", path=bad, field="key")
        assert "a vault path like agents/research-agent/openai" in str(info.value)
    for bad in ("", "key\n", "\x00"):
        with pytest.raises(ValidationError):
            SecretRef(vault="main", path="rotator/admin", field=bad)
    assert SecretRef(vault="main", path="a.b/c-d/e_f", field="K").path == "a.b/c-d/e_f"


HUGE = 5_000_000


@pytest.mark.parametrize("value", [
    "a" * HUGE,  # one long run of scheme characters: the old URL-password regex hung here
    "a://" + ":" * HUGE,
    "x1+" * (HUGE // 3) + "://",
    "https://" + "a" * HUGE,
], ids=["letters", "colons", "scheme-chars", "long-host"])
def test_a_huge_value_is_checked_in_linear_time(value: str) -> None:
    """A quadratic regex took minutes here; linear takes well under a second. The bound is
    loose (a loaded 2-core CI machine) but still tells the two apart."""
    text = BASE + credential("a/openai", textwrap.dedent(f"""\
        [credentials.on_rotate]
        type = "command"
        run = ["reload", '{value}']
        """))
    started = time.perf_counter()
    policies = parse_policies(text)
    elapsed = time.perf_counter() - started
    assert policies.credentials[0].on_rotate is not None
    assert elapsed < 10.0, f"{elapsed:.2f}s for a {len(value) / 1e6:.0f} MB value"


def test_a_secret_at_the_end_of_a_huge_value_is_found() -> None:
    value = "a" * HUGE + " https://u:SECRETVALUE@agent/reload"
    text = BASE + credential("a/openai", textwrap.dedent(f"""\
        [credentials.on_rotate]
        type = "command"
        run = ["reload", "{value}"]
        """))
    [problem] = problems_of(text)
    assert (problem.key, problem.message) == ("credentials[0].on_rotate.run[1]",
                                              SECRETS_NEVER_HERE)


def _write_policies(path: Path, state_url: str | None) -> Path:
    settings = "" if state_url is None else f'[rotator]\nstate_url = "{state_url}"\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings + BASE + credential("a/openai"))
    return path


def test_relative_sqlite_path_is_relative_to_the_policy_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "rotator"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write_policies(etc / "policies.toml", "sqlite:///rotator-state.db")
    expected = f"sqlite:///{etc / 'rotator-state.db'}"
    assert expected.startswith("sqlite:////")
    monkeypatch.chdir(elsewhere)
    assert load_policies(etc / "policies.toml").settings.state_url == expected
    monkeypatch.chdir(tmp_path)
    assert load_policies("etc/rotator/policies.toml").settings.state_url == expected
    monkeypatch.chdir(etc)
    assert load_policies("policies.toml").settings.state_url == expected
    # The default is a relative SQLite path too.
    _write_policies(etc / "default.toml", None)
    assert load_policies(etc / "default.toml").settings.state_url == expected
    # Subdirectories and query options survive; parse_policies opens nothing, changes nothing.
    _write_policies(etc / "sub.toml", "sqlite+pysqlite:///data/state.db?timeout=5")
    assert load_policies(etc / "sub.toml").settings.state_url == (
        f"sqlite+pysqlite:///{etc / 'data' / 'state.db'}?timeout=5")
    text = (etc / "sub.toml").read_text()
    assert parse_policies(text, etc / "sub.toml").settings.state_url == (
        "sqlite+pysqlite:///data/state.db?timeout=5")


@pytest.mark.parametrize("url", [
    "sqlite://", "sqlite:///:memory:", "sqlite:////var/lib/rotator/state.db",
    "sqlite:///file:state.db?mode=ro&uri=true",
    "postgresql+psycopg://rotator@db/rotator", "mysql+pymysql://rotator@db/rotator",
])
def test_other_state_urls_are_left_alone(tmp_path: Path, url: str) -> None:
    path = _write_policies(tmp_path / "policies.toml", url)
    policies = load_policies(path)
    assert isinstance(policies, Policies)
    assert policies.settings.state_url == url


# -- state_url with a password ---------------------------------------------------------------


def test_a_password_in_state_url_gets_hints_that_work(tmp_path: Path, monkeypatch) -> None:
    """The hint for a password in state_url must name forms state_url accepts (issue 12:
    it suggested { env = ... }, which state_url then refused as not a string)."""
    url = "postgresql+psycopg://rotator:hunter2@db.internal/rotator"
    text = '[rotator]\nstate_url = "URL"\n' + BASE + credential("a/openai")
    [problem] = problems_of(text.replace("URL", url))
    assert problem.key == "rotator.state_url" and "PGPASSWORD" in problem.message
    assert "hunter2" not in str(problem)
    # Each form the hint names is accepted.
    monkeypatch.setenv("ROTATOR_STATE_URL", url)
    by_env = text.replace('"URL"', '{ env = "ROTATOR_STATE_URL" }')
    assert parse_policies(by_env).settings.state_url == url
    secret_file = tmp_path / "state-url"
    secret_file.write_text(url + "\n")
    by_file = text.replace('"URL"', f'{{ file = "{secret_file}" }}')
    assert parse_policies(by_file).settings.state_url == url
    # ...and said plainly when it cannot be used.
    monkeypatch.delenv("ROTATOR_STATE_URL")
    [problem] = problems_of(by_env)
    assert "ROTATOR_STATE_URL is not set" in problem.message
    [problem] = problems_of(text.replace('"URL"', '{ vault = "main", path = "a", field = "b" }'))
    assert "cannot come from a vault" in problem.message
