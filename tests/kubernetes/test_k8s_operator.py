"""End to end on the envtest control plane: the operator + Temporal worker (one loop) drive TrainingRuns.

Legs run the stand-in trainer through the process kubelet; the Temporal dev server is the session's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from controller.kubernetes.main import run_controller
from controller.spec import workflow_id
from relay_testing.process_kubelet import ProcessKubelet
from trainer import volume

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
CONTROLLERS: list[ControllerProcess] = []
STEPS = 30


def run_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": {"source": "demo", "maxRows": 40},
        "training": {"maxSteps": STEPS, "checkpointEverySteps": 5},
        "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
        "terminationGracePeriodSeconds": 5,
        "retries": {"backoffSeconds": 0.5},
    }
    spec.update(overrides)
    return spec


def expected_weights(steps: int) -> str:
    state = "seed"
    for step in range(1, steps + 1):
        state = hashlib.sha256(f"{state}:{step}".encode()).hexdigest()
    return state


class Cluster:
    def __init__(self, kube: kubernetes.client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.custom = kubernetes.client.CustomObjectsApi(kube)
        self.core = kubernetes.client.CoreV1Api(kube)
        self.batch = kubernetes.client.BatchV1Api(kube)

    async def apply(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
        return await asyncio.to_thread(
            self.custom.create_namespaced_custom_object, "relay.dev", "v1alpha1", self.namespace, "trainingruns", body
        )

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(
                self.custom.get_namespaced_custom_object, "relay.dev", "v1alpha1", self.namespace, "trainingruns", name
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def until(self, name: str, check: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        run = await self.get(name)
        while not (run is not None and check(run)):
            assert_controller_alive()
            assert time.monotonic() < deadline, f"timed out; status: {(run or {}).get('status')}"
            await asyncio.sleep(0.2)
            run = await self.get(name)
        return run

    async def delete_and_wait_gone(self, name: str, timeout_s: float, why: str) -> None:
        """Delete the TrainingRun and wait until the finalizer has let it go."""
        await asyncio.to_thread(
            self.custom.delete_namespaced_custom_object, "relay.dev", "v1alpha1", self.namespace, "trainingruns", name
        )
        deadline = time.monotonic() + timeout_s
        while await self.get(name) is not None:
            assert time.monotonic() < deadline, why
            await asyncio.sleep(0.2)

    async def events(self, name: str) -> list[str]:
        items = await asyncio.to_thread(
            self.core.list_namespaced_event, self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [e.reason for e in items.items]

    async def pods(self, job: str) -> list[Any]:
        result = await asyncio.to_thread(
            self.core.list_namespaced_pod, self.namespace, label_selector=f"job-name={job}"
        )
        return list(result.items)


class ControllerProcess:
    """The controller's loop (kopf + Temporal worker) on its own thread and event loop, like its own process:
    kopf owns the loop it runs in (it cancels tasks it did not start), so it must not share the test's."""

    def __init__(self, target_host: str, configuration: Any, volume_root: Path, namespace: str, task_queue: str):
        self.args = (target_host, configuration, volume_root, namespace, task_queue)
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_flag: asyncio.Event | None = None
        self.error: BaseException | None = None

    async def _main(self) -> None:
        from temporalio.client import Client

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

    def start(self) -> ControllerProcess:
        self.thread = threading.Thread(target=self._run, name="relay-controller", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Ask the controller to stop; again, or after its loop has ended, is a no-op."""
        if self.loop is not None and self.stop_flag is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed already: it has stopped (kopf cleans up fast)
                self.loop.call_soon_threadsafe(self.stop_flag.set)
        if self.thread is not None:
            # kopf logs "Operator is stopping" at once but its watch tasks can take ~30 s to end here;
            # the thread is a daemon and this test's namespace and task queue are its own, so do not wait.
            self.thread.join(2)


def assert_controller_alive() -> None:
    for process in CONTROLLERS:
        if process.error is not None:
            raise AssertionError(f"the controller crashed: {process.error!r}")


@pytest.fixture
async def controller(
    temporal_env: Any, control_plane: Any, crd_installed: Any, namespace: str, volume_root: Path, task_queue: str
) -> AsyncIterator[Callable[[], ControllerProcess]]:
    """Starts the controller on this test's namespace; call the fixture's value to start another one."""
    configuration = control_plane.api_client().configuration
    target_host = temporal_env.client.service_client.config.target_host

    def start() -> ControllerProcess:
        process = ControllerProcess(target_host, configuration, volume_root, namespace, task_queue).start()
        CONTROLLERS.append(process)
        return process

    start()
    yield start
    while CONTROLLERS:
        await asyncio.to_thread(CONTROLLERS.pop().stop)


async def first_checkpoint(checkpoints: Path, timeout_s: float, why: Callable[[], str] = lambda: "") -> None:
    """Wait until leg 0 has written a checkpoint (the moment the tests preempt or suspend it)."""
    deadline = time.monotonic() + timeout_s
    while not volume.list_checkpoint_dirs(checkpoints):
        assert_controller_alive()
        assert time.monotonic() < deadline, f"no checkpoint from leg 0 {why()}"
        await asyncio.sleep(0.05)


def phase(value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda run: (run.get("status") or {}).get("phase") == value


async def test_evicted_leg_resumes_from_its_checkpoint_and_the_run_succeeds_with_the_same_weights(
    controller: Any, kube: Any, namespace: str, standin_kubelet: ProcessKubelet, volume_root: Path
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": str(STEPS), "RELAY_STANDIN_STEP_S": "0.2"})
    cluster = Cluster(kube, namespace)
    name = f"evict-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec())
    checkpoints = volume_root / f"runs/{namespace}/{name}/checkpoints"
    await first_checkpoint(checkpoints, timeout_s=90)
    (pod,) = await cluster.pods(f"{name}-leg-0")
    eviction = {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": pod.metadata.name}}
    await asyncio.to_thread(cluster.core.create_namespaced_pod_eviction, pod.metadata.name, namespace, eviction)
    run = await cluster.until(name, phase("Succeeded"), timeout_s=90)
    status = run["status"]
    assert status["preemptions"] == 1 and status["failures"] == 0
    assert [leg["outcome"] for leg in status["legs"]] == ["preempted", "completed"]
    assert status["legs"][1]["startStep"] >= 5
    assert status["legCount"] == 2 and status["progressText"] == "100%"
    final = volume_root / f"runs/{namespace}/{name}/final"
    volume.read_checkpoint(final, verify_hashes=True)
    assert (final / "weights.txt").read_text() == expected_weights(STEPS)
    legs = sorted(p.split("/")[1].rsplit("-", 1)[0] for p in standin_kubelet.started if f"/{name}-" in p)
    assert legs == [f"{name}-leg-0", f"{name}-leg-1"], "one pod per leg, no replacement pod ran"
    reasons = await cluster.events(name)
    assert {"LegStarted", "Preempted"} <= set(reasons), reasons
    # Its claim is Bound: no VolumeReady condition ever, nor a claim Warning (the harness once left it Lost).
    assert volume_ready(run) is None
    assert not {"ClaimPending", "ClaimLost", "ClaimNotFound"} & set(reasons), reasons


async def test_missing_claim_fails_the_run_naming_the_field_and_starts_no_job(
    controller: Any, kube: Any, namespace: str, temporal_env: Any
) -> None:
    cluster = Cluster(kube, namespace)
    name = f"noclaim-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec(storage={"claimName": "no-such-claim"}))
    run = await cluster.until(name, phase("Failed"))
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "Invalid"
    assert "spec.storage.claimName" in failed["message"] and "no-such-claim" in failed["message"]
    jobs = await asyncio.to_thread(cluster.batch.list_namespaced_job, namespace)
    assert jobs.items == []
    with pytest.raises(Exception, match="not found"):
        await temporal_env.client.get_workflow_handle(workflow_id(namespace, name)).describe()


def volume_ready(run: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in (run.get("status") or {}).get("conditions") or [] if c["type"] == "VolumeReady"), None)


async def test_a_pending_claim_is_named_with_its_fix_until_bound_then_the_run_succeeds(
    controller: Any, kube: Any, namespace: str, standin_kubelet: ProcessKubelet
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": "10", "RELAY_STANDIN_STEP_S": "0.05"})
    cluster = Cluster(kube, namespace)
    claim, storage_class = "relay-pending", "relay-no-provisioner"
    # A class that no provisioner serves: the claim stays Pending, as the chart's default does on most clusters.
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    await asyncio.to_thread(cluster.core.create_namespaced_persistent_volume_claim, namespace, pvc)
    name = f"pending-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec(storage={"claimName": claim}, training={"maxSteps": 10}))
    run = await cluster.until(name, lambda r: volume_ready(r) is not None, timeout_s=60)
    condition = volume_ready(run)
    assert condition is not None and condition["status"] == "False" and condition["reason"] == "ClaimPending"
    assert condition["message"] == (
        f"claim {claim} is Pending (StorageClass {storage_class}): "
        "set persistence.storageClassName to an RWX class, or persistence.existingClaim"
    )
    assert "ClaimPending" in await cluster.events(name)
    # What a provisioner does: a volume pre-bound to the claim; the PV controller binds it within its sync.
    pv_name = f"pv-{namespace}-{claim}"
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": f"/tmp/{pv_name}"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    await asyncio.to_thread(cluster.core.create_persistent_volume, pv)
    run = await cluster.until(name, phase("Succeeded"), timeout_s=150)
    assert volume_ready(run) is None
    assert "ClaimBound" in await cluster.events(name)


async def test_schema_invalid_run_is_refused_by_the_api_server_naming_the_fields(
    kube: Any, crd_installed: Any, namespace: str
) -> None:
    cluster = Cluster(kube, namespace)
    bad = run_spec(resources={"cpu": "lots", "gpus": -1}, training={"learningRate": 0})
    with pytest.raises(kubernetes.client.ApiException) as raised:
        await cluster.apply("bad", bad)
    assert raised.value.status == 422
    for field in ("spec.resources.cpu", "spec.resources.gpus", "spec.training.learningRate"):
        assert field in raised.value.body


async def test_delete_cancels_the_workflow_and_removes_the_jobs(
    controller: Any, kube: Any, namespace: str, standin_kubelet: ProcessKubelet, temporal_env: Any
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": "100000", "RELAY_STANDIN_STEP_S": "0.1"})
    cluster = Cluster(kube, namespace)
    name = f"delete-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec())
    await cluster.until(name, phase("Running"), timeout_s=90)
    await cluster.until(name, lambda r: bool(r.get("status", {}).get("legs")), timeout_s=30)
    deadline = time.monotonic() + 60  # for the run and its Jobs to be gone
    await cluster.delete_and_wait_gone(name, 60, "TrainingRun not removed (finalizer stuck?)")
    description = await temporal_env.client.get_workflow_handle(workflow_id(namespace, name)).describe()
    assert description.status.name in ("CANCELED", "COMPLETED", "TERMINATED")
    while (await asyncio.to_thread(cluster.batch.list_namespaced_job, namespace)).items:
        assert time.monotonic() < deadline, "leg Jobs not removed"
        await asyncio.sleep(0.2)
    assert f"{namespace}/" not in " ".join(standin_kubelet.running())


async def test_suspend_pauses_the_run_without_a_pod_and_resume_finishes_it(
    controller: Any, kube: Any, namespace: str, standin_kubelet: ProcessKubelet, volume_root: Path
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": str(STEPS), "RELAY_STANDIN_STEP_S": "0.2"})
    cluster = Cluster(kube, namespace)
    name = f"suspend-{uuid.uuid4().hex[:6]}"
    await cluster.apply(name, run_spec())
    checkpoints = volume_root / f"runs/{namespace}/{name}/checkpoints"
    await first_checkpoint(checkpoints, timeout_s=90)

    async def set_suspend(value: bool) -> None:
        await asyncio.to_thread(
            cluster.custom.patch_namespaced_custom_object,
            "relay.dev", "v1alpha1", namespace, "trainingruns", name, {"spec": {"suspend": value}},
        )  # fmt: skip

    await set_suspend(True)
    paused = await cluster.until(name, phase("Paused"), timeout_s=60)
    assert any(c["type"] == "Suspended" and c["status"] == "True" for c in paused["status"]["conditions"])
    assert not [p for p in standin_kubelet.running() if p.startswith(f"{namespace}/{name}-")]
    await set_suspend(False)
    run = await cluster.until(name, phase("Succeeded"), timeout_s=90)
    assert run["status"]["preemptions"] == 0 and run["status"]["failures"] == 0
    final = volume_root / f"runs/{namespace}/{name}/final"
    assert (final / "weights.txt").read_text() == expected_weights(STEPS)


def controller_subprocess(control_plane: Any, temporal_env: Any, volume_root: Path, namespace: str, task_queue: str):
    """`relay controller` as its own OS process (so that it can be SIGKILLed), through main()."""
    target = temporal_env.client.service_client.config.target_host
    argv = [
        sys.executable, "-c", "import sys; from controller.kubernetes.main import main; sys.exit(main(sys.argv[1:]))",
        "--temporal-address", target, "--watch-namespace", namespace, "--volume-root", str(volume_root),
        "--task-queue", task_queue, "--kubeconfig", str(control_plane.kubeconfig),
        "--health-port", "0", "--metrics-port", "0",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_controller_killed_mid_leg_is_replaced_and_the_new_one_adopts_the_running_job(
    control_plane: Any,
    temporal_env: Any,
    crd_installed: Any,
    kube: Any,
    namespace: str,
    standin_kubelet: ProcessKubelet,
    volume_root: Path,
    task_queue: str,
) -> None:
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": "100", "RELAY_STANDIN_STEP_S": "0.2"})
    cluster = Cluster(kube, namespace)
    name = f"adopt-{uuid.uuid4().hex[:6]}"
    first = controller_subprocess(control_plane, temporal_env, volume_root, namespace, task_queue)
    second = None
    try:
        await cluster.apply(name, run_spec(training={"maxSteps": 100, "checkpointEverySteps": 5}))
        await cluster.until(name, lambda r: bool((r.get("status") or {}).get("legs")), timeout_s=90)
        first.kill()  # SIGKILL mid-leg: no shutdown, no cleanup
        first.wait()
        second = controller_subprocess(control_plane, temporal_env, volume_root, namespace, task_queue)
        run = await cluster.until(name, phase("Succeeded"), timeout_s=150)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert run["status"]["preemptions"] == 0 and run["status"]["legCount"] == 1
    pods = [p for p in standin_kubelet.started if p.startswith(f"{namespace}/{name}-")]
    assert len(pods) == 1, f"the restarted controller started a second pod: {pods}"
