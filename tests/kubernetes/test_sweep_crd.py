"""The generated TrainingSweep CRD on a real API server: a good sweep is stored, and the bad inputs a structural
schema can state (an empty search space, maxConcurrentTrials 0, a metric the trainer does not produce) are
refused with the field named. An unknown search-space field is pruned (1.20 prunes unknown fields, it cannot
refuse them): a space with nothing else left is refused as empty; `relay validate` names the field itself.
The Kubernetes trial activities make each trial a TrainingRun owned by the sweep: created once, suspended and
resumed through spec.suspend, deleted when pruned, and garbage-collected with the sweep; the sweep's status
(kubectl get's columns) is written to its own object only."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from controller.messages import TrainingRunInput
from controller.spec import workflow_id
from controller.sweep.crd import crd_manifest
from controller.sweep.kubernetes import KubernetesTrialActivities
from controller.sweep.messages import PublishSweepStatusRequest, StartTrialRequest, TrialRef, TrialSignalRequest
from controller.sweep.spec import SweepStatus, parse_training_sweep, trial_name

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


@pytest.mark.anyio
async def test_trials_are_training_runs_owned_by_the_sweep(
    kube: Any, crd_installed: Any, sweep_crd: None, namespace: str, temporal_env: Any, tmp_path: Path
) -> None:
    custom: Any = kubernetes.client.CustomObjectsApi(kube)
    sweep = _create(kube, namespace, GOOD)
    spec = parse_training_sweep(GOOD).spec
    activities = KubernetesTrialActivities(temporal_env.client, tmp_path, kube)

    def request(index: int) -> StartTrialRequest:
        name = trial_name("lr", index)
        run_input = TrainingRunInput(namespace=namespace, name=name, spec=spec.trial_spec(spec.assignments()[index]))
        return StartTrialRequest(
            run_input=run_input,
            workflow_id=workflow_id(namespace, name),
            task_queue="unused",
            sweep_name="lr",
            sweep_uid=sweep["metadata"]["uid"],
        )

    def read(name: str) -> dict[str, Any]:
        found: dict[str, Any] = custom.get_namespaced_custom_object(
            "relay.dev", "v1alpha1", namespace, "trainingruns", name
        )
        return found

    first = request(0)
    await activities.start_trial(first)
    await activities.start_trial(first)  # a retried start keeps the one there
    run = read("lr-t000")
    (owner,) = run["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("TrainingSweep", "lr", sweep["metadata"]["uid"])
    assert run["metadata"]["labels"]["relay.dev/sweep"] == "lr"
    assert run["spec"]["training"]["learningRate"] == 0.001 and run["spec"]["training"]["maxSteps"] == 40
    for signal, suspended in (("pause", True), ("resume", False)):
        await activities.signal_trial(TrialSignalRequest(workflow_id=first.workflow_id, signal=signal, reason="rung"))
        assert read("lr-t000")["spec"]["suspend"] is suspended
    assert await activities.cancel_trial(TrialRef(workflow_id=first.workflow_id)) is True  # pruned: deleted
    with pytest.raises(ApiException) as gone:
        read("lr-t000")
    assert gone.value.status == 404
    assert await activities.cancel_trial(TrialRef(workflow_id=first.workflow_id)) is False  # nothing left
    await activities.start_trial(request(1))
    status = SweepStatus(phase="Running", trial_count=4, running=2, pruned=1, best_text="lr-t001 eval_loss=0.5")
    uid = sweep["metadata"]["uid"]
    await activities.publish_status(
        PublishSweepStatusRequest(namespace=namespace, name="lr", status=status, owner_uid=uid)
    )
    other = status.model_copy(update={"phase": "Failed"})  # a workflow of another object of that name writes nothing
    await activities.publish_status(
        PublishSweepStatusRequest(namespace=namespace, name="lr", status=other, owner_uid="x")
    )
    shown = custom.get_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingsweeps", "lr")["status"]
    assert (shown["phase"], shown["trialCount"], shown["running"], shown["pruned"], shown["bestText"]) == (
        "Running",
        4,
        2,
        1,
        "lr-t001 eval_loss=0.5",
    )
    custom.delete_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingsweeps", "lr")
    deadline = time.monotonic() + 60  # the garbage collector deletes what the sweep owned
    while True:
        try:
            read("lr-t001")
        except ApiException as exc:
            assert exc.status == 404
            break
        assert time.monotonic() < deadline, "the deleted sweep's trial TrainingRun was not garbage-collected"
        await asyncio.sleep(0.5)
