"""Attack tier, issue 11 item 1: workflow ids that collide (cluster tier).

Finding: `team/a-x` and `team-a/x` both became workflow `trainingrun-team-a-x`: the second object adopted the
first one's workflow, and deleting `team-a/x` cancelled `team/a-x`. One controller watches both namespaces here;
each object gets its own workflow, and deleting one leaves the other running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_k8s_operator import CONTROLLERS, Cluster, ControllerProcess, phase, run_spec

from controller.kubernetes.main import run_controller
from controller.spec import legacy_workflow_id, workflow_id
from relay_testing.objects import make_namespace
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]


class TwoNamespaceController(ControllerProcess):
    """The controller of test_k8s_operator, watching a second namespace too."""

    def __init__(self, *args: Any, other_namespace: str) -> None:
        super().__init__(*args)
        self.other_namespace = other_namespace

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
            namespaces=[namespace, self.other_namespace],
            task_queue=task_queue,
            stop=self.stop_flag,
        )


@pytest.fixture
async def two_namespaces(
    temporal_env: Any,
    control_plane: Any,
    crd_installed: Any,
    kube: Any,
    namespace: str,
    volume_root: Path,
    task_queue: str,
) -> AsyncIterator[tuple[str, str]]:
    """(`<ns>`, `<ns>-a`) watched by one controller: runs `a-x` and `x` in them shared a legacy workflow id."""
    other = f"{namespace}-a"
    await asyncio.to_thread(make_namespace, kube, other)
    configuration = control_plane.api_client().configuration
    target_host = temporal_env.client.service_client.config.target_host
    args = (target_host, configuration, volume_root, namespace, task_queue)
    process = TwoNamespaceController(*args, other_namespace=other).start()
    CONTROLLERS.append(process)
    yield namespace, other
    if process in CONTROLLERS:
        CONTROLLERS.remove(process)
    await asyncio.to_thread(process.stop)


async def test_deleting_team_a_x_leaves_team_a_dash_x_running(
    two_namespaces: tuple[str, str], kube: Any, standin_kubelet: ProcessKubelet, temporal_env: Any
) -> None:
    team, team_a = two_namespaces
    assert legacy_workflow_id(team, "a-x") == legacy_workflow_id(team_a, "x")  # the reported collision
    standin_kubelet.extra_env.update({"RELAY_STANDIN_STEPS": "100000", "RELAY_STANDIN_STEP_S": "0.1"})
    first, second = Cluster(kube, team), Cluster(kube, team_a)
    await first.apply("a-x", run_spec())
    await second.apply("x", run_spec())
    for cluster, name in ((first, "a-x"), (second, "x")):
        await cluster.until(name, phase("Running"), timeout_s=90)
        await cluster.until(name, lambda r: bool(r.get("status", {}).get("legs")), timeout_s=60)
    ids = {(await c.get(n) or {})["status"]["workflowId"] for c, n in ((first, "a-x"), (second, "x"))}
    assert ids == {workflow_id(team, "a-x"), workflow_id(team_a, "x")}

    await second.delete_and_wait_gone("x", 60, "team-a/x not removed")
    survivor = temporal_env.client.get_workflow_handle(workflow_id(team, "a-x"))
    assert (await survivor.describe()).status.name == "RUNNING"
    await asyncio.sleep(3)  # what a cancellation would have shown by now: a Cancelled phase, no leg running
    run = await first.get("a-x")
    assert run is not None and run["status"]["phase"] == "Running"
    assert (await survivor.describe()).status.name == "RUNNING"
    assert any(pod.startswith(f"{team}/a-x-leg-") for pod in standin_kubelet.running()), "its leg was stopped"
    await first.delete_and_wait_gone("a-x", 60, "team/a-x not removed")
