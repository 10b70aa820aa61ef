"""Metric declarations against the Grafana dashboard and the Prometheus alert rules."""

import json
import re
from pathlib import Path

import pytest
import yaml

from monitoring.metrics import (
    EXPORT_PREFIX,
    METRIC_NAMES,
    METRIC_TYPES,
    exported_series_names,
    model_metrics,
    queue_metrics,
    router_metrics,
    supervisor_metrics,
)

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
DASHBOARD = MONITORING / "grafana" / "switchyard.json"
ALERTS = MONITORING / "prometheus" / "alerts.yaml"

# Any identifier that looks like one of our series, with or without Ray's prefix.
SERIES_PATTERN = re.compile(r"\b(?:ray_)?switchyard_[a-z0-9_]+\b")

EXPORTED = {series for name in METRIC_NAMES for series in exported_series_names(name)}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = []
    for panel in dashboard["panels"]:
        expressions += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if "definition" in variable:
            expressions.append(variable["definition"])
    return expressions


def alert_rules() -> list[dict]:
    rule_file = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rule_file["groups"] for rule in group["rules"]]


def series_in(expressions: list[str]) -> set[str]:
    return {match for expression in expressions for match in SERIES_PATTERN.findall(expression)}


def declared_metrics() -> dict[str, str]:
    """Name -> Prometheus type of every metric the factories build."""
    kinds = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
    declared = {}
    for metric_set in (router_metrics(), model_metrics("expert-0"), supervisor_metrics(), queue_metrics()):
        for metric in vars(metric_set).values():
            declared[metric.info["name"]] = kinds[type(metric).__name__]
    return declared


def test_metric_names_have_types():
    assert set(METRIC_TYPES) == set(METRIC_NAMES)
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_metric_name_follows_prometheus_units(name):
    assert re.fullmatch(r"switchyard_[a-z0-9_]+", name), name
    if METRIC_TYPES[name] == "counter":
        assert name.endswith("_total"), f"counter {name} must end in _total"
    else:
        assert not name.endswith("_total"), f"{METRIC_TYPES[name]} {name} must not end in _total"


def test_factories_declare_exactly_metric_names():
    declared = declared_metrics()

    assert set(declared) == set(METRIC_NAMES)
    assert declared == METRIC_TYPES


def test_exported_names_of_each_kind():
    assert exported_series_names("switchyard_requests_total") == ("ray_switchyard_requests_total",)
    assert exported_series_names("switchyard_shadow_agreement_ratio") == ("ray_switchyard_shadow_agreement_ratio",)
    assert exported_series_names("switchyard_gate_confidence") == (
        "ray_switchyard_gate_confidence_bucket",
        "ray_switchyard_gate_confidence_sum",
        "ray_switchyard_gate_confidence_count",
    )


def test_dashboard_uses_only_declared_series():
    used = series_in(dashboard_expressions())

    assert used, "the dashboard queries no switchyard series"
    assert used - EXPORTED == set()
    assert all(series.startswith(EXPORT_PREFIX) for series in used)


def test_alerts_use_only_declared_series():
    used = series_in([rule["expr"] for rule in alert_rules()])

    assert used, "the alert rules query no switchyard series"
    assert used - EXPORTED == set()


# Each view the dashboard must offer, and the metric it reads.
DASHBOARD_VIEWS = {
    "traffic by path": "switchyard_requests_total",
    "fallbacks by reason": "switchyard_fallbacks_total",
    "experts per request": "switchyard_experts_per_request",
    "per-expert load": "switchyard_expert_rows_total",
    "per-expert latency": "switchyard_expert_call_duration_seconds",
    "gate confidence": "switchyard_gate_confidence",
    "shadow agreement": "switchyard_shadow_agreement_ratio",
    "supervisor state": "switchyard_supervisor_state",
    "supervisor weight": "switchyard_supervisor_moe_weight_ratio",
    "queue backlog": "switchyard_queue_backlog_messages",
    "dead letters": "switchyard_queue_dead_letters_total",
}


@pytest.mark.parametrize("view", sorted(DASHBOARD_VIEWS))
def test_dashboard_has_view(view):
    exported = set(exported_series_names(DASHBOARD_VIEWS[view]))

    assert series_in(dashboard_expressions()) & exported, f"no panel reads {DASHBOARD_VIEWS[view]} ({view})"


def test_dashboard_panels_are_complete():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]

    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"], panel
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# Each condition the alert rules must cover, and a metric its rule reads.
ALERT_CONDITIONS = {
    "SwitchyardTrafficOnDense": "switchyard_requests_total",
    "SwitchyardAgreementLow": "switchyard_shadow_agreement_ratio",
    "SwitchyardDeadLettersGrowing": "switchyard_queue_dead_letters_total",
    "SwitchyardExpertErrors": "switchyard_expert_errors_total",
}


@pytest.mark.parametrize("alert", sorted(ALERT_CONDITIONS))
def test_alert_rule_present(alert):
    rules = {rule["alert"]: rule for rule in alert_rules()}

    assert alert in rules
    assert EXPORT_PREFIX + ALERT_CONDITIONS[alert] in rules[alert]["expr"]
    assert rules[alert]["annotations"]["summary"]
    assert rules[alert]["labels"]["severity"] in {"warning", "critical"}
