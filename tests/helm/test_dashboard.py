"""The opt-in Grafana dashboard ConfigMap, and the chart's dev server registering Relay's search attributes.

Every PromQL expression of the dashboard must name only metrics the controller exports: the names are read
from a live `/metrics` (the controller's ObservabilityServer fed through MetricsStatusSink, as the operator
feeds it), not from a list kept by hand.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.observability import MetricsStatusSink, RelayMetrics, start_observability_server
from controller.status import CheckpointStatus, LegStatus, Phase, RunEvent, RunStatus
from controller.visibility import dev_server_flags

CHART = Path(__file__).resolve().parents[2] / "helm" / "relay"
DASHBOARD = CHART / "dashboards" / "relay-training.json"
PANELS = {"Runs by phase", "Preemptions per hour", "Recovery time", "Checkpoint age", "Steps/s per run"}
# PromQL's own words in the dashboard's expressions; every other identifier must be an exported metric.
PROMQL_WORDS = {"sum", "max", "by", "rate", "increase", "deriv", "histogram_quantile"}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    values = {"temporal": {"address": "temporal-frontend.temporal:7233"}, **values}
    manifests = chart.render(values, name="relay", namespace="ml", is_install=True)
    manifests.pop("relay/templates/NOTES.txt", None)
    return [doc for _, text in sorted(manifests.items()) for doc in yaml.safe_load_all(text) if doc]


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _metric_names(expression: str) -> set[str]:
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|by \([^)]*\)|\"[^\"]*\"", " ", expression)
    return {word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if word not in PROMQL_WORDS}


class _Sink:
    async def publish(self, namespace: str, name: str, status: RunStatus, events: list[RunEvent]) -> None:
        return None


def _live_metric_names() -> set[str]:
    """The sample names a controller's /metrics serves once a run was preempted, recovered and checkpointed."""
    metrics = RelayMetrics()
    sink = MetricsStatusSink(_Sink(), metrics)
    t = "2026-05-18T03:33:{:02d}Z".format
    checkpoint = CheckpointStatus(step=10, path="runs/ml/r/checkpoints/step-000000010", created_at=t(9))
    sink.record("ml", "r", RunStatus(phase=Phase.RUNNING, legs=[LegStatus(leg=0, started_at=t(0))]))
    legs = [LegStatus(leg=0, started_at=t(0), ended_at=t(10), outcome="preempted"), LegStatus(leg=1, started_at=t(20))]
    sink.record("ml", "r", RunStatus(phase=Phase.RUNNING, step=12, legs=legs, latest_checkpoint=checkpoint))
    metrics.failed("ml")
    with start_observability_server(0, 0, host="127.0.0.1", metrics=metrics) as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}


def test_every_dashboard_expression_names_only_metrics_the_controller_exports():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exported = _live_metric_names()
    for expression in _expressions(dashboard):
        names = _metric_names(expression)
        assert names, f"{expression!r} names no metric"
        assert names <= exported, f"{expression!r} names {sorted(names - exported)}, not on /metrics"


def test_the_dashboard_has_its_panels_and_a_namespace_variable():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert all(any(title.startswith(wanted) for title in titles) for wanted in PANELS), titles
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variables["namespace"]["definition"]).groups()  # type: ignore[union-attr]
    assert (metric, label) == ("relay_trainingruns", "namespace") and metric in _live_metric_names()


def test_the_dashboard_configmap_is_opt_in_with_the_sidecar_label(chart: Any):
    assert not [o for o in _render(chart, {}) if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]]
    values = {"metrics": {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "ML"}}}}
    (configmap,) = [o for o in _render(chart, values) if o["kind"] == "ConfigMap"]
    assert configmap["metadata"]["name"] == "relay-dashboard"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "ML"}
    shipped = json.loads(configmap["data"]["relay-training.json"])
    assert shipped == json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_the_charts_dev_server_registers_the_same_search_attributes_as_the_embedded_one(chart: Any):
    values = {"temporal": {"embedded": {"enabled": True}}, "networkPolicy": {"enabled": True}}
    (server,) = [
        o for o in _render(chart, values) if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("temporal")
    ]
    args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dev_server_flags()
    assert [a for a in args if a.startswith("--search-attribute=")] == [
        f"--search-attribute={value}" for value in flags[1::2]
    ]
