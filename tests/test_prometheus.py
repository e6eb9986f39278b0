"""A real Prometheus (Debian's package) scraping a running `rotator run`: every query of the
Grafana dashboard returns data, and the failure alert fires after a forced failure.

Prometheus scrapes the daemon as two targets (``replica="a"`` and ``"b"``), which is what it
sees of two replicas on one state store: the same state gauges from two instances. Queries that
join or plot those gauges must still give one series per credential and never fail with
duplicate series. A third target that never answers is a replica down: a warning, while the
fleet-wide RotatorDown stays quiet."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotator.state.store import StateStore
from tests.support import debian_tool, free_port, make_fleet, stop_daemon, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "rotator.json"
RULES = ROOT / "deploy" / "prometheus" / "rotator-alerts.yml"
REPLICAS = ("a", "b")


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t["expr"]) for panel in dashboard["panels"]
            for t in panel.get("targets", [])]


def test_dashboard_is_importable_json_with_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(_queries()) >= 9


@pytest.mark.slow
def test_every_dashboard_query_has_data_and_the_failure_alert_fires(tmp_path, openbao,
                                                                    fake_openai):
    metrics_port, dead_port = free_port(), free_port()
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2, interval="4s", grace="0s",
                       settings={"metrics_address": f"127.0.0.1:{metrics_port}",
                                 "poll_interval": "1s"})
    targets = ("".join(f"      - targets: ['127.0.0.1:{metrics_port}']\n"
                       f"        labels: {{replica: {name}}}\n" for name in REPLICAS)
               + f"      - targets: ['127.0.0.1:{dead_port}']\n        labels: {{replica: dead}}\n")
    with _prometheus(tmp_path, targets) as prom_port:
        _dashboard_and_failure_alert(fleet, fake_openai, prom_port)


def _dashboard_and_failure_alert(fleet: Any, fake_openai: Any, prom_port: int) -> None:
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: all(sum(r.outcome == "success" for r in store.rotations(c["name"]))
                             >= 2 for c in fleet.credentials), timeout=90,
                 what="two rotations of each credential")
        wait_for(lambda: len(_api(prom_port, "query", query='up{job="rotator"} == 1')["result"])
                 == len(REPLICAS), what="a successful scrape of each replica")
        # Force a failure: the provider now refuses to create keys for agent-1.
        broken = fleet.credentials[1]["service_account_id"]
        fake_openai.inject_fault(400, count=10_000, path_contains=f"/{broken}/api_keys",
                                 method="POST")
        wait_for(lambda: any(r.outcome == "failed"
                             for r in store.rotations(fleet.credentials[1]["name"])),
                 timeout=60, what="a failed rotation")

        def alert_firing() -> bool:
            alerts = _api(prom_port, "alerts")["alerts"]
            return any(a["labels"]["alertname"] == "RotatorRotationFailed"
                       and a["labels"]["credential"] == fleet.credentials[1]["name"]
                       and a["state"] == "firing" for a in alerts)

        wait_for(alert_firing, timeout=60, what="RotatorRotationFailed to fire")
        results = {expr: _api(prom_port, "query", query=expr)["result"]
                   for _, expr in _queries()}
        # The proxy's panels are seen with data in test_the_proxy_panels_have_data (this
        # fleet has no proxy).
        empty = [title for title, expr in _queries()
                 if not results[expr] and "rotator_proxy_" not in expr]
        assert empty == [], f"dashboard queries with no data: {empty}"
        for title, expr in _queries():
            if "rotator_credential_" not in expr:
                continue
            if "count by (reason)" in expr:
                # Each credential once per reason the replicas give it: they read one store,
                # so they agree but for a credential whose reason changed between two scrapes
                # (every few seconds here), never once per replica for them all.
                counted = sum(float(s["value"][1]) for s in results[expr])
                assert len(fleet.credentials) <= counted, f"{title}: {results[expr]}"
                every = _api(prom_port, "query", query="count by (credential) "
                             "(rotator_credential_due_reason)")["result"]
                assert {s["metric"]["credential"] for s in every} == \
                    {c["name"] for c in fleet.credentials}, every
                continue
            names = [s["metric"].get("credential") for s in results[expr]]
            assert len(names) == len(set(names)) == len(fleet.credentials), \
                f"{title}: one series per credential, not per replica: {names}"
        in_progress = results["max(rotator_rotations_in_progress)"]
        assert len(in_progress) == 1, "shared state gauges are shown once, not per replica"
        wait_for(lambda: _rules_evaluated(prom_port), what="every alert rule to be evaluated")
        bad = {r["name"]: r.get("lastError") for r in _rules(prom_port)
               if r["health"] != "ok"}
        assert bad == {}, f"alert rules failing to evaluate: {bad}"
        # A replica that cannot be scraped is a warning; the fleet is down only with all.
        alerts = {(a["labels"]["alertname"], a["labels"].get("replica")): a["state"]
                  for a in _api(prom_port, "alerts")["alerts"]}
        assert alerts.get(("RotatorReplicaDown", "dead")) == "pending", alerts
        assert not {name for name, _ in alerts} & {"RotatorDown"}, alerts
    finally:
        stop_daemon(daemon)
        store.close()


def _rules(port: int) -> list[dict[str, Any]]:
    return [rule for group in _api(port, "rules")["groups"] for rule in group["rules"]]


def _rules_evaluated(port: int) -> bool:
    return all(rule.get("lastEvaluation", "").startswith("2") for rule in _rules(port))


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        time.sleep(0.2)
        return False


@contextmanager
def _prometheus(tmp_path: Path, targets: str) -> Iterator[int]:
    """A real Prometheus with rotator's alert rules, scraping ``targets`` (static_configs
    entries) as job ``rotator`` every second; yields its port."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: rotator\n    static_configs:\n" + targets)
    log = (tmp_path / "prometheus.log").open("w")
    prom = subprocess.Popen(
        [debian_tool("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log)
    try:
        wait_for(lambda: _ready(port), what="prometheus ready")
        yield port
    finally:
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()


@pytest.mark.slow
def test_the_misuse_alert_fires_on_a_spike_and_the_usage_panels_have_data(tmp_path, openbao,
                                                                         fake_openai):
    metrics_port = free_port()
    fleet = make_fleet(tmp_path, openbao, fake_openai,
                       settings={"metrics_address": f"127.0.0.1:{metrics_port}",
                                 "usage_poll_interval": "1s"})
    cred = fleet.credentials[0]
    key = fleet.legacy_keys[cred["name"]]
    now = time.time()
    for day in range(1, 8):  # a week of habit: 100 calls a day
        fake_openai.record_usage(key, now - day * 86400, requests=100, input_tokens=900)
    with _prometheus(tmp_path, f"      - targets: ['127.0.0.1:{metrics_port}']\n") as port:
        daemon = fleet.start_daemon()
        try:
            counted = f'rotator_misuse_anomalies_total{{credential="{cred["name"]}"}} == 0'
            wait_for(lambda: _api(port, "query", query=counted)["result"], timeout=60,
                     what="a scrape of the misuse counters at 0")
            fake_openai.record_usage(key, time.time() - 30, requests=400, input_tokens=3600)

            def firing() -> list[dict[str, Any]]:
                return [a for a in _api(port, "alerts")["alerts"]
                        if a["labels"]["alertname"] == "RotatorMisuseDetected"
                        and a["state"] == "firing"]

            wait_for(firing, timeout=60, what="RotatorMisuseDetected to fire")
            [alert] = firing()
            assert alert["labels"]["credential"] == cred["name"]
            assert alert["labels"]["rule"] == "spike" and alert["labels"]["action"] == "alert"
            assert alert["labels"]["severity"] == "critical"
            usage_panels = [(title, expr) for title, expr in _queries()
                            if "rotator_key_" in expr or "rotator_misuse" in expr
                            or "rotator_usage_polls" in expr]
            assert len(usage_panels) == 4
            for title, expr in usage_panels:
                result = _api(port, "query", query=expr)["result"]
                assert result, f"{title}: no data"
                if "rotator_key_requests_total" in expr or "rotator_misuse" in expr:
                    assert max(float(r["value"][1]) for r in result) > 0, f"{title}: {result}"
        finally:
            stop_daemon(daemon)


def test_the_proxy_panels_have_data(tmp_path, openbao, fake_openai, monkeypatch):
    """`rotator run` serving the proxy: a real Prometheus scrapes the daemon, and the
    dashboard's proxy row (calls by outcome, latency, denials, calls per agent) has data
    after an agent's calls and one denial."""
    import threading

    import openai

    from rotator.config import load_policies
    from rotator.proxy.runner import issue
    from rotator.scheduling import Daemon
    from tests.test_proxy import AGENT, SIGNING, _with_proxy

    metrics_port = free_port()
    holder = [""]
    fleet = make_fleet(tmp_path, openbao, fake_openai, grace="0s",
                       settings={"metrics_address": f"127.0.0.1:{metrics_port}"},
                       extra=_with_proxy(holder))
    monkeypatch.setenv("VAULT_TOKEN", fleet.bao.root_token)
    daemon = Daemon(fleet.config, load_policies(fleet.config))
    running = threading.Thread(target=daemon.run)
    with _prometheus(tmp_path, f"      - targets: ['127.0.0.1:{metrics_port}']\n") as port:
        running.start()
        try:
            wait_for(lambda: daemon.proxy is not None and all(
                (s := daemon.store.credential(n)) is not None and s.current_key_id
                for n in (SIGNING, "agent-0/openai")) and not
                daemon.store.unfinished_rotations(), timeout=60, what="the first rotations")
            assert daemon.proxy is not None
            token, _ = issue(daemon.app, AGENT, ["openai"], timedelta(minutes=10))
            client = openai.OpenAI(api_key=token, base_url=f"{daemon.proxy.url}/openai",
                                   max_retries=0)
            scraped = 'rotator_proxy_requests_total{outcome="ok"}'
            for _ in range(3):
                client.models.list()
            with pytest.raises(openai.PermissionDeniedError):
                client.files.list()
            wait_for(lambda: _api(port, "query", query=scraped)["result"], timeout=30,
                     what="a scrape of the proxy's calls")
            for _ in range(3):  # a second scrape with more calls: rates are not zero
                client.models.list()
            proxy_panels = [(t, e) for t, e in _queries() if "rotator_proxy_" in e]
            assert len(proxy_panels) == 5

            def all_have_data() -> bool:
                return all(_api(port, "query", query=e)["result"] for _, e in proxy_panels)

            wait_for(all_have_data, timeout=30, what="data in every proxy panel")
            denials = _api(port, "query", query=next(e for t, e in proxy_panels
                                                     if "denials" in t))["result"]
            assert {r["metric"]["outcome"] for r in denials} == {"out_of_scope"}
        finally:
            daemon.stop("test over")
            running.join(30)
