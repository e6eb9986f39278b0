"""The credential proxy (issue 15): the real OpenAI SDK as the agent, holding only a rotator
token, calls the fake OpenAI through ``rotator proxy`` (plain and streaming) while rotator
rotates the upstream key; every denial is the documented OpenAI-style error the SDK raises;
tokens survive a signing-key rotation until their key retires, and forged or tampered ones
never pass."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import openai
import pytest

from rotator.config import load_policies
from rotator.engine import RotationRequest
from rotator.proxy.runner import ProxyRunner, issue, revoke
from tests.support import Fleet, make_fleet

SIGNING = "proxy/signing-key"
AGENT = "agent-0"


def _with_proxy(fleet_prefix: list[str], **route: Any):
    def extra(doc: dict[str, Any]) -> None:
        prefix = fleet_prefix[0] = doc["credentials"][0]["path"].split("/")[0]
        doc["providers"]["signing"] = {"type": "signing-key"}
        doc["credentials"].append({
            "name": SIGNING, "agent": "proxy", "provider": "signing", "vault": "main",
            "path": f"{prefix}/proxy-signing", "field": "key", "interval": "30d",
            "grace": "1h"})
        base = doc["providers"]["openai-test"]["base_url"]
        doc["proxy"] = {
            "listen": "127.0.0.1:0", "signing_credential": SIGNING, "max_token_ttl": "1h",
            "routes": {
                "openai": {"upstream": base, "credential": "agent-0/openai",
                           "paths": ["/chat/completions", "/models"], **route},
                "other": {"upstream": base, "credential": "agent-0/openai",
                          "paths": ["/models"]}}}
    return extra


@contextmanager
def proxied(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyRunner]:
    monkeypatch.setenv("VAULT_TOKEN", fleet.bao.root_token)
    runner = ProxyRunner(load_policies(fleet.config)).start()
    try:
        runner.app.engine.sync_credentials()
        assert runner.app.engine.rotate(RotationRequest(SIGNING, trigger="manual")).ok
        yield runner
    finally:
        runner.stop()


def _fleet(tmp_path, openbao, fake_openai, **route: Any) -> Fleet:
    holder = [""]
    return make_fleet(tmp_path, openbao, fake_openai, grace="0s", extra=_with_proxy(holder,
                                                                                     **route))


def _client(runner: ProxyRunner, token: str, route: str = "openai") -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=f"{runner.url}/{route}", max_retries=0,
                         timeout=20)


def _chat(client: openai.OpenAI, stream: bool) -> str:
    messages = [{"role": "user", "content": "hello"}]
    if stream:
        chunks = client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(model="gpt-4o-mini",
                                          messages=messages).choices[0].message.content


def test_the_sdk_works_through_the_proxy_while_the_upstream_key_rotates(
        tmp_path, openbao, fake_openai, monkeypatch):
    fleet = _fleet(tmp_path, openbao, fake_openai, rate_limit=10_000)
    fake_openai.stream_gap = 0.01
    seen: set[str] = set()
    lookup = fake_openai._lookup_value

    def spy(value: str) -> Any:
        seen.add(value)
        return lookup(value)

    monkeypatch.setattr(fake_openai, "_lookup_value", spy)
    with proxied(fleet, monkeypatch) as runner:
        token, _claims = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10))
        client = _client(runner, token)
        assert _chat(client, stream=False) == "ok"
        assert _chat(client, stream=True) == "ok"
        failures: list[str] = []
        calls = [0]
        counting = threading.Lock()
        stop = threading.Event()

        def agent() -> None:
            while not stop.is_set():
                with counting:
                    calls[0] += 1
                    stream = calls[0] % 2 == 1
                try:
                    assert _chat(client, stream=stream) == "ok"
                except Exception as exc:  # every failure counts
                    failures.append(f"{type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=agent) for _ in range(4)]
        for w in workers:
            w.start()
        keys = {fleet.vault_value(fleet.credentials[0])}
        try:
            for _ in range(4):  # rotate every ~2 s; grace 0s: the old key dies at once
                time.sleep(2)
                assert runner.app.engine.rotate(RotationRequest("agent-0/openai",
                                                                trigger="manual")).ok
                keys.add(fleet.vault_value(fleet.credentials[0]))
            time.sleep(1)
        finally:
            stop.set()
            for w in workers:
                w.join(30)
        assert failures == [], failures[:5]
        assert calls[0] > 40
        assert len(keys) == 5, "four rotations, each a new upstream key"
        assert all(not fake_openai.is_valid(k) for k in list(keys)[:-1] if k != fleet.vault_value(
            fleet.credentials[0]))
        assert token not in seen, "the upstream never sees a proxy token"
    events = [e for e in runner.app.store.audit_events(limit=100_000) if e["kind"] == "proxy"]
    assert len(events) == calls[0] + 2, "every call is one audit event"
    assert all(token not in e["detail"] for e in events)


def _denied(exc_info: Any, status: int, code: str) -> dict[str, Any]:
    exc = exc_info.value
    assert exc.status_code == status, exc
    body = exc.body
    assert body["code"] == code and body["type"] == "rotator_proxy_denied", body
    return body


def test_scope_budget_rate_expiry_and_revocation_are_denied_as_documented(
        tmp_path, openbao, fake_openai, monkeypatch):
    fleet = _fleet(tmp_path, openbao, fake_openai, rate_limit=2)
    with proxied(fleet, monkeypatch) as runner:
        token, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10))
        client = _client(runner, token)
        assert _chat(client, stream=False) == "ok"
        with pytest.raises(openai.PermissionDeniedError) as other_route:
            _client(runner, token, "other").models.list()
        assert "may not call route other" in _denied(other_route, 403, "out_of_scope")["message"]
        with pytest.raises(openai.PermissionDeniedError) as other_path:
            client.files.list()
        _denied(other_path, 403, "out_of_scope")
        answer = httpx.delete(f"{runner.url}/openai/models",
                              headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "out_of_scope"
        traversal = httpx.get(f"{runner.url}/openai/models/%2e%2e/%2e%2e/organization/projects",
                              headers={"Authorization": f"Bearer {token}"})
        assert traversal.status_code == 403 and traversal.json()["error"]["code"] == "bad_path"

        budgeted, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10), budget=1)
        time.sleep(1.1)  # let the rate bucket refill
        assert _chat(_client(runner, budgeted), stream=False) == "ok"
        with pytest.raises(openai.RateLimitError) as spent:
            _chat(_client(runner, budgeted), stream=False)
        _denied(spent, 429, "budget_exhausted")

        time.sleep(2)
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(10):  # 2 per second, bursts of 4
                client.models.list()
        _denied(limited, 429, "rate_limited")
        assert int(limited.value.response.headers["Retry-After"]) >= 1

        kid, key = runner.server.signing.current()
        now = int(time.time())
        expired = jwt.encode({"iss": "rotator", "sub": AGENT, "routes": ["openai"],
                              "iat": now - 3600, "exp": now - 60, "jti": "x"}, key.reveal(),
                             algorithm="HS256", headers={"kid": kid})
        with pytest.raises(openai.AuthenticationError) as old:
            _client(runner, expired).models.list()
        _denied(old, 401, "token_expired")

        time.sleep(1.1)
        revoke(runner.app, AGENT, "agent compromised")
        time.sleep(1.2)  # the proxy reads revocations every second
        with pytest.raises(openai.AuthenticationError) as revoked:
            client.models.list()
        _denied(revoked, 401, "token_revoked")
        fresh, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=5))
        time.sleep(1.1)
        assert _client(runner, fresh).models.list().data, "a token issued after it works"


def test_forged_and_tampered_tokens_never_pass_and_a_rotated_signing_key_keeps_its_tokens(
        tmp_path, openbao, fake_openai, monkeypatch):
    fleet = _fleet(tmp_path, openbao, fake_openai)
    with proxied(fleet, monkeypatch) as runner:
        token, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10))
        header, _payload, signature = token.split(".")
        kid = jwt.get_unverified_header(token)["kid"]
        now = int(time.time())
        forged = jwt.encode({"iss": "rotator", "sub": AGENT, "routes": ["openai", "other"],
                             "iat": now, "exp": now + 600, "jti": "f"}, "guessed-key-" * 3,
                            algorithm="HS256", headers={"kid": kid})
        import base64
        import json

        widened = base64.urlsafe_b64encode(json.dumps(
            {**jwt.decode(token, options={"verify_signature": False}),
             "routes": ["openai", "other"]}).encode()).rstrip(b"=").decode()
        unsigned = jwt.encode({"iss": "rotator", "sub": AGENT, "routes": ["openai"],
                               "iat": now, "exp": now + 600, "jti": "n"}, None,
                              algorithm="none", headers={"kid": kid})
        for bad in (forged, f"{header}.{widened}.{signature}", unsigned, "not-a-token",
                    token[:-2] + ("AA" if not token.endswith("AA") else "BB")):
            with pytest.raises(openai.AuthenticationError) as refused:
                _client(runner, bad).models.list()
            _denied(refused, 401, "invalid_token")

        assert runner.app.engine.rotate(RotationRequest(SIGNING, trigger="manual")).ok
        time.sleep(2.1)  # the proxy re-reads the signing keys every 2 s
        assert _client(runner, token).models.list().data, "accepted while its key is in grace"
        new_token, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10))
        assert jwt.get_unverified_header(new_token)["kid"] != kid, "signed with the new key"
        runner.app.store.expedite_revocations(SIGNING, datetime.now(UTC))
        assert runner.app.engine.revoke_due(SIGNING) == 1
        time.sleep(2.1)
        with pytest.raises(openai.AuthenticationError) as retired:
            _client(runner, token).models.list()
        _denied(retired, 401, "invalid_token")
        assert _client(runner, new_token).models.list().data


def test_token_commands_and_rotate_now_agent_revoke_tokens(tmp_path, openbao, fake_openai):
    fleet = _fleet(tmp_path, openbao, fake_openai)
    assert fleet.cli("rotate-now", SIGNING, "--yes").returncode == 0
    issued = fleet.cli("token", "issue", "--agent", AGENT, "--routes", "openai", "--ttl", "10m",
                       "--json")
    assert issued.returncode == 0, issued.stderr
    import json

    shown = json.loads(issued.stdout)
    assert shown["agent"] == AGENT and shown["routes"] == ["openai"]
    too_long = fleet.cli("token", "issue", "--agent", AGENT, "--routes", "openai", "--ttl", "2h")
    assert too_long.returncode != 0 and "at most max_token_ttl" in too_long.stderr
    unknown = fleet.cli("token", "issue", "--agent", AGENT, "--routes", "nope")
    assert unknown.returncode != 0 and "no route named nope" in unknown.stderr
    rotated = fleet.cli("rotate-now", "--agent", AGENT, "--yes")
    assert rotated.returncode == 0, rotated.stderr
    assert "proxy tokens of agent-0 revoked" in rotated.stderr
    from rotator.state.store import StateStore

    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        assert AGENT in store.token_revocations()
        kinds = [json.loads(e["detail"])["action"] for e in store.audit_events()
                 if e["kind"] == "token"]
        assert kinds == ["issued", "revoked"]
        assert all(shown["token"] not in e["detail"] for e in store.audit_events())
    finally:
        store.close()


def test_check_refuses_bad_proxy_settings_with_file_and_line(tmp_path, openbao, fake_openai):
    fleet = _fleet(tmp_path, openbao, fake_openai)
    text = fleet.config.read_text()
    broken = (text.replace('credential = "agent-0/openai"', 'credential = "agent-9/openai"', 1)
              .replace('"openai"]', '"openai"]', 1))
    broken += ('\n[proxy.routes.nested]\nupstream = "http://127.0.0.1:9"\n'
               'credential = "agent-0/openai"\nprefix = "/openai/v2"\n'
               '\n[proxy.routes.bad]\nupstream = "not a url"\ncredential = "agent-0/openai"\n'
               '\n[proxy.agents.agent-0]\nroutes = ["openai"]\nttl = "2h"\nvault = "main"\n'
               'path = "tokens/agent-0"\n')
    broken = broken.replace('grace = "1h"', 'grace = "10m"')
    fleet.config.write_text(broken)
    checked = fleet.cli("check")
    assert checked.returncode == 2
    lines = checked.stderr.splitlines()

    def said(key: str, words: str) -> None:
        assert any(f": {key}: " in line and words in line and line.split(":")[1].isdigit()
                   for line in lines), (key, words, checked.stderr)

    said("proxy.routes.openai.credential", 'no credential named "agent-9/openai"')
    said("proxy.routes.bad.upstream", "http:// or https://")
    said("proxy.routes.nested.prefix", "overlap: one prefix contains the other")
    said("proxy.signing_credential", "shorter than max_token_ttl")
    said("proxy.agents.agent-0.ttl", "longer than max_token_ttl (1h)")


def test_the_mcp_sdk_client_calls_the_routes_as_tools_over_stdio(tmp_path, openbao, fake_openai,
                                                                 monkeypatch):
    """The official MCP client launches `rotator mcp` for one agent and calls its tools: the
    credential is attached server-side, and a denial is a tool error saying why."""
    import asyncio

    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    from tests.support import ROTATOR

    fleet = _fleet(tmp_path, openbao, fake_openai)
    assert fleet.cli("rotate-now", SIGNING, "--yes").returncode == 0
    issued = fleet.cli("token", "issue", "--agent", AGENT, "--routes", "openai", "--ttl", "10m")
    token = issued.stdout.strip()
    params = StdioServerParameters(command=ROTATOR[0], args=[*ROTATOR[1:], "-c",
                                                             str(fleet.config), "mcp"],
                                   env=fleet.env(ROTATOR_TOKEN=token), cwd=str(fleet.tmp))

    async def session() -> tuple[Any, Any, Any, set[str]]:
        async with Client(params) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            chat = await client.call_tool("openai", {
                "path": "/chat/completions", "json_body": {
                    "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})
            models = await client.call_tool("openai", {"path": "/models", "method": "GET"})
            denied = await client.call_tool("other", {"path": "/models", "method": "GET"})
            return chat, models, denied, tools

    chat, models, denied, tools = asyncio.run(session())
    assert tools == {"openai", "other"}
    assert not chat.is_error, chat
    answer = chat.structured_content or {}
    assert answer["status"] == 200
    assert answer["json"]["choices"][0]["message"]["content"] == "ok"
    assert not models.is_error and models.structured_content["status"] == 200
    assert denied.is_error
    text = " ".join(getattr(c, "text", "") for c in denied.content)
    assert "out_of_scope" in text and "may not call route other" in text
    assert token not in text


def test_a_kept_token_is_renewed_in_the_vault_and_rotator_exec_hands_it_to_the_agent(
        tmp_path, openbao, fake_openai, monkeypatch):
    """[proxy.agents.NAME]: the daemon keeps a fresh token at a vault path; `rotator exec`
    gives it to the agent, which calls through the proxy with it and holds no key."""
    from rotator.proxy.agent_tokens import TokenKeeper

    holder = [""]
    make_proxy = _with_proxy(holder)

    def extra(doc: dict[str, Any]) -> None:
        make_proxy(doc)
        doc["proxy"]["agents"] = {"bot": {"routes": ["openai"], "ttl": "30m", "vault": "main",
                                          "path": f"{holder[0]}/bot-token"}}

    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="0s", extra=extra)
    clock = [datetime.now(UTC)]
    with proxied(fleet, monkeypatch) as runner:
        app = runner.app
        keeper = TokenKeeper(app.policies, app.runtime, app.store, app.audit, app.engine.owner,
                             lambda: clock[0])
        assert keeper.renew_due() == ["bot"]
        assert keeper.renew_due() == [], "fresh: not renewed again"
        path = f"{holder[0]}/bot-token"
        first = openbao.client().secrets.kv.v2.read_secret_version(
            path=path, mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
        script = ("import os, openai; c = openai.OpenAI(api_key=os.environ['ROTATOR_TOKEN'], "
                  f"base_url='{runner.url}/openai', max_retries=0); "
                  "print(c.models.list().data[0].id)")
        import sys

        ran = fleet.cli("exec", "--agent", "bot", "--", sys.executable, "-c", script)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() and first["ROTATOR_TOKEN"] not in ran.stdout + ran.stderr
        clock[0] += timedelta(minutes=21)  # two thirds of 30 minutes gone
        assert keeper.renew_due() == ["bot"]
        second = openbao.client().secrets.kv.v2.read_secret_version(
            path=path, mount_point="secret", raise_on_deleted_version=True)["data"]["data"]
        assert second["ROTATOR_TOKEN"] != first["ROTATOR_TOKEN"]


def test_a_sealed_vault_does_not_stop_the_proxy(tmp_path, fake_openai, monkeypatch):
    """The vault sealed under a running proxy (as a restarted Vault comes back): calls go on
    with the route key and signing key read last, and with fresh reads once unsealed."""
    from rotator.testing.openbao import OpenBaoServer

    bao = OpenBaoServer().start()
    try:
        make_proxy = _with_proxy([""])

        def extra(doc: dict[str, Any]) -> None:
            make_proxy(doc)
            doc["proxy"]["vault_refresh"] = "1s"

        fleet = make_fleet(tmp_path, bao, fake_openai, grace="0s", extra=extra)
        with proxied(fleet, monkeypatch) as runner:
            token, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10))
            client = _client(runner, token)
            assert _chat(client, stream=False) == "ok"
            bao.seal()
            time.sleep(2.5)  # past vault_refresh and the signing keys' refresh
            for stream in (False, True, False):
                assert _chat(client, stream=stream) == "ok"
            bao.unseal()
            time.sleep(2.5)
            assert _chat(client, stream=True) == "ok"
    finally:
        bao.stop()


def test_rotator_run_serves_the_proxy_and_its_counts_feed_the_misuse_rules(
        tmp_path, openbao, fake_openai, monkeypatch):
    """With [proxy] configured, `rotator run` serves it (its metrics on the daemon's
    /metrics); a credential whose misuse rules read the proxy's counts (source = "proxy")
    gets its daily cap judged on the calls the proxy forwarded, with no usage API asked."""
    import threading

    from rotator.scheduling import Daemon
    from tests.support import wait_for

    holder = [""]
    with_proxy = _with_proxy(holder)

    def extra(doc: dict[str, Any]) -> None:
        with_proxy(doc)
        doc["rotator"]["usage_poll_interval"] = "1s"
        doc["credentials"][0]["misuse"] = {"source": "proxy", "spike": {"action": "off"},
                                           "daily_cap": {"requests": 5}}

    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="0s", extra=extra)
    monkeypatch.setenv("VAULT_TOKEN", fleet.bao.root_token)
    daemon = Daemon(fleet.config, load_policies(fleet.config))
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(lambda: daemon.proxy is not None and daemon.metrics_url is not None,
                 timeout=30, what="the daemon serving the proxy")
        assert daemon.proxy is not None

        def both_rotated() -> bool:  # the daemon rotates never-rotated credentials at once
            states = [daemon.store.credential(n) for n in (SIGNING, "agent-0/openai")]
            return all(s is not None and s.current_key_id for s in states) and \
                not daemon.store.unfinished_rotations()

        wait_for(both_rotated, timeout=60, what="the first rotations")
        token, _ = issue(daemon.app, AGENT, ["openai"], timedelta(minutes=10))
        client = _client(daemon.proxy, token)
        for _ in range(7):
            assert _chat(client, stream=False) == "ok"
        wait_for(lambda: any(a.rule == "daily_cap" for a in daemon.store.anomalies(
            since=datetime.now(UTC) - timedelta(hours=1))), timeout=30,
            what="the daily cap judged on the proxy's counts")
        rows = daemon.store.usage(credentials=["agent-0/openai"],
                                  since=datetime.now(UTC) - timedelta(hours=2), width=3600)
        assert sum(r.requests or 0 for r in rows if r.provider == "(proxy)") == 7
        metrics = httpx.get(daemon.metrics_url).text
        assert 'rotator_proxy_requests_total{agent="agent-0",outcome="ok",route="openai"} 7.0' \
            in metrics
        assert 'rotator_misuse_anomalies_total{action="alert",agent="agent-0"' in metrics
    finally:
        daemon.stop("test over")
        runner.join(30)
    assert not runner.is_alive()


def test_calls_that_find_the_signing_keys_due_together_wait_for_one_read(
        tmp_path, openbao, fake_openai, monkeypatch):
    """The signing keys and revocations are re-read in a thread, once for every call that
    finds them due at the same moment: not once per call, and never on the event loop."""
    from concurrent.futures import ThreadPoolExecutor

    fleet = _fleet(tmp_path, openbao, fake_openai, rate_limit=1000)
    with proxied(fleet, monkeypatch) as runner:
        token, _ = issue(runner.app, AGENT, ["openai"], timedelta(minutes=10))
        client = _client(runner, token)
        assert client.models.list().data
        signing = runner.server.signing
        reads: list[str] = []
        real = signing.reload

        def slow_reload() -> None:
            reads.append(threading.current_thread().name)
            time.sleep(0.3)  # a slow vault: the calls arriving meanwhile must not read too
            real()

        monkeypatch.setattr(signing, "reload", slow_reload)
        signing._read_at = -1e18  # due now
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _i: client.models.list().data, range(16)))
        assert all(answers)
        assert len(reads) == 1, reads
        assert reads[0] != "rotator-proxy", "read off the event loop's thread"
