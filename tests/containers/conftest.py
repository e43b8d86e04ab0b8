"""Fixtures of the container tier: pods run as `docker run` of the images `make images` builds (the container
kubelet), on one envtest control plane per session, with the controller in-process as in the Kubernetes tier.

Tests marked `cluster` here need the envtest binaries, a Docker engine and both images; when one is missing they
are skipped, and the run says so loudly (each skip's reason, and a red section of the terminal summary), so a
green run never hides them. Not as a warning: with warnings as errors, a warning at collection stops the run.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from controller.spec import TrainingRunSpec
from relay_testing.container_kubelet import ContainerKubelet, engine_problem, image_present
from relay_testing.control_plane import ControlPlane, assets_dir, missing_binaries
from relay_testing.objects import install_crd, make_namespace

REPO = Path(__file__).resolve().parents[2]
TRAINER_IMAGE = str(TrainingRunSpec.model_fields["image"].default)
_CHART = yaml.safe_load((REPO / "helm" / "relay" / "Chart.yaml").read_text(encoding="utf-8"))
_VALUES = yaml.safe_load((REPO / "helm" / "relay" / "values.yaml").read_text(encoding="utf-8"))
CONTROLLER_IMAGE = f"{_VALUES['image']['repository']}:{_VALUES['image']['tag'] or _CHART['appVersion']}"


def _skip_reason() -> str:
    missing = missing_binaries()
    if missing:
        return f"envtest binaries missing in {assets_dir()} ({', '.join(missing)}): run `make envtest`"
    problem = engine_problem()
    if problem:
        return f"{problem}: start one (../shared/containers/docker-up.sh on these machines)"
    absent = [image for image in (TRAINER_IMAGE, CONTROLLER_IMAGE) if not image_present(image)]
    if absent:
        return f"images not built ({', '.join(absent)}): run `make images`"
    return ""


_REASON = _skip_reason()
_SKIP_REASON = f"{_REASON}: the CONTAINER tier was SKIPPED" if _REASON else ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _REASON:
        return
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("cluster") and here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=_SKIP_REASON))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _REASON:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _SKIP_REASON in str(r.longrepr)]
    if not skipped:
        return
    terminalreporter.write_sep("!", "CONTAINER TIER SKIPPED", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} container tests skipped: {_SKIP_REASON}", red=True)


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
    client = control_plane.api_client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def crd_installed(kube: kubernetes.client.ApiClient) -> dict[str, Any]:
    return install_crd(kube)


@pytest.fixture(scope="session")
def volume_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The claim's folder, made by root as a fresh volume is: the kubelet applies the pods' fsGroup to it."""
    root = tmp_path_factory.mktemp("relay-volume")
    root.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def container_kubelet(
    control_plane: ControlPlane, volume_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerKubelet]:
    harness = ContainerKubelet(
        control_plane.api_client(), volume_root, tmp_path_factory.mktemp("kubelet"), node_name="relay-container-node"
    )
    harness.start()
    yield harness
    harness.stop()


@pytest.fixture
def namespace(kube: kubernetes.client.ApiClient) -> str:
    """A fresh namespace with a bound `relay-shared` claim and its default ServiceAccount."""
    name = f"c-{uuid.uuid4().hex[:8]}"
    make_namespace(kube, name)
    return name


class ControllerThread:
    """The controller (kopf + Temporal worker) on its own thread and event loop, watching one namespace."""

    def __init__(self, target_host: str, configuration: Any, volume_root: Path, namespace: str, task_queue: str):
        self.args = (target_host, configuration, volume_root, namespace, task_queue)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_flag: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="relay-controller", daemon=True)

    async def _main(self) -> None:
        from temporalio.client import Client

        from controller.kubernetes.main import run_controller
        from controller.worker import DATA_CONVERTER

        target_host, configuration, volume_root, namespace, task_queue = self.args
        self.loop, self.stop_flag = asyncio.get_running_loop(), asyncio.Event()
        temporal = await Client.connect(target_host, data_converter=DATA_CONVERTER)
        await run_controller(
            temporal=temporal,
            configuration=configuration,
            volume_root=volume_root,
            namespaces=[namespace],
            task_queue=task_queue,
            stop=self.stop_flag,
        )

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test
            self.error = exc

    def stop(self) -> None:
        if self.loop is not None and self.stop_flag is not None:
            self.loop.call_soon_threadsafe(self.stop_flag.set)
        # kopf's watch tasks can take ~30 s to end (tests/kubernetes/test_k8s_operator.py); the namespace and
        # task queue are this test's own, so do not wait for them.
        self.thread.join(2)


@pytest.fixture
def controller(
    temporal_env: Any,
    control_plane: ControlPlane,
    crd_installed: Any,
    namespace: str,
    volume_root: Path,
    task_queue: str,
    container_kubelet: ContainerKubelet,
) -> Iterator[ControllerThread]:
    target_host = temporal_env.client.service_client.config.target_host
    process = ControllerThread(
        target_host, control_plane.api_client().configuration, volume_root, namespace, task_queue
    )
    process.thread.start()
    yield process
    process.stop()
