"""`helm install` of the chart onto the real API server, and the controller run from its Deployment as a pod.

The Helm library installs the chart (CRD, ServiceAccount, Role/RoleBinding, claim, Deployment, Service)
exactly as `helm install` would. The controller pod the ReplicaSet creates is run by a process kubelet
that also does what a real kubelet does for a pod with a ServiceAccount: the token Secret's files appear
at /var/run/secrets/kubernetes.io/serviceaccount (bind-mounted in a private mount namespace of that
process only) and KUBERNETES_SERVICE_HOST/PORT point at the API server. No kubeconfig reaches it, so the
chart's RBAC is all it has. A TrainingRun applied afterwards must run to Succeeded: this proves the chart's
wiring (flags, probes, claim, RBAC), not just its YAML.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException
from temporalio.testing import WorkflowEnvironment

from relay_testing.control_plane import ControlPlane, free_port
from relay_testing.process_kubelet import LocalPod, ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "relay"
BIN_DIR = Path(sys.executable).parent
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NODE = "relay-helm-node"
RELEASE = "relay"
# Inside the container process's own mount namespace: a fresh /run (the target of /var/run), the token
# folder bound onto the path every Kubernetes client reads, and no kubeconfig. "$0" is the token folder.
POD_SANDBOX = """set -e
unset KUBECONFIG
run_dir=$(readlink -f /var/run)
mount -t tmpfs -o size=1m relay-pod-run "$run_dir"
mkdir -p "$run_dir/secrets/kubernetes.io/serviceaccount"
mount --bind "$0" "$run_dir/secrets/kubernetes.io/serviceaccount"
exec "$@"
"""


def _unshare() -> list[str]:
    command = ["unshare", "--mount", "--propagation", "private"]
    return command if os.geteuid() == 0 else [*command, "--map-root-user"]


class PodKubelet(ProcessKubelet):
    """The process kubelet, plus the ServiceAccount token mount and service environment a real kubelet gives."""

    def __init__(self, plane: ControlPlane, volume_root: Path, work_root: Path) -> None:
        super().__init__(plane.api_client(), volume_root, work_root, node_name=NODE, gpus=0)
        self.plane = plane

    def _run(self, pod: LocalPod, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        container = obj["spec"]["containers"][0]
        mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == SERVICE_ACCOUNT_DIR), None)
        if mount is not None:
            volume = next(v for v in obj["spec"]["volumes"] if v["name"] == mount["name"])
            local = pod.workdir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:  # the token Secret (1.20)
                secret = self.core.read_namespaced_secret(volume["secret"]["secretName"], pod.namespace)
                for key, value in (secret.data or {}).items():
                    (local / key).write_bytes(base64.b64decode(value))
            else:  # a projected kube-api-access volume (1.21+; no token Secret from 1.24): a TokenRequest
                account = obj["spec"].get("serviceAccountName") or "default"
                request: Any = {"spec": {"expirationSeconds": 3600}}
                issued = self.core.create_namespaced_service_account_token(account, pod.namespace, request)
                (local / "token").write_text(issued.status.token, encoding="utf-8")
                (local / "namespace").write_text(pod.namespace, encoding="utf-8")
            if not (local / "ca.crt").exists():  # the controller-manager here runs without --root-ca-file
                shutil.copyfile(self.plane.ca_cert, local / "ca.crt")
            command = list(container["command"])
            if command and shutil.which(command[0], path=str(BIN_DIR)):
                command[0] = str(BIN_DIR / command[0])  # the image's PATH: console scripts of this venv
            relative = os.path.relpath(local, pod.workdir)  # relative: the harness rewrites paths under /tmp
            container["command"] = [*_unshare(), "sh", "-c", POD_SANDBOX, relative, *command]
            host, port = self.plane.server.removeprefix("https://").rsplit(":", 1)
            container["env"] = [
                *container.get("env", []),
                {"name": "KUBERNETES_SERVICE_HOST", "value": host},
                {"name": "KUBERNETES_SERVICE_PORT", "value": port},
            ]
        super()._run(pod, obj)


@pytest.fixture
def pod_kubelet(control_plane: ControlPlane, volume_root: Path, tmp_path: Path) -> Iterator[PodKubelet]:
    probe = subprocess.run([*_unshare(), "sh", "-c", "mount -t tmpfs probe /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(
            f"running a pod with its token mount needs mount namespaces (root or user namespaces): {probe.stderr}"
        )
    harness = PodKubelet(control_plane, volume_root, tmp_path / "kubelet")
    harness.start()
    yield harness
    harness.stop()
    with_suppressed_404(lambda: harness.core.delete_node(NODE))  # later tests must not schedule onto it


def with_suppressed_404(call: Any) -> None:
    try:
        call()
    except ApiException as exc:
        if exc.status != 404:
            raise


def pre_bound_volume(core: kubernetes.client.CoreV1Api, namespace: str, claim: str, path: Path) -> str:
    """What an administrator does without a provisioner: a PersistentVolume reserved for the chart's claim."""
    name = f"pv-{namespace}"
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(path)},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    return name


