"""Attack tier, issue 11 item 1: a deleted controller must not leave TrainingRuns undeletable (cluster tier).

Finding: `helm uninstall` with a live run left kopf's finalizer on the TrainingRun, so deleting the run, and
its namespace, hung for ever. The controller now takes its finalizer off every run it handled as it stops;
the run's Jobs are owned by it, so the garbage collector removes them without the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.service import RPCError
from test_k8s_operator import CONTROLLERS, Cluster, ControllerProcess, phase, run_spec

from controller.spec import workflow_id
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
FINALIZER = "relay.dev/finalizer"  # controller.kubernetes.main.kopf_settings


@pytest.fixture
async def start_controller(
    temporal_env: Any, control_plane: Any, crd_installed: Any, namespace: str, volume_root: Path, task_queue: str
) -> AsyncIterator[Callable[[], ControllerProcess]]:
    configuration = control_plane.api_client().configuration
    target_host = temporal_env.client.service_client.config.target_host
    started: list[ControllerProcess] = []

    def start() -> ControllerProcess:
        process = ControllerProcess(target_host, configuration, volume_root, namespace, task_queue).start()
        started.append(process)
        CONTROLLERS.append(process)  # its crash fails Cluster.until
        return process

    yield start
    for process in started:
        if process in CONTROLLERS:
            CONTROLLERS.remove(process)
        await asyncio.to_thread(process.stop)


async def test_a_run_is_deletable_once_the_controller_is_gone(
    start_controller: Any, kube: Any, namespace: str, standin_kubelet: ProcessKubelet, temporal_env: Any
) -> None:
    """Stop the controller mid-leg (what helm uninstall does), then delete the run: gone, and its Jobs too."""
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": "100000", "RELAY_STANDIN_STEP_S": "0.1"})
    cluster = Cluster(kube, namespace)
    name = f"orphan-{uuid.uuid4().hex[:6]}"
    controller = start_controller()
    await cluster.apply(name, run_spec())
    await cluster.until(name, phase("Running"), timeout_s=90)
    run = await cluster.until(name, lambda r: bool(r.get("status", {}).get("legs")), timeout_s=30)
    assert FINALIZER in run["metadata"]["finalizers"]

    CONTROLLERS.remove(controller)
    await asyncio.to_thread(controller.stop)
    # kopf ends its watches, then runs the cleanup handler (tens of seconds here: see ControllerProcess.stop).
    deadline = time.monotonic() + 90
    while FINALIZER in ((await cluster.get(name)) or {}).get("metadata", {}).get("finalizers", []):
        assert time.monotonic() < deadline, "the stopped controller left its finalizer on the TrainingRun"
        await asyncio.sleep(0.5)

    await cluster.delete_and_wait_gone(name, 30, "TrainingRun not removed without a controller")
    deadline = time.monotonic() + 60
    while (await asyncio.to_thread(cluster.batch.list_namespaced_job, namespace)).items:
        assert time.monotonic() < deadline, "the garbage collector did not remove the run's leg Jobs"
        await asyncio.sleep(0.5)
    # The workflow fails at its next step once it runs again (RunIdentityMismatch: not found), or is ended here.
    handle = temporal_env.client.get_workflow_handle(workflow_id(namespace, name))
    with contextlib.suppress(RPCError):  # already failed by itself
        await handle.terminate(reason="test over")
    assert (await handle.describe()).status.name in ("FAILED", "TERMINATED")
