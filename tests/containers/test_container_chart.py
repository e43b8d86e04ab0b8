"""The chart, rendered with its defaults, runs the controller from the controller image; its legs and a predict
Job run from the trainer image.

`helm install` (the Helm library) onto the envtest API server; the container kubelet runs the Deployment's pod as
`docker run` of the chart's default image, with the chart's securityContext (UID 1000, read-only root, no
capabilities), its ServiceAccount token files and the claim (a root-made folder, as a fresh volume). Nothing but
the chart's RBAC reaches the controller. Only what this machine needs is set: the Temporal address, the probe
and metrics ports (the pod shares the host's network), the node.
"""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

from relay_testing.container_kubelet import ContainerKubelet
from relay_testing.control_plane import ControlPlane, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "relay"
RELEASE = "relay"


def wait_until(what: str, check: Any, timeout_s: float, why: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{why()}")


def http_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def ignore_404(call: Any) -> None:
    try:
        call()
    except ApiException as exc:
        if exc.status != 404:
            raise


def small_training_run(namespace: str) -> dict[str, Any]:
    """The tiny CPU example (the trainer image it names is what `make images` built), cut to a few seconds."""
    document = yaml.safe_load((REPO / "manifests" / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    document["metadata"] = {"name": "tiny-cpu", "namespace": namespace}
    document["spec"]["dataset"]["maxRows"] = 160
    document["spec"]["training"].update(epochs=1, batchSize=8, checkpointEverySteps=5, logEverySteps=5)
    return document


def test_the_chart_runs_the_controller_image_and_a_run_of_the_trainer_image_succeeds(
    control_plane: ControlPlane,
    kube: kubernetes.client.ApiClient,
    crd_installed: Any,
    temporal_env: Any,
    container_kubelet: ContainerKubelet,
    volume_root: Path,
) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    custom = kubernetes.client.CustomObjectsApi(kube)
    namespace = f"chart-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    claim_folder = volume_root / "claims" / namespace
    claim_folder.mkdir(parents=True)
    container_kubelet.volume_for_namespace[namespace] = claim_folder
    volume = f"pv-{namespace}"
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(claim_folder)},
                "claimRef": {"namespace": namespace, "name": "relay-shared"},
            },
        }
    )
    health_port, metrics_port = free_port(), free_port()
    values = {
        "temporal": {"address": temporal_env.client.service_client.config.target_host},
        "controller": {
            "healthPort": health_port,
            "metricsPort": metrics_port,
            "nodeSelector": {"kubernetes.io/hostname": container_kubelet.node_name},
        },
        "persistence": {"size": "1Gi"},
    }

    def pod_logs() -> str:
        pods = [p for p in list(container_kubelet.pods.values()) if p.namespace == namespace]
        return "\n".join(f"--- {p.name}\n{container_kubelet.pod_log(namespace, p.name)[-4000:]}" for p in pods)

    config = helm.Config(
        kube_apiserver=control_plane.server,
        kube_token=control_plane.token,
        kube_ca_file=str(control_plane.ca_cert),
        namespace=namespace,
    )
    try:
        release = config.install(CHART, RELEASE, values, namespace=namespace, timeout=60)
        assert release["status"] == "deployed"
        wait_until("the controller container's /readyz", lambda: http_get(health_port, "/readyz") == 200, 120, pod_logs)
        chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
        controllers = [key for key in container_kubelet.docker_args if key.startswith(f"{namespace}/{RELEASE}-")]
        assert controllers, "no controller pod ran"
        for key in controllers:  # every replica (leader or standby) runs the chart's default image, restricted
            launched = container_kubelet.docker_args[key]
            assert f"ghcr.io/relay-ml/relay-controller:{chart['appVersion']}" in launched
            assert "--read-only" in launched and "1000:1000" in launched

        custom.create_namespaced_custom_object(
            "relay.dev", "v1alpha1", namespace, "trainingruns", small_training_run(namespace)
        )

        def finished() -> dict[str, Any] | None:
            run = custom.get_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns", "tiny-cpu")
            status = run.get("status") or {}
            if status.get("phase") == "Failed":
                pytest.fail(f"the run failed: {status.get('message')}\n{pod_logs()}")
            return status if status.get("phase") == "Succeeded" else None

        status = wait_until("the TrainingRun to succeed", finished, 180, pod_logs)
        assert status["step"] == status["totalSteps"] > 0
        final = claim_folder / "runs" / namespace / "tiny-cpu" / "final" / "manifest.json"
        assert final.is_file(), f"no final model at {final}"
        assert final.stat().st_uid == 1000, "written by the trainer container's UID"
    finally:
        with contextlib.suppress(helm.errors.HelmNotFoundError):  # the install itself failed
            config.uninstall(RELEASE)
        config.close()
        ignore_404(lambda: core.delete_namespace(namespace))
        ignore_404(lambda: core.delete_persistent_volume(volume))
