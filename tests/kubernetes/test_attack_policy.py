"""Attack tier on the envtest cluster, issue 11 "Scheduling fields are open" and "Validation gaps".

Findings (reproduced before this change): a TrainingRun with `priorityClassName: system-node-critical` or a
key-less `operator: Exists` toleration started a workflow whose leg Job carried it; `cpu: "999999999999"` and
`memory: 99999999999999Ti` were accepted by the API server; `cpu: "600"` was accepted by the API server and
failed at run time with a raw pydantic dump. Now the API server refuses what the CRD schema can state, and
the controller fails the rest at creation, naming the field, and creates no Job.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import kubernetes
import pytest
from conftest import make_training_run
from temporalio.client import Client
from test_attack_forged_workflow import OBJECT_SPEC, _jobs, _run_forged, worker_client
from test_k8s_operator import Cluster, controller, phase, run_spec

from controller.messages import TrainingRunInput
from controller.spec import TrainingRunSpec

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
__all__ = ["controller", "worker_client"]  # fixtures, shared with the operator's and forged-workflow tests


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("spec.scheduling.priorityClassName", {"scheduling": {"priorityClassName": "system-node-critical"}}),
        ("spec.scheduling.tolerations.0", {"scheduling": {"tolerations": [{"operator": "Exists"}]}}),
        ("spec.resources.cpu", {"resources": {"cpu": "600", "memory": "1Gi"}}),
    ],
)
async def test_the_controller_fails_a_run_the_policy_or_the_models_refuse_naming_the_field(
    controller: Any, kube: Any, namespace: str, field: str, overrides: dict[str, Any]
) -> None:
    cluster = Cluster(kube, namespace)
    name = f"attack-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec(**overrides))
    run = await cluster.until(name, phase("Failed"), timeout_s=60)
    assert run["status"]["message"].startswith(f"{field}: "), run["status"]
    (failed,) = [c for c in run["status"]["conditions"] if c["type"] == "Failed"]
    assert failed["status"] == "True" and failed["message"].startswith(f"{field}: ")
    jobs = await asyncio.to_thread(cluster.batch.list_namespaced_job, namespace)
    assert [j.metadata.name for j in jobs.items] == []


@pytest.mark.parametrize(
    ("field", "resources"),
    [("spec.resources.cpu", {"cpu": "999999999999"}), ("spec.resources.memory", {"memory": "99999999999999Ti"})],
)
async def test_the_api_server_refuses_absurd_quantities_naming_the_field(
    kube: Any, crd_installed: Any, namespace: str, field: str, resources: dict[str, str]
) -> None:
    cluster = Cluster(kube, namespace)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        await cluster.apply(f"attack-{uuid.uuid4().hex[:6]}", run_spec(resources=resources))
    assert refused.value.status == 422
    assert field in str(refused.value.body)


async def test_a_workflow_for_a_run_the_policy_refuses_creates_no_job(
    worker_client: Client, kube: Any, namespace: str, task_queue: str
) -> None:
    """The object exists with its own uid but asks for system-node-critical (the create handler failed it):
    a workflow started by hand for it still creates nothing, since launch_leg checks the policy again."""
    name = f"refused-{uuid.uuid4().hex[:6]}"
    spec = {**OBJECT_SPEC, "scheduling": {"priorityClassName": "system-node-critical"}}
    uid = make_training_run(kube, namespace, name, spec)
    run_input = TrainingRunInput(
        namespace=namespace, name=name, spec=TrainingRunSpec.model_validate(spec), owner_uid=uid
    )
    failure = await _run_forged(worker_client, task_queue, run_input)
    assert "spec.scheduling.priorityClassName: 'system-node-critical' is reserved" in failure.message
    assert failure.non_retryable and _jobs(kube, namespace) == []
