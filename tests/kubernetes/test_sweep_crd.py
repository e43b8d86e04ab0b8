"""The generated TrainingSweep CRD on a real API server: a good sweep is stored, and the bad inputs a structural
schema can state (an empty search space, maxConcurrentTrials 0, a metric the trainer does not produce) are
refused with the field named. An unknown search-space field is pruned (1.20 prunes unknown fields, it cannot
refuse them): a space with nothing else left is refused as empty; `relay validate` names the field itself."""

from __future__ import annotations

import copy
import time
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from controller.sweep.crd import crd_manifest

pytestmark = [pytest.mark.cluster]

GOOD: dict[str, Any] = {
    "apiVersion": "relay.dev/v1alpha1",
    "kind": "TrainingSweep",
    "metadata": {"name": "lr"},
    "spec": {
        "template": {"model": "tiny", "dataset": {"source": "demo"}},
        "searchSpace": {"learningRate": {"type": "choice", "values": [0.001, 0.0001]}},
        "algorithm": "grid",
        "maxConcurrentTrials": 2,
        "objective": {"metric": "eval_loss", "goal": "minimize"},
        "asha": {"minSteps": 10, "maxSteps": 40},
    },
}


@pytest.fixture(scope="module")
def sweep_crd(kube: kubernetes.client.ApiClient) -> None:
    api: Any = kubernetes.client.ApiextensionsV1Api(kube)
    manifest = crd_manifest()
    name = manifest["metadata"]["name"]
    try:
        api.create_custom_resource_definition(manifest)
    except ApiException as exc:
        if exc.status != 409:
            raise
        current = api.read_custom_resource_definition(name)
        body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": current.metadata.resource_version}}
        api.replace_custom_resource_definition(name, body)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = api.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return
        time.sleep(0.1)
    raise TimeoutError(f"CRD {name} not Established")


def _create(kube: kubernetes.client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    api: Any = kubernetes.client.CustomObjectsApi(kube)  # plain dicts in and out
    created: dict[str, Any] = api.create_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingsweeps", body
    )
    return created


def _with(name: str, path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(GOOD)
    body["metadata"]["name"] = name
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    node[last] = value
    return body


def test_a_good_sweep_is_stored_with_its_values(kube: Any, sweep_crd: None, namespace: str) -> None:
    created = _create(kube, namespace, GOOD)
    assert created["spec"]["searchSpace"]["learningRate"]["values"] == [0.001, 0.0001]  # numbers kept as numbers


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.searchSpace", {}, "spec.searchSpace"),
        ("spec.searchSpace", {"dropout": {"type": "uniform", "min": 0, "max": 1}}, "spec.searchSpace"),
        ("spec.maxConcurrentTrials", 0, "spec.maxConcurrentTrials"),
        ("spec.objective.metric", "bleu", "spec.objective.metric"),
    ],
)
def test_the_api_server_refuses_a_bad_sweep_naming_the_field(
    kube: Any, sweep_crd: None, namespace: str, path: str, value: Any, field: str
) -> None:
    with pytest.raises(ApiException) as raised:
        _create(kube, namespace, _with("bad", path, value))
    assert raised.value.status == 422
    assert field in str(raised.value.body)
