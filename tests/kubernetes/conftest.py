"""Fixtures of the Kubernetes tier: one envtest control plane per session, the process kubelet, the CRD.

Tests marked `cluster` need the control plane; when its binaries are absent they are skipped, and the
run says so loudly (a warning and a line in the terminal summary), so a green run never hides them.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from controller.crd import crd_manifest
from controller.envtest.control_plane import ControlPlane, assets_dir, missing_binaries
from controller.envtest.process_kubelet import ProcessKubelet

_MISSING = missing_binaries()
_SKIP_REASON = (
    f"envtest binaries missing in {assets_dir()} ({', '.join(_MISSING)}): the Kubernetes cluster tier was SKIPPED; "
    "run `make envtest` or set KUBEBUILDER_ASSETS"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _MISSING:
        return
    skipped = [item for item in items if item.get_closest_marker("cluster")]
    for item in skipped:
        item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))
    if skipped:
        warnings.warn(_SKIP_REASON, pytest.PytestWarning, stacklevel=1)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _MISSING:
        terminalreporter.write_sep("!", "KUBERNETES CLUSTER TIER SKIPPED", red=True, bold=True)
        terminalreporter.write_line(_SKIP_REASON, red=True)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("envtest"))
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    """An admin client of the official library."""
    client = control_plane.api_client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def crd_installed(kube: kubernetes.client.ApiClient) -> dict[str, object]:
    """The generated TrainingRun CRD, applied and Established."""
    import time

    api = kubernetes.client.ApiextensionsV1Api(kube)
    manifest = crd_manifest()
    try:
        api.create_custom_resource_definition(manifest)
    except ApiException as exc:  # another test (the Helm chart's) installed it first: make it ours
        if exc.status != 409:
            raise
        current = api.read_custom_resource_definition(manifest["metadata"]["name"])  # type: ignore[index]
        manifest["metadata"]["resourceVersion"] = current.metadata.resource_version  # type: ignore[index]
        api.replace_custom_resource_definition(manifest["metadata"]["name"], manifest)  # type: ignore[index]
        del manifest["metadata"]["resourceVersion"]  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = api.read_custom_resource_definition(manifest["metadata"]["name"])  # type: ignore[index]
        if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
            return manifest
        time.sleep(0.1)
    raise TimeoutError("TrainingRun CRD not Established")


@pytest.fixture(scope="session")
def volume_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local folder that plays the shared PVC for every pod and the controller."""
    return tmp_path_factory.mktemp("relay-volume")


@pytest.fixture(scope="session")
def kubelet(
    control_plane: ControlPlane, volume_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessKubelet]:
    here = str(Path(__file__).resolve().parent)
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    harness = ProcessKubelet(
        control_plane.api_client(),
        volume_root,
        tmp_path_factory.mktemp("kubelet"),
        extra_env={"PYTHONPATH": pythonpath},
    )
    harness.start()
    yield harness
    harness.stop()


@pytest.fixture
def standin_kubelet(kubelet: ProcessKubelet) -> Iterator[ProcessKubelet]:
    """The kubelet, running the light stand-in trainer instead of `python -m trainer`."""
    kubelet.module_map = {"trainer": "standin_trainer"}
    yield kubelet
    kubelet.module_map = {}


def make_training_run(kube: kubernetes.client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> str:
    """Create a TrainingRun object (the operator need not run); return its uid."""
    body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
    created = kubernetes.client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingruns", body
    )
    return str(created["metadata"]["uid"])


def create_bound_claim(kube: kubernetes.client.ApiClient, namespace: str, claim: str = "relay-shared") -> None:
    """A PVC bound to a PV (no provisioner here), so the scheduler places pods that mount it."""
    core = kubernetes.client.CoreV1Api(kube)
    pv_name = f"pv-{namespace}-{claim}"[:63]
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": f"/tmp/{pv_name}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            # Pre-bound, as the PV controller would leave it (its periodic sync takes up to 15 s here).
            "metadata": {"name": claim, "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )


@pytest.fixture
def namespace(kube: kubernetes.client.ApiClient) -> Iterator[str]:
    """A fresh namespace with a bound `relay-shared` claim and its default ServiceAccount."""
    import time

    core = kubernetes.client.CoreV1Api(kube)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    create_bound_claim(kube, name)
    # Pods are refused until the ServiceAccount controller has made "default".
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException:
            time.sleep(0.1)
    yield name
