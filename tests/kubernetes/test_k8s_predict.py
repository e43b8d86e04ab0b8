"""BertInferenceWorkflow on Kubernetes: predictions run as a one-shot Job through the KubernetesBackend.

A tiny model is trained once by the real trainer; each test copies it into a run's folder, creates the
TrainingRun object (its image, resources and scheduling are what the predict Job takes) and runs the
workflow through a worker with the KubernetesBackend on the envtest control plane. The process kubelet runs
the Job's own command, `python -m trainer predict`. No Job, pod or work folder may be left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from conftest import make_training_run
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from test_k8s_real_trainer import OFFLINE_ENV, write_reviews
from test_k8s_real_trainer import real_kubelet as real_kubelet  # the kubelet running the pod's own command

from controller.activities import PredictRequest, PredictResult
from controller.kubernetes.backend import KubernetesBackend
from controller.kubernetes.jobs import LABEL_PREDICT_RUN
from controller.leg_model import PredictJob
from controller.snapshot import snapshot_dataset
from controller.spec import DatasetSpec, TrainingRunSpec, trainer_config
from controller.worker import build_worker
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
REPO = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {
    "model": "tiny",
    "dataset": {"source": "demo"},
    "training": {"maxSteps": 4, "batchSize": 8, "maxSeqLength": 16, "checkpointEverySteps": 4, "seed": 5},
    "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1},
    "retries": {"stuckAfterSeconds": 2},
}
TEXTS = ["a superb and moving film", "dull, tedious\nand bland", ""]


@pytest.fixture(scope="module")
def trained(volume_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's folder (final/, tokenizer/, checkpoints/) of the tiny model, from the real trainer."""
    write_reviews(volume_root / "data/predict/reviews.csv", count=40)
    dataset = DatasetSpec(source="csv", path="data/predict/reviews.csv", eval_fraction=0.25)
    snapshot, _ = snapshot_dataset(volume_root, dataset, 2)
    folder = tmp_path_factory.mktemp("predict-trained")
    config = folder / "config.json"
    config.write_text(trainer_config(TrainingRunSpec.model_validate(SPEC)).to_json_text())
    run_dir = folder / "run"
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir),
               "--snapshot", str(snapshot.path), "--config", str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE_ENV}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def new_run(kube: Any, namespace: str, volume_root: Path, trained: Path, **spec: Any) -> str:
    """A TrainingRun object (no operator needed) whose run folder holds the trained model."""
    name = f"pred-{uuid.uuid4().hex[:6]}"
    make_training_run(kube, namespace, name, SPEC | spec)
    shutil.copytree(trained, volume_root / f"runs/{namespace}/{name}")
    return name


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


def predict_pods_started(kubelet: ProcessKubelet, namespace: str, name: str) -> list[str]:
    return [pod for pod in kubelet.started if pod.startswith(f"{namespace}/{name}-predict-")]


def leftovers(kube: Any, namespace: str, name: str) -> tuple[list[str], list[str]]:
    """Jobs left in the namespace, and pods of this run's predict Jobs."""
    jobs = kubernetes.client.BatchV1Api(kube).list_namespaced_job(namespace).items
    selector = f"{LABEL_PREDICT_RUN}={name}"
    pods = kubernetes.client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=selector).items
    return [j.metadata.name for j in jobs], [p.metadata.name for p in pods]


def failure_of(exc: WorkflowFailureError) -> ApplicationError:
    assert isinstance(exc.cause, ActivityError) and isinstance(exc.cause.cause, ApplicationError), exc.cause
    return exc.cause.cause


async def test_relay_predict_asks_the_controllers_worker_and_a_predict_job_answers(
    temporal_env: WorkflowEnvironment,
    kube: Any,
    crd_installed: Any,
    namespace: str,
    real_kubelet: ProcessKubelet,
    volume_root: Path,
    trained: Path,
    worker_queue: str,
) -> None:
    name = new_run(kube, namespace, volume_root, trained)
    address = temporal_env.client.service_client.config.target_host
    command = [sys.executable, "-m", "controller.cli", "predict", name, "--namespace", namespace, "--json",
               "--address", address, "--task-queue", worker_queue, *[f"--text={t}" for t in TEXTS]]  # fmt: skip
    result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "embedded" not in result.stderr, "a cluster user's predict starts no server of its own"
    answer = PredictResult.model_validate_json(result.stdout)
    assert answer.model_path == f"runs/{namespace}/{name}/final"
    assert [p.text for p in answer.predictions] == TEXTS
    for prediction in answer.predictions:
        assert len(prediction.scores) == 2 and abs(sum(prediction.scores) - 1) < 1e-4
        assert prediction.label == max(range(2), key=prediction.scores.__getitem__)

    # The same model on this machine, outside any Job, gives the same answers: the Job used the run's model.
    local = subprocess.run(
        [sys.executable, "-m", "trainer", "predict", "--model", str(trained / "final"), "--json",
         *[f"--text={t}" for t in TEXTS]],
        capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV},
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    expected = [json.loads(line) for line in local.stdout.splitlines()]
    assert [(p.label, p.scores) for p in answer.predictions] == [(e["label"], e["probabilities"]) for e in expected]

    assert len(predict_pods_started(real_kubelet, namespace, name)) == 1
    assert leftovers(kube, namespace, name) == ([], [])
    assert list((volume_root / f"runs/{namespace}/{name}/predictions").iterdir()) == []


