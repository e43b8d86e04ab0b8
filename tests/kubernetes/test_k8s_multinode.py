"""Multi-node legs on the envtest control plane (v1.20: no Indexed Jobs; completionMode arrived in 1.21 and is
pruned by this server): a TrainingRun with resources.nodes 2 is refused, never run as unindexed pods. The operator
fails it with a status condition and an Event naming resources.nodes and the server's version; the backend refuses
a leg of it (a workflow started by hand) and creates no Job and no Service. A leg whose trainer reports a world size
other than its checkpoint's gets one WorldSizeChanged Event on its TrainingRun, also from a restarted controller."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from conftest import leg_of, make_training_run
from test_k8s_operator import Cluster, controller, phase, run_spec  # noqa: F401  (controller: a fixture)

from controller.backends.base import RunIdentityMismatch
from controller.kubernetes.backend import KubernetesBackend
from controller.kubernetes.server import server_features
from controller.leg_model import LegState
from relay_testing.process_kubelet import ProcessKubelet
from trainer import volume

pytestmark = pytest.mark.cluster


def refusal(kube: kubernetes.client.ApiClient) -> str:
    features = server_features(kube)
    assert (features.major, features.minor) < (1, 24), "this test is about a server without Indexed Jobs"
    return (
        f"spec.resources.nodes: 2 nodes need an Indexed Job (Kubernetes 1.24+); this API server is "
        f"v{features.major}.{features.minor}"
    )


def nothing_created(kube: kubernetes.client.ApiClient, namespace: str) -> None:
    assert kubernetes.client.BatchV1Api(kube).list_namespaced_job(namespace).items == []
    assert kubernetes.client.CoreV1Api(kube).list_namespaced_service(namespace).items == []


@pytest.mark.anyio
async def test_the_operator_refuses_a_multi_node_run_naming_the_field_and_the_server_version(
    controller: Any,  # noqa: F811 - the fixture imported above
    kube: Any,
    namespace: str,
) -> None:
    cluster = Cluster(kube, namespace)
    name = f"mn-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec(resources={"cpu": "1", "memory": "1Gi", "processes": 1, "nodes": 2}))
    run = await cluster.until(name, phase("Failed"))
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "Invalid"
    assert failed["message"].startswith(refusal(kube))
    events = await asyncio.to_thread(
        cluster.core.list_namespaced_event, namespace, field_selector=f"involvedObject.name={name}"
    )
    assert any(e.reason == "Invalid" and refusal(kube) in e.message for e in events.items), events.items
    nothing_created(kube, namespace)


def test_the_backend_refuses_a_multi_node_leg_and_creates_nothing(
    kube: Any, crd_installed: Any, namespace: str, control_plane: Any, volume_root: Path
) -> None:
    spec = {"dataset": {"source": "demo"}, "resources": {"cpu": "1", "memory": "1Gi", "nodes": 2}}
    name = f"mn-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, spec)
    leg = leg_of(namespace, name, spec, owner_uid=uid)

    async def scenario() -> None:
        backend = KubernetesBackend(control_plane.api_client(), conflict_wait_s=1.0)
        try:
            with pytest.raises(RunIdentityMismatch) as refused:
                await backend.launch(leg)
            assert refusal(kube) in str(refused.value)
        finally:
            await backend.close()

    asyncio.run(scenario())
    nothing_created(kube, namespace)


# What trainer.train writes into progress.json's message when a leg resumes on another world size (issue 14).
CHANGED = (
    "world size changed 2 -> 1 since checkpoint step 4; 1 process(es), 2 micro-batch(es) of 8 each per step: "
    "global batch 16 kept"
)


def test_a_world_size_change_is_one_event_on_the_run(
    kube: Any,
    crd_installed: Any,
    namespace: str,
    control_plane: Any,
    volume_root: Path,
    standin_kubelet: ProcessKubelet,
) -> None:
    spec = {
        "dataset": {"source": "demo"},
        "resources": {"cpu": "1", "memory": "1Gi"},
        "terminationGracePeriodSeconds": 5,
    }
    name = f"ws-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, spec)
    leg = leg_of(
        namespace, name, spec, owner_uid=uid, leg=1, env={"RELAY_STANDIN_STEPS": "40", "RELAY_STANDIN_STEP_S": "0.25"}
    )
    layout = volume.RunLayout.for_run(volume_root, namespace, name)

    def told() -> list[str]:
        selector = f"involvedObject.name={name},reason=WorldSizeChanged"
        return [
            e.message
            for e in kubernetes.client.CoreV1Api(kube).list_namespaced_event(namespace, field_selector=selector).items
        ]

    async def scenario() -> None:
        backends = [KubernetesBackend(control_plane.api_client(), conflict_wait_s=1.0, volume_root=volume_root)]
        try:
            await backends[0].launch(leg)
            observation = await backends[0].observe(leg)
            while observation.state != LegState.RUNNING:
                observation = await backends[0].wait_for_change(leg, 1.0)
            assert told() == []  # the stand-in's progress says nothing of the world size
            for backend in (backends[0], backends[0]):  # the trainer's report, seen twice
                await asyncio.to_thread(volume.write_progress, layout, {"step": 5, "message": f"resumed; {CHANGED}"})
                await backend.observe(leg)
            assert told() == [f"leg 1: {CHANGED}"]
            backends.append(KubernetesBackend(control_plane.api_client(), volume_root=volume_root))  # a restart
            await asyncio.to_thread(volume.write_progress, layout, {"step": 6, "message": f"resumed; {CHANGED}"})
            await backends[1].observe(leg)
            assert told() == [f"leg 1: {CHANGED}"]
            await backends[0].stop(leg, 5.0)
        finally:
            for backend in backends:
                await backend.close()

    asyncio.run(scenario())
