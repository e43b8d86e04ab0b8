"""The operator runs with a ServiceAccount token bound to exactly manifests/rbac/controller.yaml, end to end."""

from __future__ import annotations

import asyncio
import copy
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from test_k8s_operator import CONTROLLERS, Cluster, ControllerProcess, phase, run_spec

from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
RBAC = Path(__file__).resolve().parents[2] / "manifests" / "rbac" / "controller.yaml"


def apply_rbac(kube: kubernetes.client.ApiClient, namespace: str) -> str:
    """Create the ServiceAccount, Role and RoleBinding in `namespace`; return the account's token."""
    core, rbac = kubernetes.client.CoreV1Api(kube), kubernetes.client.RbacAuthorizationV1Api(kube)
    for document in yaml.safe_load_all(RBAC.read_text()):
        doc = copy.deepcopy(document)
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):  # node reads (issue 13): one per test namespace
            doc["metadata"]["name"] += f"-{namespace}"
            if "roleRef" in doc:
                doc["roleRef"]["name"] += f"-{namespace}"
            {"ClusterRole": rbac.create_cluster_role, "ClusterRoleBinding": rbac.create_cluster_role_binding}[
                doc["kind"]
            ](doc)
            continue
        doc["metadata"]["namespace"] = namespace
        create = {
            "ServiceAccount": core.create_namespaced_service_account,
            "Role": rbac.create_namespaced_role,
            "RoleBinding": rbac.create_namespaced_role_binding,
        }[doc["kind"]]
        create(namespace, doc)
    # A TokenRequest, as the kubelet gets one: served on 1.20 and on 1.24+, where no token Secret is made any more.
    request: Any = {"spec": {"expirationSeconds": 3600}}
    issued = core.create_namespaced_service_account_token("relay-controller", namespace, request)
    return str(issued.status.token)


async def test_operator_runs_a_training_run_with_only_the_shipped_role(
    temporal_env: Any,
    control_plane: Any,
    crd_installed: Any,
    kube: Any,
    namespace: str,
    standin_kubelet: ProcessKubelet,
    volume_root: Path,
    task_queue: str,
) -> None:
    token = await asyncio.to_thread(apply_rbac, kube, namespace)
    limited = control_plane.api_client(token)
    with pytest.raises(kubernetes.client.ApiException) as denied:  # the token really is limited
        kubernetes.client.CoreV1Api(limited).list_namespace()
    assert denied.value.status == 403
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": "10", "RELAY_STANDIN_STEP_S": "0.05"})
    target = temporal_env.client.service_client.config.target_host
    process = ControllerProcess(target, limited.configuration, volume_root, namespace, task_queue).start()
    CONTROLLERS.append(process)
    try:
        cluster = Cluster(kube, namespace)
        name = f"rbac-{uuid.uuid4().hex[:6]}"
        await cluster.apply(name, run_spec(training={"maxSteps": 10, "checkpointEverySteps": 5}))
        run = await cluster.until(name, phase("Succeeded"), timeout_s=90)
        assert run["status"]["legCount"] == 1
        assert process.error is None
        await cluster.delete_and_wait_gone(name, 30, "finalizer not removed with the limited Role")
    finally:
        CONTROLLERS.remove(process)
        await asyncio.to_thread(process.stop)
