"""Attack tier, issue 11 "Temporal is trusted blindly" (chart part) and "Scheduling fields are open" (chart part).

Findings (reproduced before this change): the chart's Temporal dev server listened on 0.0.0.0 with no
NetworkPolicy, so any pod in any namespace could start `CheckpointedBertTrainingWorkflow` directly; the
controller's /metrics was open the same way; and the chart had no allow-lists for what a TrainingRun may ask
(priority class, tolerations, image). The chart, rendered by the Helm library, now carries NetworkPolicies
and hands the controller its allow-lists, which parse into the policy the create handler applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from controller.kubernetes.main import build_parser
from controller.policy import check_policy
from controller.spec import TrainingRunSpec

CHART = Path(__file__).resolve().parents[2] / "helm" / "relay"
RELEASE, NAMESPACE = "relay", "ml"
EXTERNAL = {"temporal": {"address": "temporal.example.com:7233"}}
EMBEDDED = {"temporal": {"embedded": {"enabled": True}}}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    manifests.pop(f"{CHART.name}/templates/NOTES.txt", None)
    return [doc for _, text in sorted(manifests.items()) for doc in yaml.safe_load_all(text) if doc]


def network_policy(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    ]
    return found["spec"]


def allowed_namespaces(peer: dict[str, Any]) -> list[str]:
    (expression,) = peer["namespaceSelector"]["matchExpressions"]
    assert (expression["key"], expression["operator"]) == ("kubernetes.io/metadata.name", "In")
    return list(expression["values"])


def test_the_dev_server_takes_grpc_from_the_controller_only_and_its_ui_from_allowed_namespaces(chart: Any) -> None:
    objects = render(chart, {**EMBEDDED, "networkPolicy": {"allowedNamespaces": ["ops"]}})
    spec = network_policy(objects, "temporal")
    assert spec["policyTypes"] == ["Ingress"]
    grpc, ui = spec["ingress"]
    assert grpc["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    ((peer,),) = [grpc["from"]]
    assert peer == {"podSelector": {"matchLabels": {**selector("controller")}}}
    assert ui["ports"] == [{"port": "http-ui", "protocol": "TCP"}]
    ((peer,),) = [ui["from"]]
    assert allowed_namespaces(peer) == [NAMESPACE, "ops"]


def selector(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "relay",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": component,
    }


def test_the_dev_server_is_refused_without_its_network_policy(chart: Any) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(chart, {**EMBEDDED, "networkPolicy": {"enabled": False}})
    assert "temporal.embedded.enabled needs networkPolicy.enabled" in str(caught.value)


def test_metrics_are_reachable_from_allowed_namespaces_only_and_probes_stay_open(chart: Any) -> None:
    spec = network_policy(render(chart, EXTERNAL), "controller")
    probes, metrics = spec["ingress"]
    assert probes == {"ports": [{"port": "http-health", "protocol": "TCP"}]}  # the kubelet, from the node
    assert metrics["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert allowed_namespaces(metrics["from"][0]) == [NAMESPACE]
    assert not [
        o for o in render(chart, EXTERNAL) if o["kind"] == "NetworkPolicy" and "temporal" in o["metadata"]["name"]
    ]


def controller_policy(chart: Any, values: dict[str, Any]) -> Any:
    (deployment,) = [o for o in render(chart, values) if o["kind"] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["relay", "controller"]
    return build_parser().parse_args(command[2:]).policy


def run(**fields: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, **fields})


def test_the_default_chart_refuses_the_reported_scheduling_and_foreign_images(chart: Any) -> None:
    policy = controller_policy(chart, EXTERNAL)
    assert check_policy(run(), policy) == []  # the default trainer image, no priority class
    refused = {
        "spec.scheduling.priorityClassName": run(scheduling={"priorityClassName": "system-node-critical"}),
        "spec.scheduling.tolerations.0": run(scheduling={"tolerations": [{"operator": "Exists"}]}),
        "spec.image": run(image="docker.io/attacker/miner:latest"),
    }
    for field, spec in refused.items():
        assert [line.split(": ", 1)[0] for line in check_policy(spec, policy)] == [field]


def test_values_extend_the_allow_lists_and_keep_the_charts_registry(chart: Any) -> None:
    values = {
        **EXTERNAL,
        "policy": {
            "priorityClasses": ["batch-low"],
            "tolerations": [{"key": "spot", "effect": "NoSchedule"}],
            "imageRegistries": ["registry.corp:5000/ml"],
        },
    }
    policy = controller_policy(chart, values)
    assert policy.image_registries == ["ghcr.io/relay-ml", "registry.corp:5000/ml"]
    allowed = run(
        image="registry.corp:5000/ml/trainer:2",
        scheduling={
            "priorityClassName": "batch-low",
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    assert check_policy(allowed, policy) == []
    assert check_policy(run(), policy) == []


def test_a_misspelt_policy_value_fails_at_render_time(chart: Any) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(chart, {**EXTERNAL, "policy": {"priorityClass": ["x"]}})
    assert "priorityClass" in str(caught.value)
