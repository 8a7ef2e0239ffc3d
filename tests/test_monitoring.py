"""Offline checks of deploy/monitoring: the alert rules pass `promtool check rules` and their unit
tests, the PrometheusRule holds the same rules, and every rule and dashboard query names only metrics
(and labels) that service/core/metrics.py exports."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.core import metrics
from tests.support import ROOT

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "profiles.rules.yaml"
RULE_TESTS = MONITORING / "profiles.rules.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS_RULE = ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"

# The README's alert conditions (Operations, Metrics), one alert each.
EXPECTED_ALERTS = {
    "ProfilesQueueLagging",
    "ProfilesDeadIntents",
    "ProfilesStuckIntents",
    "ProfilesGarbageCollectionFailing",
    "ProfilesServerErrors",
    "ProfilesWriteToLiveSlow",
}
SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
METRIC_NAME = re.compile(r"\bprofiles_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(profiles_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
# Labels every scraped series may have besides its own, and a histogram bucket's bound.
TARGET_LABELS = {"instance", "job"}

PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is NOT installed: the alert rules were NOT checked (apt-get install prometheus)"


@pytest.fixture
def promtool() -> str:
    if PROMTOOL is None:
        # CI must not pass without it, as ./scripts/test does for spin.
        if os.environ.get("CI") == "true":
            pytest.fail(NO_PROMTOOL)
        pytest.skip(NO_PROMTOOL)
    return PROMTOOL


def exported() -> dict[str, set[str]]:
    """Every sample name the service's metrics expose, with the labels of its metric."""
    samples: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
            for family in metric.describe():
                for suffix in SAMPLE_SUFFIXES[family.type]:
                    samples[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return samples


def unknown_names(expr: str) -> list[str]:
    """Metric names in `expr` the service does not export, and label matchers its metrics do not have."""
    known = exported()
    problems = [f"unknown metric {name}" for name in METRIC_NAME.findall(expr) if name not in known]
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER.findall(matchers):
            if name in known and label not in known[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    return problems


def rule_groups() -> dict[str, Any]:
    groups: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return groups


def rules() -> Iterator[dict[str, Any]]:
    for group in rule_groups()["groups"]:
        yield from group["rules"]


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return board


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rule_file(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_refuses_a_rule_with_a_broken_expression(promtool: str, tmp_path: Path) -> None:
    broken = copy.deepcopy(rule_groups())
    broken["groups"][0]["rules"][0]["expr"] = "max(profiles_queue_lag_seconds > 60"
    path = tmp_path / "broken.rules.yaml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert run_promtool(promtool, "check", "rules", path).returncode != 0


def test_the_rules_unit_tests_pass_with_at_least_two_alerts_firing(promtool: str) -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    firing = {
        case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case.get("exp_alerts")
    }
    assert len(firing) >= 2, firing
    result = run_promtool(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_condition_the_readme_lists_has_one_alert() -> None:
    names = [rule["alert"] for rule in rules()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for metric in ("profiles_queue_lag_seconds", "profiles_intents{state}", "profiles_gc_backlog{due}"):
        assert metric in readme, "the README's alert table names this metric"


def test_every_rule_names_only_metrics_and_labels_the_service_exports() -> None:
    assert exported(), "the metrics module was read"
    for rule in rules():
        assert unknown_names(rule["expr"]) == [], rule["alert"]


def test_a_misspelt_metric_or_label_in_a_rule_is_caught() -> None:
    assert unknown_names("max(profiles_queue_lag_second) > 60") == ["unknown metric profiles_queue_lag_second"]
    assert unknown_names('max(profiles_intents{status="dead"}) > 0') == ["profiles_intents has no label status"]
    assert unknown_names('rate(profiles_http_requests{status=~"5.."}[5m])') == ["unknown metric profiles_http_requests"]


def test_the_prometheus_rule_resource_holds_exactly_the_rule_file() -> None:
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text(encoding="utf-8"))
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == rule_groups(), "deploy/k8s/base/prometheusrule.yaml differs from the rule file"


def test_the_dashboard_is_a_grafana_dashboard_of_panels_with_queries() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"} and panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])


def test_every_dashboard_query_names_only_metrics_and_labels_the_service_exports() -> None:
    for expr in dashboard_exprs():
        assert unknown_names(expr) == [], expr


def test_the_dashboard_shows_every_metric_an_alert_watches() -> None:
    shown = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    watched = {name for rule in rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert watched - shown == set()
