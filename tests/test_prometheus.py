"""A real Prometheus (Debian's package) scraping a running `rotator run`: every query of the
Grafana dashboard returns data, and the failure alert fires after a forced failure."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rotator.state.store import StateStore
from tests.support import debian_tool, free_port, make_fleet, stop_daemon, wait_for

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "rotator.json"
RULES = ROOT / "deploy" / "prometheus" / "rotator-alerts.yml"


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t["expr"]) for panel in dashboard["panels"]
            for t in panel["targets"]]


def test_dashboard_is_importable_json_with_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(_queries()) >= 9


@pytest.mark.slow
def test_every_dashboard_query_has_data_and_the_failure_alert_fires(tmp_path, openbao,
                                                                    fake_openai):
    binary = debian_tool("prometheus")
    metrics_port, prom_port = free_port(), free_port()
    fleet = make_fleet(tmp_path, openbao, fake_openai, n=2, interval="4s", grace="0s",
                       settings={"metrics_address": f"127.0.0.1:{metrics_port}",
                                 "poll_interval": "1s"})
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: rotator\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    log = (tmp_path / "prometheus.log").open("w")
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=log)
    daemon = fleet.start_daemon()
    store = StateStore(f"sqlite:///{fleet.state_db}")
    try:
        wait_for(lambda: _ready(prom_port), what="prometheus ready")
        wait_for(lambda: all(sum(r.outcome == "success" for r in store.rotations(c["name"]))
                             >= 2 for c in fleet.credentials), timeout=90,
                 what="two rotations of each credential")
        wait_for(lambda: _api(prom_port, "query", query='up{job="rotator"} == 1')["result"],
                 what="a successful scrape")
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
        empty = [title for title, expr in _queries()
                 if not _api(prom_port, "query", query=expr)["result"]]
        assert empty == [], f"dashboard queries with no data: {empty}"
    finally:
        stop_daemon(daemon)
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        store.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        time.sleep(0.2)
        return False
