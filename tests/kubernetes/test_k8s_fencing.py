"""A partitioned node on envtest (issue 13): its leg is lost, the next leg starts, the old trainer is fenced.

Leg 0 runs the real trainer on a node of its own (a second process kubelet). After its first checkpoint the node
is cut off: its Ready condition goes Unknown and its kubelet reports nothing more and hears of no deletion, so
the pod stays "Running" in the API while its trainer keeps training and writing the shared volume. The controller
must call the leg lost within nodeLostAfterSeconds (+ its poll), start leg 1 on the healthy node, and the old
trainer's next commit must be refused by the fence (exit 76, "fenced: leg 0 superseded by leg 1"); the run
ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_k8s_operator import Cluster, first_checkpoint, phase
from test_k8s_operator import controller as controller  # the operator fixture, shared
from test_k8s_real_trainer import OFFLINE_ENV, sha256, train_uninterrupted, write_reviews
from test_k8s_real_trainer import real_kubelet as real_kubelet  # the session kubelet, running the real trainer

from relay_testing.process_kubelet import ProcessKubelet
from trainer.volume import ExitCode

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
STEPS = 16
NODE_LOST_AFTER_S = 3.0


@pytest.fixture
def lost_node(
    control_plane: Any, volume_root: Path, real_kubelet: ProcessKubelet, tmp_path: Path
) -> Iterator[ProcessKubelet]:
    """A second node, the only schedulable one until the test cuts it off; its trainer steps slowly."""
    node = ProcessKubelet(
        control_plane.api_client(), volume_root, tmp_path / "lost-kubelet", node_name=f"lost-{uuid.uuid4().hex[:6]}"
    )
    node.extra_env.update({**OFFLINE_ENV, "RELAY_TEST_STEP_SLEEP_S": "1.0"})
    node.start()
    real_kubelet.set_unschedulable(True)
    try:
        yield node
    finally:
        real_kubelet.set_unschedulable(False)
        node.stop()
        node.core.delete_node(node.node_name)


def exit_code_of(kubelet: ProcessKubelet, namespace: str, pod_name: str) -> int | None:
    pod = next(p for p in kubelet.pods.values() if (p.namespace, p.name) == (namespace, pod_name))
    return pod.process.poll() if pod.process is not None else None


async def test_a_partitioned_nodes_leg_is_replaced_and_its_trainer_fenced(
    controller: Any,
    kube: Any,
    namespace: str,
    real_kubelet: ProcessKubelet,
    lost_node: ProcessKubelet,
    volume_root: Path,
    tmp_path: Path,
) -> None:
    cluster = Cluster(kube, namespace)
    name = f"fence-{uuid.uuid4().hex[:6]}"
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")
    spec = {
        "model": "tiny",
        "dataset": {"source": "csv", "path": f"data/{namespace}/reviews.csv", "evalFraction": 0.25},
        "training": {
            "maxSteps": STEPS,
            "batchSize": 8,
            "maxSeqLength": 16,
            "checkpointEverySteps": 4,
            "logEverySteps": 1,
            "learningRate": 1e-3,
            "seed": 11,
        },
        "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
        "terminationGracePeriodSeconds": 10,
        "retries": {"backoffSeconds": 0.5, "nodeLostAfterSeconds": NODE_LOST_AFTER_S},
    }
    await cluster.apply(name, spec)
    run_dir = volume_root / f"runs/{namespace}/{name}"
    await first_checkpoint(run_dir / "checkpoints", timeout_s=60)
    (old_pod,) = await cluster.pods(f"{name}-leg-0")
    assert old_pod.spec.node_name == lost_node.node_name

    # The partition: the node's pods run on, but the API server hears nothing from it any more.
    lost_node.set_unschedulable(True)
    real_kubelet.set_unschedulable(False)
    lost_node.partition()
    cut_at = time.monotonic()
    lost_node.set_ready("Unknown", reason="NodeStatusUnknown")
    # Not before the threshold (a NotReady blip is no loss), to the second: the condition's lastTransitionTime has
    # whole seconds, as a real node controller's, so the loss is judged up to 1 s before N seconds have truly passed
    # (the test once saw 2.3 s against 3). The latency itself is a benchmark figure (bench_fencing's
    # node_lost_detection_s), so the upper bound here is liveness only, loose for a busy machine.
    deadline = cut_at + NODE_LOST_AFTER_S + 45
    while not await cluster.pods(f"{name}-leg-1"):
        assert time.monotonic() < deadline, f"leg 1 not started after the node was lost: {await cluster.get(name)}"
        await asyncio.sleep(0.05)
    detected_s = time.monotonic() - cut_at
    assert detected_s >= NODE_LOST_AFTER_S - 1.0, f"the next leg started {detected_s:.1f} s after the cut"

    # The old trainer is still running (nothing reached it) and its next commit is refused.
    old_name = old_pod.metadata.name
    deadline = time.monotonic() + 45  # liveness: its next checkpoint, a few steps on
    while exit_code_of(lost_node, namespace, old_name) is None:
        assert time.monotonic() < deadline, "the old trainer was not fenced"
        await asyncio.sleep(0.05)
    assert exit_code_of(lost_node, namespace, old_name) == ExitCode.FENCED
    assert "fenced: leg 0 superseded by leg 1" in lost_node.pod_log(namespace, old_name)

    run = await cluster.until(name, phase("Succeeded"), timeout_s=60)
    status = run["status"]
    assert [leg["outcome"] for leg in status["legs"]] == ["preempted", "completed"], status["legs"]
    assert "NodeLost" in status["legs"][0]["reason"], status["legs"][0]
    assert status["preemptions"] == 1 and status["failures"] == 0
    assert "Preempted" in await cluster.events(name)
    reference = train_uninterrupted(
        volume_root, status["snapshot"]["path"], run_dir / "config.json", tmp_path / "reference"
    )
    assert sha256(run_dir / "final/model.safetensors") == sha256(reference)
