"""Attack tier, issue 11 item 3: Temporal is not a trust boundary (cluster tier).

Finding: starting `CheckpointedBertTrainingWorkflow` by hand, with no TrainingRun, made the controller create
Jobs with any image and priority class `system-node-critical`; with a made-up owner uid the garbage collector
deleted each Job and the workflow relaunched it, 46 "preemptions" in 15 s. Now launch_leg re-reads the
TrainingRun: a workflow whose input is not an existing object's (namespace, name and uid) writes nothing (no
snapshot, config or folder move), creates nothing and fails at once naming what did not match; launch checks
again, and a matching workflow gets Jobs built from the object's own spec and run folder.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from conftest import make_training_run
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from controller.backends.base import RunIdentityMismatch
from controller.kubernetes.backend import KubernetesBackend
from controller.kubernetes.status_sink import KubernetesStatusSink
from controller.leg_model import LegSpec
from controller.messages import TrainingRunInput
from controller.spec import TrainingRunSpec, workflow_id
from controller.worker import DATA_CONVERTER, build_worker

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
OBJECT_SPEC: dict[str, Any] = {
    "dataset": {"source": "demo", "maxRows": 40},
    "training": {"maxSteps": 4},
    "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
    "retries": {"backoffSeconds": 0.5, "maxFailures": 50},
}
EVIL_IMAGE = "evil.example/miner:latest"


def forged_spec() -> TrainingRunSpec:
    """What an attacker puts in the input: any image, a system priority class (unvalidated: model_copy)."""
    spec = TrainingRunSpec.model_validate({**OBJECT_SPEC, "image": EVIL_IMAGE})
    scheduling = spec.scheduling.model_copy(update={"priority_class_name": "system-node-critical"})
    return spec.model_copy(update={"scheduling": scheduling})


@pytest.fixture
async def worker_client(
    temporal_env: Any, control_plane: Any, crd_installed: Any, volume_root: Path, task_queue: str
) -> AsyncIterator[Client]:
    """The controller's worker (real activities, Kubernetes backend and status sink) on this test's task queue."""
    client = await Client.connect(temporal_env.client.service_client.config.target_host, data_converter=DATA_CONVERTER)
    backend = KubernetesBackend(control_plane.api_client(), volume_root=volume_root, api_retry_s=10.0)
    sink = KubernetesStatusSink(control_plane.api_client(), api_retry_s=10.0)  # what the controller publishes with
    async with build_worker(client, backend, volume_root, sink, task_queue=task_queue):
        yield client
    await backend.close()


async def _run_forged(client: Client, task_queue: str, run_input: TrainingRunInput) -> ApplicationError:
    handle = await client.start_workflow(
        "CheckpointedBertTrainingWorkflow",
        run_input,
        id=workflow_id(run_input.namespace, run_input.name),
        task_queue=task_queue,
    )
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 120)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


def _jobs(kube: kubernetes.client.ApiClient, namespace: str) -> list[str]:
    return [job.metadata.name for job in kubernetes.client.BatchV1Api(kube).list_namespaced_job(namespace).items]


async def test_a_workflow_for_no_trainingrun_creates_no_job_and_fails_at_once(
    worker_client: Client, kube: Any, namespace: str, task_queue: str, volume_root: Path
) -> None:
    """No TrainingRun at all: an evil image and system-node-critical were once created as a Job."""
    run_input = TrainingRunInput(namespace=namespace, name="ghost", spec=forged_spec(), owner_uid=str(uuid.uuid4()))
    failure = await _run_forged(worker_client, task_queue, run_input)
    assert failure.message == f"no snapshot made: TrainingRun {namespace}/ghost: not found"
    assert _jobs(kube, namespace) == [] and not (volume_root / f"runs/{namespace}/ghost").exists()


async def test_a_forged_owner_uid_creates_no_job_and_is_not_relaunched(
    worker_client: Client, kube: Any, namespace: str, task_queue: str, volume_root: Path
) -> None:
    """A real TrainingRun but a made-up uid (or none): once 46 launches in 15 s; now none, one failure naming
    the uid, and the victim's folder untouched (its config is not rewritten, nor the folder moved aside)."""
    name = f"victim-{uuid.uuid4().hex[:6]}"
    real_uid = make_training_run(kube, namespace, name, OBJECT_SPEC)
    victim = volume_root / f"runs/{namespace}/{name}"
    victim.mkdir(parents=True)
    (victim / "config.json").write_text("{}")
    for forged_uid in ("forged-uid", None):
        run_input = TrainingRunInput(namespace=namespace, name=name, spec=forged_spec(), owner_uid=forged_uid)
        failure = await _run_forged(worker_client, task_queue, run_input)
        assert failure.message == (
            f"no snapshot made: TrainingRun {namespace}/{name}: owner_uid {forged_uid!r} is not the object's uid "
            f"{real_uid!r}"
        )
        assert failure.non_retryable
    assert _jobs(kube, namespace) == []
    assert sorted(p.name for p in victim.iterdir()) == ["config.json"] and (victim / "config.json").read_text() == "{}"
    # Nor did it publish: the victim's status is not "Failed" and it carries no Events of the forged workflow.
    run = kubernetes.client.CustomObjectsApi(kube).get_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingruns", name
    )
    assert not run.get("status")
    events = kubernetes.client.CoreV1Api(kube).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    assert events.items == []


