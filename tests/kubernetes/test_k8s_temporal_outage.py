"""The Temporal server stops while a leg trains on envtest (`relay controller` process, real trainer pods).

The process kubelet runs the leg's own command (`python -m trainer train`, tiny BERT); the controller runs as its
own OS process against a dev server this test starts on a database file, so the server can stop and come back
with its workflows. While it is down the pod trains and checkpoints on (the trainer never talks to Temporal) and
the controller stays up; once it is back the controller reconnects by itself, the run succeeds with one Job and
one LegStarted Event, and its weights are the uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from test_k8s_real_trainer import real_kubelet as real_kubelet  # the fixture, shared
from test_k8s_real_trainer import write_reviews

from relay_testing.control_plane import ControlPlane
from relay_testing.process_kubelet import ProcessKubelet
from relay_testing.reference_training import file_sha256, train_uninterrupted
from relay_testing.replicas import ControllerReplica, controller_args, logs, wait_until
from relay_testing.temporal_outage import RestartableTemporal
from trainer.volume import RunLayout, list_checkpoint_dirs, load_progress

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
OUTAGE_S = 10.0  # bench/bench_ha.py runs the 60 s
STEPS = 600  # tiny BERT, 16 tokens, one thread: 40-80 steps/s, so the leg trains through the outage


def run_spec(namespace: str) -> dict[str, Any]:
    return {
        "model": "tiny",
        "dataset": {"source": "csv", "path": f"data/{namespace}/reviews.csv", "evalFraction": 0.25},
        "training": {"maxSteps": STEPS, "batchSize": 8, "maxSeqLength": 16, "checkpointEverySteps": 25,
                     "logEverySteps": 1, "learningRate": 1e-3, "seed": 11},
        "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
        "terminationGracePeriodSeconds": 10,
        "retries": {"backoffSeconds": 0.5},
    }  # fmt: skip


async def test_a_temporal_outage_mid_leg_loses_nothing_and_the_controller_reconnects_by_itself(
    control_plane: ControlPlane,
    kube: kubernetes.client.ApiClient,
    crd_installed: Any,
    namespace: str,
    volume_root: Path,
    task_queue: str,
    real_kubelet: ProcessKubelet,
    tmp_path: Path,
) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube)
    core = kubernetes.client.CoreV1Api(kube)
    name = f"outage-{uuid.uuid4().hex[:6]}"
    layout = RunLayout.for_run(volume_root, namespace, name)
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")

    def status() -> dict[str, Any]:
        run: Any = custom.get_namespaced_custom_object("relay.dev", "v1alpha1", namespace, "trainingruns", name)
        return run.get("status") or {}

    def step() -> int:
        progress = load_progress(layout)
        return progress.step if progress else 0

    def checkpoints() -> set[int]:
        return {s for s, _ in list_checkpoint_dirs(layout.checkpoints_dir)}

    with RestartableTemporal(tmp_path / "temporal") as server:
        args = controller_args(server.address, control_plane.kubeconfig, namespace, volume_root, task_queue)
        replicas = [ControllerReplica("relay-0", args, tmp_path)]
        (controller,) = replicas
        try:
            body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}}
            await asyncio.to_thread(
                custom.create_namespaced_custom_object, "relay.dev", "v1alpha1", namespace, "trainingruns",
                {**body, "spec": run_spec(namespace)},
            )  # fmt: skip
            await wait_until("the leg's first checkpoint", lambda: step() >= 30 and checkpoints(), 90, replicas)

            before_step, before = step(), checkpoints()
            down_at = time.monotonic()
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            during_step, during = step(), sorted(checkpoints() - before)
            assert controller.process.poll() is None, f"the controller died in the outage\n{logs(replicas)}"
            await asyncio.to_thread(server.start)
            back_at = time.monotonic()
            print(f"outage {back_at - down_at:.1f} s: steps {before_step} -> {during_step}, checkpoints {during}")
            assert during_step > before_step, "the trainer stopped while Temporal was down"
            assert during, "no checkpoint was written while Temporal was down"

            final = await wait_until(
                "the run to finish", lambda: status().get("phase") in ("Succeeded", "Failed") and status(), 120,
                replicas,
            )  # fmt: skip
            print(f"finished {time.monotonic() - back_at:.1f} s after the server came back")
            assert final["phase"] == "Succeeded", f"{final.get('message')}\n{logs(replicas)}"
            assert controller.process.poll() is None, "the controller restarted"
        finally:
            exit_code = controller.stop()
    assert exit_code == 0, f"the controller did not shut down cleanly after the outage\n{logs(replicas)}"

    assert [leg["outcome"] for leg in final["legs"]] == ["completed"], final["legs"]
    assert final["legCount"] == 1 and final["preemptions"] == 0 and final["failures"] == 0, final
    assert final["step"] == STEPS
    started = [p.split("/")[1].rsplit("-", 1)[0] for p in real_kubelet.started if p.startswith(f"{namespace}/{name}-")]
    assert started == [f"{name}-leg-0"], f"a leg was launched twice: {started}"
    events = await asyncio.to_thread(
        core.list_namespaced_event, namespace, field_selector=f"involvedObject.name={name}"
    )
    reasons = [e.reason for e in events.items]
    assert reasons.count("LegStarted") == 1 and {"LegCompleted", "Succeeded"} <= set(reasons), reasons

    reference = train_uninterrupted(volume_root, final["snapshot"]["path"], layout.config_path, tmp_path / "reference")
    assert file_sha256(layout.run_dir / "final/model.safetensors") == file_sha256(reference)
