"""A promoted trial left Paused though its TrainingRun says spec.suspend false is resumed by the sweep's watch.

The operator's spec.suspend handler can miss the second of two quick changes (the sweep pauses a trial at its
rung and promotes it a moment later); the watch then finds the run Paused with spec.suspend false and signals
resume itself. Provoked here with the real API server and a real workflow standing in for the trial's run: the
TrainingRun's status says Paused and nothing else will resume it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes
import pytest
from temporalio import workflow
from temporalio.worker import Worker

from controller.messages import ResumeRequest
from controller.spec import workflow_id
from controller.sweep.kubernetes import KubernetesTrialActivities
from controller.sweep.messages import WatchTrialRequest

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]


@workflow.defn(name="CheckpointedBertTrainingWorkflow", sandboxed=False)
class PausedRun:
    """Stands in for a paused trial's run: it counts the resume signals it gets and stays open until terminated.

    It must not finish at its first resume: the second poll's signal would then race the run's completion and be
    dropped as NOT_FOUND (the reconcile ignores ended runs), which is what made this test flaky.
    """

    def __init__(self) -> None:
        self.resumes = 0

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)

    @workflow.signal(name="resume")
    def resume(self, request: ResumeRequest | None = None) -> None:
        self.resumes += 1

    @workflow.query(name="resumes")
    def resume_count(self) -> int:
        return self.resumes


def _training_run(kube: Any, namespace: str, name: str, suspend: bool) -> None:
    custom: Any = kubernetes.client.CustomObjectsApi(kube)
    body = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {"dataset": {"source": "demo"}, "suspend": suspend},
    }
    custom.create_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns", body)
    status = {"status": {"phase": "Paused", "message": "paused (spec.suspend)"}}
    custom.patch_namespaced_custom_object_status("relay.dev", "v1alpha1", namespace, "trainingruns", name, status)


@pytest.mark.parametrize("suspend", [False, True], ids=["spec-says-run", "spec-says-suspend"])
async def test_the_watch_resumes_a_trial_paused_against_its_spec(
    kube: Any, crd_installed: Any, namespace: str, temporal_env: Any, task_queue: str, tmp_path: Path, suspend: bool
) -> None:
    client = temporal_env.client
    name = "sw-t002"
    _training_run(kube, namespace, name, suspend)
    activities = KubernetesTrialActivities(client, tmp_path, kube)
    request = WatchTrialRequest(
        namespace=namespace, name=name, workflow_id=workflow_id(namespace, name), metric="eval_loss"
    )
    async with Worker(client, task_queue=task_queue, workflows=[PausedRun]):
        handle = await client.start_workflow(PausedRun.run, id=request.workflow_id, task_queue=task_queue)
        await activities._reconcile(request)
        await activities._reconcile(request)  # a second poll: the signal is idempotent for the run
        resumes = await handle.query(PausedRun.resume_count)
        await handle.terminate()
        if suspend:
            assert resumes == 0, "a trial the sweep suspended (spec.suspend true) must stay paused"
        else:
            assert resumes == 2, "each poll that finds the run Paused against its spec signals resume"