async def test_launch_itself_refuses_a_leg_that_is_not_the_objects(
    control_plane: Any, crd_installed: Any, kube: Any, namespace: str, volume_root: Path
) -> None:
    """The launch check on its own (a workflow past snapshot and prepare): uid, run folder and snapshot path."""
    name = f"leg-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, OBJECT_SPEC)
    backend = KubernetesBackend(control_plane.api_client(), volume_root=volume_root, api_retry_s=10.0)
    good = LegSpec(
        namespace=namespace,
        name=name,
        leg=0,
        run_path=f"runs/{namespace}/{name}",
        snapshot_path=f"snapshots/{'0' * 64}",
        spec=forged_spec(),
        owner_uid=uid,
    )
    forged = {
        "owner_uid": ("forged", "owner_uid 'forged'"),
        "run_path": ("runs/other-ns/their-run", "run_path 'runs/other-ns/their-run' is not its own run folder"),
        "snapshot_path": ("runs/other-ns", "snapshot_path 'runs/other-ns' is not snapshots/<sha256>"),
    }
    try:
        for field, (value, message) in forged.items():
            with pytest.raises(RunIdentityMismatch, match=re.escape(message)):
                await backend.launch(good.model_copy(update={field: value}))
        assert _jobs(kube, namespace) == []
    finally:
        await backend.close()


async def test_a_matching_workflow_gets_a_job_from_the_objects_spec_not_its_input(
    worker_client: Client, kube: Any, namespace: str, task_queue: str
) -> None:
    """The object's uid with a doctored spec: the Job takes the object's image and no priority class."""
    name = f"owned-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, OBJECT_SPEC)
    run_input = TrainingRunInput(namespace=namespace, name=name, spec=forged_spec(), owner_uid=uid)
    handle = await worker_client.start_workflow(
        "CheckpointedBertTrainingWorkflow", run_input, id=workflow_id(namespace, name), task_queue=task_queue
    )
    batch = kubernetes.client.BatchV1Api(kube)
    try:
        for _ in range(600):
            if f"{name}-leg-0" in _jobs(kube, namespace):
                break
            await asyncio.sleep(0.1)
        job = batch.read_namespaced_job(f"{name}-leg-0", namespace)
    finally:
        await handle.terminate(reason="test over")
    pod = job.spec.template.spec
    assert [c.image for c in pod.containers] == [TrainingRunSpec.model_validate(OBJECT_SPEC).image]
    assert pod.priority_class_name is None
    assert job.metadata.owner_references[0].uid == uid
