"""KubernetesBackend against the real API server, Job controller and scheduler, with the process kubelet.

Each leg runs the stand-in trainer (same command line and volume contract as the real one, no torch).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from conftest import leg_of, make_training_run

from controller.kubernetes.backend import KubernetesBackend, LegConflict
from controller.kubernetes.jobs import ANNOTATION_TERMINATION, POD_FAILURE_POLICY
from controller.kubernetes.server import evict_pod, server_features
from controller.leg_model import LegOutcomeKind, LegSpec, LegState, classify_termination
from relay_testing.process_kubelet import ProcessKubelet
from trainer import volume

pytestmark = pytest.mark.cluster
SPEC: dict[str, Any] = {
    "dataset": {"source": "demo"},
    "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
    "terminationGracePeriodSeconds": 5,
    "retries": {"stuckAfterSeconds": 2},
}


def leg_spec(
    namespace: str, name: str, leg: int, env: dict[str, str] | None = None, *, owner_uid: str, **spec: Any
) -> LegSpec:
    """A leg of TrainingRun `namespace/name` with this file's SPEC, overridden by `spec`."""
    return leg_of(namespace, name, {**SPEC, **spec}, owner_uid=owner_uid, leg=leg, env=env)


async def until(backend: KubernetesBackend, leg: LegSpec, states: set[LegState], timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    observation = await backend.observe(leg)
    while observation.state not in states:
        assert time.monotonic() < deadline, f"leg stayed {observation.state}: {observation.detail}"
        observation = await backend.wait_for_change(leg, 1.0)
    return observation


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def backend(control_plane: Any) -> KubernetesBackend:
    return KubernetesBackend(control_plane.api_client(), conflict_wait_s=1.0)


def pods_of(kube: kubernetes.client.ApiClient, namespace: str, job: str) -> list[Any]:
    return kubernetes.client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def test_leg_runs_to_completion_and_relaunch_adopts_the_same_job(
    kube, crd_installed, standin_kubelet, namespace, backend, volume_root: Path
) -> None:
    name = f"run-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, SPEC)
    leg = leg_spec(namespace, name, 0, {"RELAY_STANDIN_STEPS": "6", "RELAY_STANDIN_STEP_S": "0.05"}, owner_uid=uid)

    async def scenario() -> None:
        handle = await backend.launch(leg)
        assert (handle.backend_id, handle.adopted) == (f"{name}-leg-0", False)
        again = await backend.launch(leg)
        assert (again.backend_id, again.adopted) == (f"{name}-leg-0", True)
        observation = await until(backend, leg, {LegState.TERMINATED})
        assert observation.termination is not None
        assert classify_termination(observation.termination) == LegOutcomeKind.COMPLETED
        await backend.close()

    run(scenario())
    job = kubernetes.client.BatchV1Api(kube).read_namespaced_job(f"{name}-leg-0", namespace)
    assert job.metadata.owner_references[0].uid == uid
    assert len(pods_of(kube, namespace, f"{name}-leg-0")) == 1
    final = volume.read_checkpoint(volume_root / f"runs/{namespace}/{name}/final", verify_hashes=True)
    assert final.step == 6


def test_evicted_pod_is_a_preemption_with_a_checkpoint_and_no_replacement_pod_runs(
    kube, crd_installed, standin_kubelet: ProcessKubelet, namespace, backend, volume_root: Path
) -> None:
    name = f"run-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, SPEC)
    leg = leg_spec(namespace, name, 0, {"RELAY_STANDIN_STEPS": "1000", "RELAY_STANDIN_STEP_S": "0.05"}, owner_uid=uid)

    async def scenario() -> Any:
        await backend.launch(leg)
        await until(backend, leg, {LegState.RUNNING})
        # Evict once the stand-in is in its loop (it has written progress), so its SIGTERM handler is set:
        # its imports took 1.3 s on this 2-core machine under load, longer than the fixed 0.5 s waited before.
        progress = volume_root / f"runs/{namespace}/{name}/progress.json"
        deadline = time.monotonic() + 30
        while not progress.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        (pod,) = pods_of(kube, namespace, f"{name}-leg-0")
        assert evict_pod(kube, namespace, pod.metadata.name)  # policy/v1beta1 on 1.20, policy/v1 on 1.21+
        observation = await until(backend, leg, {LegState.TERMINATED})
        await backend.close()
        return observation

    observation = run(scenario())
    termination = observation.termination
    assert termination.exit_code == volume.ExitCode.PREEMPTED and termination.disrupted
    assert classify_termination(termination) == LegOutcomeKind.PREEMPTED
    latest, _ = volume.find_latest_checkpoint(volume_root / f"runs/{namespace}/{name}/checkpoints", verify_hashes=True)
    assert latest is not None and latest.step > 0
    job = kubernetes.client.BatchV1Api(kube).read_namespaced_job(f"{name}-leg-0", namespace)
    assert job.spec.parallelism == 0 and ANNOTATION_TERMINATION in job.metadata.annotations
    features = server_features(kube)
    assert features.policy_version == ("v1" if features.minor >= 22 else "v1beta1")
    policy = kube.sanitize_for_serialization(job.spec).get("podFailurePolicy")
    assert policy == (POD_FAILURE_POLICY if features.pod_failure_policy else None)
    assert not evict_pod(kube, namespace, "no-such-pod")  # gone already: False, not an error
    started = [p for p in standin_kubelet.started if p.startswith(f"{namespace}/{name}-leg-0-")]
    assert len(started) == 1, f"a replacement pod ran next to the evicted one: {started}"


def test_kubelet_pressure_eviction_and_trainer_failure_are_told_apart(
    kube, crd_installed, standin_kubelet: ProcessKubelet, namespace, backend
) -> None:
    name = f"run-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, SPEC)
    evicted = leg_spec(namespace, name, 0, {"RELAY_STANDIN_STEPS": "1000"}, owner_uid=uid)
    failing = leg_spec(namespace, name, 1, {"RELAY_STANDIN_EXIT": "1"}, owner_uid=uid)

    async def scenario() -> tuple[Any, Any]:
        await backend.launch(evicted)
        await until(backend, evicted, {LegState.RUNNING})
        (pod,) = pods_of(kube, namespace, f"{name}-leg-0")
        standin_kubelet.pressure_evict(namespace, pod.metadata.name)
        first = await until(backend, evicted, {LegState.TERMINATED})
        await backend.launch(failing)
        second = await until(backend, failing, {LegState.TERMINATED})
        await backend.close()
        return first.termination, second.termination

    first, second = run(scenario())
    assert first.reason == "Evicted" and first.disrupted
    assert classify_termination(first) == LegOutcomeKind.PREEMPTED
    assert second.exit_code == 1 and not second.disrupted
    assert classify_termination(second) == LegOutcomeKind.FAILED


def test_unschedulable_leg_is_stuck_after_the_deadline_and_its_pod_removed(
    kube, crd_installed, standin_kubelet, namespace, backend
) -> None:
    name = f"run-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, {**SPEC, "resources": {"cpu": "1", "memory": "1Gi", "gpus": 16}})
    leg = leg_spec(namespace, name, 0, resources={"cpu": "1", "memory": "1Gi", "gpus": 16}, owner_uid=uid)

    async def scenario() -> Any:
        await backend.launch(leg)
        pending = await until(backend, leg, {LegState.PENDING})
        assert pending.state == LegState.PENDING
        observation = await until(backend, leg, {LegState.TERMINATED}, timeout_s=30)
        await backend.close()
        return observation

    observation = run(scenario())
    assert observation.termination.stuck and observation.termination.reason == "Unschedulable"
    assert "nvidia.com/gpu" in observation.termination.message
    assert classify_termination(observation.termination) == LegOutcomeKind.STUCK
    deadline = time.monotonic() + 10
    while pods_of(kube, namespace, f"{name}-leg-0") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pods_of(kube, namespace, f"{name}-leg-0") == []


def test_a_second_leg_is_refused_while_the_first_runs_and_stop_checkpoints_it(
    kube, crd_installed, standin_kubelet, namespace, backend, volume_root: Path
) -> None:
    name = f"run-{uuid.uuid4().hex[:6]}"
    uid = make_training_run(kube, namespace, name, SPEC)
    first = leg_spec(namespace, name, 0, {"RELAY_STANDIN_STEPS": "1000", "RELAY_STANDIN_STEP_S": "0.05"}, owner_uid=uid)
    second = leg_spec(namespace, name, 1, owner_uid=uid)

    async def scenario() -> Any:
        await backend.launch(first)
        await until(backend, first, {LegState.RUNNING})
        with pytest.raises(LegConflict, match=f"{name}-leg-0 still running"):
            await backend.launch(second)
        stopped = await backend.stop(first, grace_s=5)
        await backend.close()
        return stopped

    stopped = run(scenario())
    assert stopped.state == LegState.TERMINATED
    assert stopped.termination.exit_code == volume.ExitCode.PREEMPTED
    batch = kubernetes.client.BatchV1Api(kube)
    names = [j.metadata.name for j in batch.list_namespaced_job(namespace).items]
    assert names == [f"{name}-leg-0"]


def test_legs_judged_together_share_one_node_read_and_reread_it_after_a_tenth_of_node_lost_after(
    kube, crd_installed, standin_kubelet, namespace, backend, volume_root: Path
) -> None:
    """Every waiting leg is judged each second; on a cluster with a GPU leg per node, a Node read each time was
    60 API requests per run per minute. Legs judged at once share one read, and a read is reused for a tenth of
    their nodeLostAfterSeconds (here 20 s: 2 s)."""
    name = f"run-{uuid.uuid4().hex[:6]}"
    spec = {**SPEC, "retries": {**SPEC["retries"], "nodeLostAfterSeconds": 20}}
    uid = make_training_run(kube, namespace, name, spec)
    env = {"RELAY_STANDIN_STEPS": "1000", "RELAY_STANDIN_STEP_S": "0.05"}
    leg = leg_spec(namespace, name, 0, env, owner_uid=uid, retries=spec["retries"])
    reads: list[str] = []
    read_node = backend._core.read_node

    def counted_read_node(node: str, **kwargs: Any) -> Any:
        reads.append(node)
        return read_node(node, **kwargs)

    backend._core.read_node = counted_read_node

    async def scenario() -> list[int]:
        await backend.launch(leg)
        await until(backend, leg, {LegState.RUNNING})
        counts = [len(reads)]  # the judgements until it ran read its node
        await asyncio.sleep(2.1)
        observations = await asyncio.gather(*(backend.observe(leg) for _ in range(20)))
        assert {o.state for o in observations} == {LegState.RUNNING}
        counts.append(len(reads))
        for _ in range(5):
            await backend.observe(leg)
        counts.append(len(reads))
        await asyncio.sleep(2.1)
        await backend.observe(leg)
        counts.append(len(reads))
        await backend.stop(leg, grace_s=5)
        await backend.close()
        return counts

    until_running, together, soon_after, later = run(scenario())
    assert until_running >= 1 and set(reads) == {standin_kubelet.node_name}
    assert together == until_running + 1, "20 legs judged at once: one Node read"
    assert soon_after == together, "judged again within 2 s: the same read"
    assert later == together + 1, "2 s later: read again"
