"""deploy/prometheus/ and deploy/grafana/ stay true to the relay: the alert rules and the
dashboard are well formed (and valid for promtool, Prometheus's own checker, when installed:
CI installs Debian's prometheus package for it), their PromQL uses only metrics that a
running relay and a running notifier actually expose, and docs/operations.md documents every
metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.observe.metrics import SupervisorMetrics
from relay.process.wiring import RelayApp
from tests.conftest import (
    REPO,
    CapturingUpstream,
    RedisServer,
    RelayFactory,
    UpstreamBehaviour,
    add_user,
    send,
)
from tests.scraping import get
from tests.serving import running_notifier
from tests.webhooks import Receiver

PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "command-relay.json"
SEVERITIES = {"critical", "warning", "info"}
# Series Prometheus makes itself for every target, not exposed by any process.
SYNTHETIC = {"up"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                   "unless", "bool", "offset", "inf", "nan"}
_DURATION = re.compile(r"^\d+(ms|s|m|h|d|w|y)$")


def promtool() -> str:
    """promtool's path; required in CI (.ci/run installs it), optional on a workstation."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def run_promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by values."""
    return expr.replace("$__rate_interval", "5m").replace("$job", ".*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a small lexer, enough for these files):
    strings, label matchers, ranges, grouping clauses and function names are not metrics."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        following = text[match.end():].lstrip()
        if following.startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name a /metrics document declares, sampled or not yet (a labelled metric
    whose first event has not happened is declared by its HELP and TYPE lines)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "summary": ["_count", "_sum", ""], "info": ["_info"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def supervisor_text() -> str:
    """The series ``serve --workers N``'s supervisor adds to its workers' (its registry, as
    relay/observe/supervisor_metrics.py renders it; tests/observe/test_supervisor_metrics.py
    scrapes a real one)."""
    return generate_latest(SupervisorMetrics(2).registry).decode()


async def scrape_everything(make_relay: RelayFactory, accounts: Any,
                            redis_server: RedisServer, tmp_path: Path) -> tuple[str, str]:
    """/metrics of a relay after real traffic (delivered, over the limit, refused upstream)
    and of a running ``command-relay notifier``."""
    behaviour = UpstreamBehaviour(rcpt_replies={"bad@example.test": "550 5.1.1 No such user"})
    server = CapturingUpstream(behaviour)
    await server.start()
    receiver = Receiver()
    await receiver.start()
    try:
        app: RelayApp = await make_relay(upstream=server)
        await add_user(accounts, limit=2)
        await send(app, ["one@example.test", "bad@example.test"])
        await send(app, ["two@example.test", "three@example.test"])
        status, _, relay_text = await get(app.metrics_port, "/metrics")
        assert status == 200
        async with running_notifier(redis_server.url, receiver.url(), tmp_path) as port:
            status, _, notifier_text = await get(port, "/metrics")
            assert status == 200
    finally:
        await receiver.stop()
        await server.stop()
    return relay_text, notifier_text


# -- alert rules --------------------------------------------------------------------------------
def test_alert_rules_are_well_formed() -> None:
    """Every rule has a unique CamelCase alert name, an expression, a valid ``for``, a
    severity label and a summary and description."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(document) == {"groups"}
    names: list[str] = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"], group.get("name")
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Relay[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
            names.append(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule["alert"]
            if "for" in rule:
                assert _DURATION.match(rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
            assert all(v.strip() for v in rule["annotations"].values()), rule["alert"]
    assert len(names) == len(set(names)), "duplicate alert names"
    # The alerts the issue asks for, at least.
    assert {"RelayUpstreamFailing", "RelayUpstreamUnreachable", "RelayRedisUnreachable",
            "RelayRejectionRatioHigh", "RelayDeadLettersGrowing"} <= set(names)


def test_alert_rules_pass_promtool() -> None:
    """promtool accepts the rules and the example scrape configuration, and the unit tests
    in alerts_test.yml (which alerts fire on which series) pass."""
    assert "SUCCESS" in run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


def test_metric_name_lexer_finds_metrics_only() -> None:
    """The lexer used below reads metric names, not functions, labels, ranges or keywords."""
    expr = ('sum by (job, le) (rate(relay_x_bucket{step="reserve", job=~"$job"}[5m])) '
            '/ on (job) group_left (pool) relay_y > 0.5 and absent(up{job="a"} == 1)')
    assert metric_names(expr) == {"relay_x_bucket", "relay_y", "up"}


# -- the dashboard ------------------------------------------------------------------------------
def test_dashboard_is_well_formed() -> None:
    """The dashboard has a uid, unique panel ids, a data source variable every query uses,
    and a job filter on every query."""
    board = dashboard()
    assert board["uid"] == "command-relay" and board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["type"] == "query"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    queried = [p for p in board["panels"] if p["type"] != "row"]
    assert len(queried) >= 20
    for panel in queried:
        assert panel["title"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '=~"$job"' in target["expr"], (panel["title"], target["expr"])
            assert target["refId"]


def test_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL (checked as recording rules by promtool)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
        for i, expr in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    assert "SUCCESS" in run_promtool("check", "rules", str(path), cwd=tmp_path)


# -- against the running processes ---------------------------------------------------------
async def test_rules_and_dashboard_use_only_exposed_metrics(
        make_relay: RelayFactory, accounts: Any, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """Every metric named in alerts.yml and in the dashboard is one that a relay started by
    the production RelayApp, after real traffic, a running notifier or the supervisor of
    ``serve --workers N`` exposes."""
    relay_text, notifier_text = await scrape_everything(make_relay, accounts, redis_server,
                                                        tmp_path)
    exposed = (exposed_names(relay_text) | exposed_names(notifier_text)
               | exposed_names(supervisor_text()) | SYNTHETIC)
    used_by_alerts = {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    used_by_dashboard = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    assert used_by_alerts and used_by_dashboard
    assert used_by_alerts - exposed == set()
    assert used_by_dashboard - exposed == set()


async def test_operations_doc_documents_every_metric(make_relay: RelayFactory, accounts: Any,
                                             redis_server: RedisServer,
                                             tmp_path: Path) -> None:
    """Every relay_* metric the relay, the notifier and the workers' supervisor expose is in
    the metrics table of docs/operations.md, and the table names no metric that does not
    exist."""
    relay_text, notifier_text = await scrape_everything(make_relay, accounts, redis_server,
                                                        tmp_path)
    families = {f.name + ("_total" if f.type == "counter" else "_info" if f.type == "info"
                          else "")
                for text in (relay_text, notifier_text, supervisor_text())
                for f in text_string_to_metric_families(text) if f.name.startswith("relay_")}
    operations = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(relay_[a-z_]+)`", operations, flags=re.MULTILINE))
    assert families - documented == set(), "metrics missing from docs/operations.md's table"
    assert documented - families == set(), "docs/operations.md names metrics that do not exist"