def wait_until(what: str, check: Any, timeout_s: float, on_timeout: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{on_timeout()}")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def small_training_run(namespace: str) -> dict[str, Any]:
    """The tiny CPU example, cut to a few seconds of training."""
    document = yaml.safe_load((REPO / "manifests" / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    document["metadata"] = {"name": "tiny-cpu", "namespace": namespace}
    document["spec"]["dataset"]["maxRows"] = 160
    document["spec"]["training"].update(epochs=1, batchSize=8, checkpointEverySteps=5, logEverySteps=5)
    return document


async def test_helm_install_then_a_training_run_succeeds(
    control_plane: ControlPlane,
    kube: kubernetes.client.ApiClient,
    volume_root: Path,
    temporal_env: WorkflowEnvironment,
    pod_kubelet: PodKubelet,
) -> None:
    import anyio

    temporal_address = temporal_env.client.service_client.config.target_host
    await anyio.to_thread.run_sync(
        install_and_train, control_plane, kube, volume_root, temporal_address, pod_kubelet, abandon_on_cancel=True
    )


def install_and_train(
    plane: ControlPlane, kube: kubernetes.client.ApiClient, volume_root: Path, temporal_address: str, pods: PodKubelet
) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    custom = kubernetes.client.CustomObjectsApi(kube)
    namespace = f"helm-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    volume = pre_bound_volume(core, namespace, "relay-shared", volume_root)
    health_port, metrics_port = free_port(), free_port()
    values = {
        "temporal": {"address": temporal_address},
        "controller": {
            "healthPort": health_port,
            "metricsPort": metrics_port,
            "nodeSelector": {"kubernetes.io/hostname": NODE},
        },
        "persistence": {"size": "1Gi"},
    }

    def controller_log() -> str:
        controller_pods = [p for p in pods.pods.values() if p.namespace == namespace and p.name.startswith(RELEASE)]
        return "\n".join(f"--- {p.name}\n" + pods.pod_log(namespace, p.name)[-6000:] for p in controller_pods)

    config = helm.Config(
        kube_apiserver=plane.server, kube_token=plane.token, kube_ca_file=str(plane.ca_cert), namespace=namespace
    )
    try:
        release = config.install(CHART, RELEASE, values, namespace=namespace, timeout=60)
        assert release["status"] == "deployed"
        assert "kubectl -n " + namespace + " get trainingruns" in release["notes"]

        # The kubelet's readiness probe: /readyz turns 200 once the controller reached the API server and Temporal.
        wait_until(
            "the controller pod's /readyz", lambda: http_get(health_port, "/readyz")[0] == 200, 90, controller_log
        )
        assert http_get(health_port, "/healthz")[0] == 200

        custom.create_namespaced_custom_object(
            "relay.dev", "v1alpha1", namespace, "trainingruns", small_training_run(namespace)
        )

        def finished() -> dict[str, Any] | None:
            run = custom.get_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns", "tiny-cpu")
            status = run.get("status") or {}
            if status.get("phase") == "Failed":
                pytest.fail(f"the run failed: {status.get('message')}\n{controller_log()}")
            return status if status.get("phase") == "Succeeded" else None

        status = wait_until("the TrainingRun to succeed", finished, 150, controller_log)
        assert status["step"] == status["totalSteps"] > 0
        final = volume_root / "runs" / namespace / "tiny-cpu" / "final" / "manifest.json"
        assert final.is_file(), f"no final model at {final}"
        metrics = http_get(metrics_port, "/metrics")[1]
        assert f'relay_legs_started_total{{namespace="{namespace}"}} 1.0' in metrics
        assert f'relay_trainingruns{{namespace="{namespace}",phase="Succeeded"}} 1.0' in metrics

        # The pod's token is the release's ServiceAccount, confined to the release namespace by its Role.
        account = core.read_namespaced_service_account(RELEASE, namespace)
        secret = core.read_namespaced_secret(account.secrets[0].name, namespace)
        as_controller = plane.api_client(base64.b64decode(secret.data["token"]).decode())
        with pytest.raises(ApiException) as denied:
            kubernetes.client.BatchV1Api(as_controller).list_namespaced_job("default")
        assert denied.value.status == 403
        assert kubernetes.client.BatchV1Api(as_controller).list_namespaced_job(namespace).items is not None

        config.uninstall(RELEASE)
        wait_until(
            "the controller pod to stop",
            lambda: not [p for p in pods.running() if p.startswith(f"{namespace}/{RELEASE}-")],
            60,
        )
        claim = core.read_namespaced_persistent_volume_claim("relay-shared", namespace)
        assert claim.metadata.deletion_timestamp is None, "helm uninstall must keep the checkpoints' claim"
    finally:
        config.close()
        with_suppressed_404(lambda: core.delete_namespace(namespace))
        with_suppressed_404(lambda: core.delete_persistent_volume(volume))