async def test_a_folder_without_a_model_fails_at_once_with_the_trainers_message_and_leaves_no_job(
    temporal_env: WorkflowEnvironment,
    kube: Any,
    crd_installed: Any,
    namespace: str,
    real_kubelet: ProcessKubelet,
    volume_root: Path,
    trained: Path,
    worker_queue: str,
) -> None:
    name = new_run(kube, namespace, volume_root, trained)
    empty = volume_root / f"models/{namespace}/empty"
    empty.mkdir(parents=True)
    (empty / "README").write_text("no weights here")
    request = PredictRequest(namespace=namespace, name=name, texts=["x"], model_path=f"models/{namespace}/empty")
    with pytest.raises(WorkflowFailureError) as failed:
        await temporal_env.client.execute_workflow(
            "BertInferenceWorkflow", request, id=f"inference-{name}", task_queue=worker_queue, result_type=PredictResult
        )
    error = failure_of(failed.value)
    assert error.non_retryable and error.type == "PredictFailed"
    assert "trainer predict exited 65: invalid input: --model" in error.message
    assert "empty: not a loadable model" in error.message
    assert len(predict_pods_started(real_kubelet, namespace, name)) == 1, "a non-retryable error ran twice"
    assert leftovers(kube, namespace, name) == ([], [])


async def test_an_unschedulable_predict_job_fails_with_the_schedulers_reason_in_bounded_time(
    temporal_env: WorkflowEnvironment,
    kube: Any,
    crd_installed: Any,
    namespace: str,
    real_kubelet: ProcessKubelet,
    volume_root: Path,
    trained: Path,
    worker_queue: str,
) -> None:
    name = new_run(kube, namespace, volume_root, trained, scheduling={"nodeSelector": {"pool": "nowhere"}})
    request = PredictRequest(namespace=namespace, name=name, texts=["x"])
    started = time.monotonic()
    with pytest.raises(WorkflowFailureError) as failed:
        await temporal_env.client.execute_workflow(
            "BertInferenceWorkflow", request, id=f"inference-{name}", task_queue=worker_queue, result_type=PredictResult
        )
    error = failure_of(failed.value)
    assert error.non_retryable, error.message
    assert f"predict Job {namespace}/{name}-predict-" in error.message
    assert "did not start within 2s: Unschedulable" in error.message and "node(s) didn't match" in error.message
    assert time.monotonic() - started < 30
    assert predict_pods_started(real_kubelet, namespace, name) == []
    assert leftovers(kube, namespace, name) == ([], [])


async def test_a_cancelled_predict_deletes_its_job_before_it_returns(
    control_plane: Any, kube: Any, crd_installed: Any, namespace: str, volume_root: Path, trained: Path
) -> None:
    """What a cancelled workflow's activity does: the backend's predict, cancelled while its pod is Pending."""
    spec = {"scheduling": {"nodeSelector": {"pool": "nowhere"}}, "retries": {"stuckAfterSeconds": 600}}
    name = new_run(kube, namespace, volume_root, trained, **spec)
    run = f"runs/{namespace}/{name}"
    job = PredictJob(
        namespace=namespace,
        name=name,
        request_id=uuid.uuid4().hex[:8],
        model_path=f"{run}/final",
        read_paths=[f"{run}/final"],
        work_path=f"{run}/predictions/x",
        texts=["x"],
        timeout_s=600,
    )
    backend = KubernetesBackend(control_plane.api_client(), volume_root=volume_root)
    batch = kubernetes.client.BatchV1Api(kube)
    try:
        task = asyncio.ensure_future(backend.predict(job))
        deadline = time.monotonic() + 20
        while not batch.list_namespaced_job(namespace).items:
            assert time.monotonic() < deadline and not task.done(), "no predict Job was created"
            await asyncio.sleep(0.1)
        assert (volume_root / job.texts_file).is_file()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(60):  # a swallowed cancel fails here, not at the 600 s predict timeout
                await task
        assert leftovers(kube, namespace, name) == ([], []), "the cancelled predict's Job outlived it"
        assert not (volume_root / job.work_path).exists()
    finally:
        await backend.close()
