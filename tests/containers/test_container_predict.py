"""BertInferenceWorkflow in container mode: the predict Job's pod runs from the trainer image, as a kubelet runs it.

A tiny model is trained once by the real trainer on this machine (the tests' torch pin, which the image ships);
the test copies it into a run's folder on the root-made claim and runs the workflow through a worker with the
KubernetesBackend. The container kubelet starts the Job's pod as `docker run` of the run's image: UID 1000, a
read-only root, the model folder mounted read-only and only the request's work folder writable. No Job, pod,
container or work folder may be left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from temporalio.testing import WorkflowEnvironment
from test_container_training import OFFLINE_ENV, TRAINER_IMAGE, write_reviews

from controller.kubernetes.backend import KubernetesBackend
from controller.kubernetes.jobs import LABEL_PREDICT_RUN
from controller.messages import PredictRequest, PredictResult
from controller.snapshot import snapshot_dataset
from controller.spec import DatasetSpec, TrainingRunSpec, trainer_config
from controller.worker import build_worker
from relay_testing.container_kubelet import ContainerKubelet, docker

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
SPEC: dict[str, Any] = {
    "model": "tiny",
    "image": TRAINER_IMAGE,
    "dataset": {"source": "demo"},
    "training": {"maxSteps": 4, "batchSize": 8, "maxSeqLength": 16, "checkpointEverySteps": 4, "seed": 5},
    "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
    "retries": {"stuckAfterSeconds": 30},
}
TEXTS = ["a superb and moving film", "dull, tedious\nand bland", ""]


@pytest.fixture(scope="module")
def trained(volume_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's folder (final/, tokenizer/, checkpoints/) of the tiny model, from the real trainer."""
    write_reviews(volume_root / "data/container-predict/reviews.csv", count=40)
    dataset = DatasetSpec(source="csv", path="data/container-predict/reviews.csv", eval_fraction=0.25)
    snapshot, _ = snapshot_dataset(volume_root, dataset, 2)
    folder = tmp_path_factory.mktemp("container-predict-trained")
    config = folder / "config.json"
    config.write_text(trainer_config(TrainingRunSpec.model_validate(SPEC)).to_json_text())
    run_dir = folder / "run"
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir),
               "--snapshot", str(snapshot.path), "--config", str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE_ENV}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture
def offline_kubelet(container_kubelet: ContainerKubelet) -> Iterator[ContainerKubelet]:
    saved = dict(container_kubelet.extra_env)
    container_kubelet.extra_env.update(OFFLINE_ENV)
    yield container_kubelet
    container_kubelet.extra_env.clear()
    container_kubelet.extra_env.update(saved)


@pytest.fixture
async def worker_queue(
    temporal_env: WorkflowEnvironment, control_plane: Any, volume_root: Path, task_queue: str
) -> AsyncIterator[str]:
    """A worker with the KubernetesBackend, as in the controller process; yields its task queue."""
    backend = KubernetesBackend(control_plane.api_client(), volume_root=volume_root)
    try:
        async with build_worker(temporal_env.client, backend, volume_root, task_queue=task_queue):
            yield task_queue
    finally:
        await backend.close()


def local_predictions(model: Path) -> list[tuple[int, list[float]]]:
    """The same model's answers from a bare process on this machine, outside any Job or container."""
    command = [sys.executable, "-m", "trainer", "predict", "--model", str(model), "--json",
               *[f"--text={t}" for t in TEXTS]]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [(row["label"], row["probabilities"]) for row in rows]


async def test_a_predict_job_from_the_trainer_image_reads_the_model_read_only_and_answers(
    temporal_env: WorkflowEnvironment,
    kube: kubernetes.client.ApiClient,
    crd_installed: Any,
    namespace: str,
    offline_kubelet: ContainerKubelet,
    volume_root: Path,
    trained: Path,
    worker_queue: str,
) -> None:
    name = f"cpred-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": SPEC}
    kubernetes.client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "relay.dev", "v1alpha1", namespace, "trainingruns", body
    )
    run = f"runs/{namespace}/{name}"
    shutil.copytree(trained, volume_root / run)
    assert volume_root.stat().st_uid == 0, "the claim must start as a fresh volume does: owned by root"

    started = time.monotonic()
    answer = await temporal_env.client.execute_workflow(
        "BertInferenceWorkflow",
        PredictRequest(namespace=namespace, name=name, texts=TEXTS),
        id=f"inference-{name}",
        task_queue=worker_queue,
        result_type=PredictResult,
    )
    elapsed = time.monotonic() - started

    assert answer.model_path == f"{run}/final"
    assert [p.text for p in answer.predictions] == TEXTS, "one prediction per text, in order"
    for prediction in answer.predictions:
        assert len(prediction.scores) == 2 and all(0 <= p <= 1 for p in prediction.scores), prediction
        assert abs(sum(prediction.scores) - 1) < 1e-4, prediction
        assert prediction.label == max(range(2), key=prediction.scores.__getitem__), prediction
    # The image's torch is the tests' pin: the container gives the bare process's answers for the same model.
    expected = local_predictions(trained / "final")
    got = [(p.label, p.scores) for p in answer.predictions]
    assert [label for label, _ in got] == [label for label, _ in expected]
    for (_, scores), (_, reference) in zip(got, expected, strict=True):
        assert scores == pytest.approx(reference, abs=1e-5), (got, expected)

    # The pod ran from the trainer image, restricted as the chart's pods are, the model mounted read-only.
    (pod_key,) = [key for key in offline_kubelet.started if key.startswith(f"{namespace}/{name}-predict-")]
    launched = offline_kubelet.docker_args[pod_key]
    for flag in ("--read-only", "--user", "1000:1000", "--cap-drop", "ALL", "no-new-privileges", TRAINER_IMAGE):
        assert flag in launched, f"{flag} missing from docker {' '.join(launched)}"
    assert f"{volume_root / run / 'final'}:/relay-volume/{run}/final:ro" in launched, launched
    writable = [a for a in launched if a.startswith(f"{volume_root}/") and not a.endswith(":ro")]
    assert len(writable) == 1 and f"/relay-volume/{run}/predictions/" in writable[0], writable

    # Nothing is left: the Job and its pod deleted, the container removed, the request's work folder gone.
    jobs = kubernetes.client.BatchV1Api(kube).list_namespaced_job(namespace).items
    pods = kubernetes.client.CoreV1Api(kube).list_namespaced_pod(
        namespace, label_selector=f"{LABEL_PREDICT_RUN}={name}"
    )
    assert jobs == [] and pods.items == [], "the predict Job or its pod outlived the request"
    container = launched[launched.index("--name") + 1]
    containers = docker("ps", "--all", "--quiet", "--filter", f"name=^{container}$")
    assert containers.returncode == 0 and containers.stdout.split() == [], f"container {container} left behind"
    assert list((volume_root / run / "predictions").iterdir()) == []
    assert elapsed < 60, f"a predict Job took {elapsed:.1f} s"
