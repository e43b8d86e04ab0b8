"""The generated TrainingSweep CRD on a real API server: a good sweep is stored, and the bad inputs a structural
schema can state (an empty search space, maxConcurrentTrials 0, a metric the trainer does not produce) are
refused with the field named. An unknown search-space field is pruned (1.20 prunes unknown fields, it cannot
refuse them): a space with nothing else left is refused as empty; `relay validate` names the field itself.
The Kubernetes trial activities make each trial a TrainingRun owned by the sweep: created once, suspended and
resumed through spec.suspend, deleted when pruned, and garbage-collected with the sweep; the sweep's status
(kubectl get's columns) is written to its own object only."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

from controller.kubernetes.main import kopf_settings, register_login
from controller.messages import TrainingRunInput
from controller.spec import workflow_id
from controller.sweep.crd import crd_manifest
from controller.sweep.kubernetes import KubernetesTrialActivities
from controller.sweep.messages import PublishSweepStatusRequest, StartTrialRequest, TrialRef, TrialSignalRequest
from controller.sweep.operator import register_sweep_handlers
from controller.sweep.spec import SweepStatus, parse_training_sweep, trial_name
from controller.sweep.workflow import TrainingSweepWorkflow
from controller.worker import DATA_CONVERTER

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


class SweepOperator:
    """The sweep handlers (kopf) on their own thread and loop, as in the controller: kopf owns its loop."""

    def __init__(self, configuration: Any, target_host: str, task_queue: str, namespace: str) -> None:
        self.args = (configuration, target_host, task_queue, namespace)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_flag: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sweep-operator", daemon=True)

    async def _main(self) -> None:
        configuration, target_host, task_queue, namespace = self.args
        self.loop, self.stop_flag = asyncio.get_running_loop(), asyncio.Event()
        temporal = await Client.connect(target_host, data_converter=DATA_CONVERTER)
        registry = kopf.OperatorRegistry()
        register_sweep_handlers(registry, temporal, task_queue)
        register_login(registry, configuration)
        settings = kopf.OperatorSettings()
        kopf_settings(settings)
        await kopf.operator(
            registry=registry, settings=settings, standalone=True, namespaces=[namespace], stop_flag=self.stop_flag
        )

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test
            self.error = exc

    def stop(self) -> None:
        if self.loop is not None and self.stop_flag is not None:
            self.loop.call_soon_threadsafe(self.stop_flag.set)
        self.thread.join(2)  # a daemon: kopf's watches may take a while to end, and nothing here is shared


@pytest.mark.anyio
async def test_the_sweep_on_the_cluster_owns_suspends_and_deletes_its_trials(
    kube: Any, control_plane: Any, crd_installed: Any, sweep_crd: None, namespace: str, temporal_env: Any,
    task_queue: str, tmp_path: Path,
) -> None:  # fmt: skip
    custom: Any = kubernetes.client.CustomObjectsApi(kube)
    client = temporal_env.client

    async def until(what: str, check: Any, timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            assert operator.error is None, f"the sweep operator crashed: {operator.error!r}"
            value = await asyncio.to_thread(check)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.2)

    def runs() -> list[dict[str, Any]]:
        found = custom.list_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns")
        return list(found["items"])

    def sweep_object(name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = custom.get_namespaced_custom_object(
                "relay.dev", "v1alpha1", namespace, "trainingsweeps", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    # No TrainingRun handlers here: the trials are created and never run, which is all this test looks at.
    activities = KubernetesTrialActivities(client, tmp_path, kube)
    target_host = client.service_client.config.target_host
    operator = SweepOperator(control_plane.api_client().configuration, target_host, task_queue, namespace)
    async with Worker(client, task_queue=task_queue, workflows=[TrainingSweepWorkflow], activities=activities.all()):
        operator.thread.start()
        try:
            sweep = _create(kube, namespace, GOOD)
            trials = await until("two trial TrainingRuns", lambda: len(runs()) == 2 and runs())
            assert sorted(r["metadata"]["name"] for r in trials) == ["lr-t000", "lr-t001"]
            for run in trials:
                (owner,) = run["metadata"]["ownerReferences"]
                assert owner["uid"] == sweep["metadata"]["uid"] and owner["kind"] == "TrainingSweep"
            status = await until("the sweep's status", lambda: (sweep_object("lr") or {}).get("status"))
            assert (status["phase"], status["trialCount"], status["running"]) == ("Running", 2, 2)

            custom.patch_namespaced_custom_object(
                "relay.dev", "v1alpha1", namespace, "trainingsweeps", "lr", {"spec": {"suspend": True}}
            )
            await until("the trials suspended", lambda: all(r["spec"].get("suspend") for r in runs()))

            bad = _with("bad", "spec.template.training", {"evalEverySteps": 15})  # the CRD cannot state this rule
            _create(kube, namespace, bad)
            failed = await until("the bad sweep failed", lambda: (sweep_object("bad") or {}).get("status"))
            assert failed["phase"] == "Failed" and "asha.minSteps: 10 is not a multiple" in failed["message"]

            custom.delete_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingsweeps", "lr")
            await until("the sweep and its trials gone", lambda: sweep_object("lr") is None and not runs())
            handle = client.get_workflow_handle(f"trainingsweep-{namespace}.lr")
            description = None
            for _ in range(100):
                description = await handle.describe()
                if description.status == WorkflowExecutionStatus.CANCELED:
                    break
                await asyncio.sleep(0.2)
            assert description is not None and description.status == WorkflowExecutionStatus.CANCELED
        finally:
            for name in ("lr", "bad"):  # the finalizer needs the handlers: delete while they run
                with contextlib.suppress(ApiException):
                    custom.delete_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingsweeps", name)
            await until("the sweeps deleted", lambda: sweep_object("lr") is None and sweep_object("bad") is None)
            operator.stop()
