"""A Deployment's pod that exits at once crash-loops as under a kubelet, and never counts as available.

Once, the process kubelet marked every started pod Ready and a pod that exited Failed: a controller that could
not start looked ready for a moment (`kubectl rollout status` said success) and the ReplicaSet made ~110 pods in
35 s. Now the container restarts in place with a growing back-off (restartCount, waiting CrashLoopBackOff, the
exit in lastState), and a readiness probe gates Ready, as the chart's /readyz probe does on a real node.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from test_k8s_real_trainer import kubectl

from relay_testing.control_plane import ControlPlane, free_port
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = pytest.mark.cluster


@pytest.fixture
def quick_kubelet(kubelet: ProcessKubelet) -> Iterator[ProcessKubelet]:
    kubelet.restart_backoff_s = 0.3
    yield kubelet
    kubelet.restart_backoff_s = 10.0


def _deployment(name: str, node: str, command: list[str], port: int) -> dict[str, Any]:
    labels = {"app": name}
    container = {
        "name": "main",
        "image": "relay-controller:dev",
        "command": command,
        "ports": [{"name": "http-health", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http-health"}, "periodSeconds": 1},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [container]},
            },
        },
    }


def _rollout_status(plane: ControlPlane, namespace: str, name: str) -> subprocess.CompletedProcess[str]:
    """`kubectl rollout status` itself, as a user runs it after an install (5 s to say yes)."""
    command = [kubectl(), "--kubeconfig", str(plane.kubeconfig), "-n", namespace]
    command += ["rollout", "status", f"deployment/{name}", "--timeout=5s"]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def _rolled_out(apps: Any, namespace: str, name: str) -> bool:
    """What `kubectl rollout status` waits for."""
    deployment = apps.read_namespaced_deployment(name, namespace)
    status = deployment.status
    return bool(
        (status.observed_generation or 0) >= deployment.metadata.generation
        and (status.updated_replicas or 0) == 1
        and (status.available_replicas or 0) == 1
    )


def test_a_container_that_exits_at_once_crash_loops_in_place_and_never_rolls_out(
    kube: kubernetes.client.ApiClient, control_plane: ControlPlane, namespace: str, quick_kubelet: ProcessKubelet
) -> None:
    core: Any = kubernetes.client.CoreV1Api(kube)
    apps: Any = kubernetes.client.AppsV1Api(kube)
    name = f"crash-{uuid.uuid4().hex[:6]}"
    command = ["sh", "-c", "echo cannot start >&2; exit 3"]
    apps.create_namespaced_deployment(namespace, _deployment(name, quick_kubelet.node_name, command, free_port()))
    deadline = time.monotonic() + 40
    pods: list[Any] = []
    while time.monotonic() < deadline:
        assert not _rolled_out(apps, namespace, name), "a crash-looping pod counted as available"
        pods = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items
        statuses = pods[0].status.container_statuses if len(pods) == 1 else None
        if statuses and statuses[0].restart_count >= 2 and statuses[0].state.waiting:
            break
        time.sleep(0.2)
    assert len(pods) == 1, f"the ReplicaSet replaced the pod instead of the kubelet restarting it: {len(pods)}"
    pod = pods[0]
    status = pod.status.container_statuses[0]
    assert status.restart_count >= 2 and not status.ready
    assert status.state.waiting.reason == "CrashLoopBackOff", status.state
    assert status.last_state.terminated.exit_code == 3
    assert pod.status.phase == "Running"
    ready = next(c for c in pod.status.conditions if c.type == "Ready")
    assert ready.status == "False"
    assert "cannot start" in quick_kubelet.pod_log(namespace, pod.metadata.name)
    rollout = _rollout_status(control_plane, namespace, name)
    assert rollout.returncode != 0 and "successfully rolled out" not in rollout.stdout, rollout.stdout
    apps.delete_namespaced_deployment(name, namespace)


def test_a_container_whose_readiness_probe_passes_rolls_out(
    kube: kubernetes.client.ApiClient, control_plane: ControlPlane, namespace: str, quick_kubelet: ProcessKubelet
) -> None:
    core: Any = kubernetes.client.CoreV1Api(kube)
    apps: Any = kubernetes.client.AppsV1Api(kube)
    name = f"serve-{uuid.uuid4().hex[:6]}"
    port = free_port()
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    apps.create_namespaced_deployment(namespace, _deployment(name, quick_kubelet.node_name, command, port))
    deadline = time.monotonic() + 40
    while not _rolled_out(apps, namespace, name):
        assert time.monotonic() < deadline, "the Deployment never rolled out"
        time.sleep(0.2)
    pod = core.list_namespaced_pod(namespace, label_selector=f"app={name}").items[0]
    assert pod.status.container_statuses[0].ready and pod.status.container_statuses[0].restart_count == 0
    rollout = _rollout_status(control_plane, namespace, name)
    assert rollout.returncode == 0 and "successfully rolled out" in rollout.stdout, rollout.stdout + rollout.stderr
    apps.delete_namespaced_deployment(name, namespace)
    core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=1)
