"""Fixtures of the Kubernetes tier: one envtest control plane per session, the process kubelet, the CRD.

Tests marked `cluster` need the control plane; when its binaries are absent they are skipped, and the run says
so loudly (each skip's reason, and a red section of the terminal summary), so a green run never hides them.
Not as a warning: with warnings as errors, a warning at collection stops the whole run (INTERNALERROR, exit 3).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from controller.leg_model import LegSpec
from controller.spec import TrainingRunSpec
from relay_testing.control_plane import ControlPlane, assets_dir, missing_binaries
from relay_testing.objects import install_crd, make_namespace
from relay_testing.process_kubelet import ProcessKubelet

_MISSING = missing_binaries()
_SKIP_REASON = (
    f"envtest binaries missing in {assets_dir()} ({', '.join(_MISSING)}): the Kubernetes cluster tier was SKIPPED; "
    "run `make envtest` or set KUBEBUILDER_ASSETS"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _MISSING:
        return
    for item in items:
        if item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _MISSING:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _SKIP_REASON in str(r.longrepr)]
    terminalreporter.write_sep("!", "KUBERNETES CLUSTER TIER SKIPPED", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} cluster tests skipped: {_SKIP_REASON}", red=True)


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
def crd_installed(kube: kubernetes.client.ApiClient) -> dict[str, Any]:
    """The generated TrainingRun CRD, applied and Established."""
    return install_crd(kube)


@pytest.fixture(scope="session")
def volume_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local folder that plays the shared PVC for every pod and the controller."""
    return tmp_path_factory.mktemp("relay-volume")


@pytest.fixture(scope="session")
def kubelet(
    control_plane: ControlPlane, volume_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessKubelet]:
    harness = ProcessKubelet(control_plane.api_client(), volume_root, tmp_path_factory.mktemp("kubelet"))
    harness.start()
    yield harness
    harness.stop()


@pytest.fixture
def standin_kubelet(kubelet: ProcessKubelet) -> Iterator[ProcessKubelet]:
    """The kubelet, running the light stand-in trainer instead of `python -m trainer`."""
    kubelet.module_map = {"trainer": "relay_testing.standin_trainer"}
    yield kubelet
    kubelet.module_map = {}


def make_training_run(kube: kubernetes.client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> str:
    """Create a TrainingRun object (the operator need not run); return its uid."""
    body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
    created = kubernetes.client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingruns", body
    )
    return str(created["metadata"]["uid"])


def leg_of(
    namespace: str, name: str, spec: dict[str, Any], *, owner_uid: str, leg: int = 0, env: dict[str, str] | None = None
) -> LegSpec:
    """Leg `leg` of TrainingRun `namespace/name` whose uid is `owner_uid` (the backend checks it against the object)."""
    return LegSpec(
        namespace=namespace,
        name=name,
        leg=leg,
        run_path=f"runs/{namespace}/{name}",
        snapshot_path=f"snapshots/{'ab' * 32}",
        spec=TrainingRunSpec.model_validate(spec),
        owner_uid=owner_uid,
        extra_env=env or {},
    )


@pytest.fixture
def namespace(kube: kubernetes.client.ApiClient) -> str:
    """A fresh namespace with a bound `relay-shared` claim and its default ServiceAccount."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    make_namespace(kube, name)
    return name
