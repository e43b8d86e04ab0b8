"""Predictions through a backend, without a cluster: the predict Job's shape, the results file's validation,
and the predict activity's path checks and error mapping (a recording backend below it)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from controller.activities import PredictRequest, RelayActivities
from controller.backends.base import PredictFailed, prepare_predict_work, read_predictions
from controller.kubernetes.jobs import LABEL_PREDICT_RUN, LABEL_RUN, MANAGED_SELECTOR, build_predict_job
from controller.leg_model import Prediction, PredictJob
from controller.spec import MAX_RUN_NAME, TrainingRunSpec

WORK = "runs/ml/bert-sst2/predictions/0123abcd"


def predict_job(**overrides: Any) -> PredictJob:
    fields: dict[str, Any] = {
        "namespace": "ml",
        "name": "bert-sst2",
        "request_id": "0123abcd",
        "model_path": "runs/ml/bert-sst2/checkpoints/step-000000080",
        "read_paths": ["runs/ml/bert-sst2/checkpoints/step-000000080", "runs/ml/bert-sst2/tokenizer"],
        "work_path": WORK,
        "texts": ["a superb film", "dull"],
        "timeout_s": 300,
    }
    return PredictJob(**(fields | overrides))


def run_spec(**spec: Any) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate({"dataset": {"source": "demo"}, **spec})


def test_predict_job_runs_the_trainer_once_with_the_runs_image_resources_and_scheduling() -> None:
    spec = run_spec(
        image="registry.example/trainer:1.2",
        resources={"gpus": 4, "cpu": "6", "memory": "24Gi"},
        scheduling={
            "nodeSelector": {"pool": "spot"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "batch-low",
            "kueueQueue": "team-a",
            "fallback": {"nodeSelector": {"pool": "on-demand"}},
        },
        storage={"claimName": "shared-nfs"},
    )
    job = build_predict_job(predict_job(), spec, owner_uid="uid-1")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert job["metadata"]["name"] == "bert-sst2-predict-0123abcd"
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert job["spec"]["activeDeadlineSeconds"] > 300, "the backend's own deadline comes first"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert container["image"] == "registry.example/trainer:1.2"
    assert container["command"] == [
        "python", "-m", "trainer", "predict",
        "--model", "/relay-volume/runs/ml/bert-sst2/checkpoints/step-000000080",
        "--file", f"/relay-volume/{WORK}/texts.json",
        "--output", f"/relay-volume/{WORK}/predictions.json",
    ]  # fmt: skip
    # The run's cpu and memory; one GPU of the run's four: predict uses one device.
    assert container["resources"]["requests"] == {"cpu": "6", "memory": "24Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["limits"] == {"memory": "24Gi", "nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"pool": "spot"} and pod["priorityClassName"] == "batch-low"
    assert pod["tolerations"] == [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    # The same claim and subPath mounts as a leg: the model's folders read-only, the work folder read-write.
    assert pod["volumes"][0] == {"name": "relay-volume", "persistentVolumeClaim": {"claimName": "shared-nfs"}}
    claim = {m["mountPath"]: m for m in container["volumeMounts"] if m["name"] == "relay-volume"}
    assert claim == {
        f"/relay-volume/{path}": {"name": "relay-volume", "mountPath": f"/relay-volume/{path}", "subPath": path}
        | ({} if path == WORK else {"readOnly": True})
        for path in [*predict_job().read_paths, WORK]
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # Seen by the backend's watch (managed-by), but not a leg of the run: no relay.dev/run label.
    labels = job["spec"]["template"]["metadata"]["labels"]
    key, value = MANAGED_SELECTOR.split("=")
    assert labels[key] == value and labels[LABEL_PREDICT_RUN] == "bert-sst2" and LABEL_RUN not in labels


def test_cpu_run_predicts_without_a_gpu_and_the_longest_run_name_fits() -> None:
    name = "r" * MAX_RUN_NAME
    job = build_predict_job(predict_job(name=name), run_spec(resources={"cpu": "500m", "memory": "2Gi"}))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "2Gi"}
    assert len(job["metadata"]["name"]) <= 63 and "ownerReferences" not in job["metadata"]
    assert {"OMP_NUM_THREADS": "1"}.items() <= {e["name"]: e["value"] for e in container["env"]}.items()


def write_output(volume: Path, job: PredictJob, document: Any) -> None:
    path = volume / job.output_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def test_predictions_file_is_read_in_order_and_checked_against_the_texts(tmp_path: Path) -> None:
    job = predict_job()
    prepare_predict_work(tmp_path, job)
    assert json.loads((tmp_path / job.texts_file).read_text()) == job.texts
    rows = [
        {"text": "a superb film", "label": 1, "probabilities": [0.1, 0.9]},
        {"text": "dull", "label": 0, "probabilities": [0.8, 0.2]},
    ]
    write_output(tmp_path, job, {"predictions": rows})
    assert read_predictions(tmp_path, job, 0, "") == [
        Prediction(text="a superb film", label=1, scores=[0.1, 0.9]),
        Prediction(text="dull", label=0, scores=[0.8, 0.2]),
    ]
    for document, message in [
        ({"predictions": rows[:1]}, "1 predictions for 2 texts"),
        ({"predictions": [rows[0], rows[0]]}, "prediction 1: text 'a superb film' where 'dull' was sent"),
        ({"predictions": [rows[0], rows[1] | {"label": 2}]}, "prediction 1: label 2 outside the 2 scores"),
        ({"nothing": 1}, "no predictions for 2 texts"),
    ]:
        write_output(tmp_path, job, document)
        with pytest.raises(PredictFailed, match=r"predictions\.json: ") as failed:
            read_predictions(tmp_path, job, 0, "")
        assert message in str(failed.value) and failed.value.non_retryable


def test_the_trainers_own_message_and_exit_code_decide_the_failure(tmp_path: Path) -> None:
    job = predict_job()
    write_output(tmp_path, job, {"error": "invalid input: --model x: not a loadable model (boom)", "exitCode": 65})
    with pytest.raises(PredictFailed) as invalid:
        read_predictions(tmp_path, job, 65, "pod p: exit code 65")
    assert str(invalid.value) == "trainer predict exited 65: invalid input: --model x: not a loadable model (boom)"
    assert invalid.value.non_retryable
    (tmp_path / job.output_file).unlink()
    with pytest.raises(PredictFailed) as crashed:
        read_predictions(tmp_path, job, 1, "MemoryError")
    assert str(crashed.value) == "trainer predict exited 1: MemoryError" and not crashed.value.non_retryable


class RecordingBackend:
    """Below the activity: records the PredictJob, answers with one prediction per text or a set failure."""

    def __init__(self, failure: PredictFailed | None = None) -> None:
        self.jobs: list[PredictJob] = []
        self.failure = failure

    async def predict(self, job: PredictJob) -> list[Prediction]:
        self.jobs.append(job)
        if self.failure is not None:
            raise self.failure
        return [Prediction(text=text, label=0, scores=[1.0, 0.0]) for text in job.texts]


def checkpoint_folder(volume: Path) -> Path:
    folder = volume / "runs/ml/r/checkpoints/step-000000004"
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text("{}")
    return folder


@pytest.mark.anyio
async def test_predict_activity_hands_the_backend_the_models_folders_and_a_stable_request_id(tmp_path: Path) -> None:
    (tmp_path / "runs/ml/r/final").mkdir(parents=True)
    checkpoint_folder(tmp_path)
    backend = RecordingBackend()
    activities = RelayActivities(backend, tmp_path)  # type: ignore[arg-type]  # only predict is called
    env = ActivityEnvironment()
    result = await env.run(activities.predict, PredictRequest(namespace="ml", name="r", texts=["x", "y"]))
    assert result.model_path == "runs/ml/r/final" and [p.text for p in result.predictions] == ["x", "y"]
    request = PredictRequest(namespace="ml", name="r", texts=["z"], model_path="runs/ml/r/checkpoints/step-000000004")
    await env.run(activities.predict, request)
    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2)
    await retry.run(activities.predict, request)
    final, checkpoint, retried = backend.jobs
    assert final.read_paths == ["runs/ml/r/final"]
    assert checkpoint.read_paths == ["runs/ml/r/checkpoints/step-000000004", "runs/ml/r/tokenizer"]
    assert checkpoint.work_path == f"runs/ml/r/predictions/{checkpoint.request_id}" and checkpoint.timeout_s == 600
    assert retried.request_id == checkpoint.request_id, "a retried attempt adopts the same Job"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("model_path", "message", "error_type"),
    [
        ("../outside", "modelPath '../outside': escapes the volume", "PredictFailed"),
        ("runs/ml/r/nothing", "runs/ml/r/nothing: no such model folder", "MissingFinalModel"),
        ("runs/ml/r", "modelPath 'runs/ml/r': must be a model folder", "PredictFailed"),
    ],
)
async def test_predict_activity_refuses_bad_model_paths_before_any_job(
    tmp_path: Path, model_path: str, message: str, error_type: str
) -> None:
    (tmp_path / "runs/ml/r").mkdir(parents=True)
    backend = RecordingBackend()
    activities = RelayActivities(backend, tmp_path)  # type: ignore[arg-type]
    request = PredictRequest(namespace="ml", name="r", texts=["x"], model_path=model_path)
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(activities.predict, request)
    assert message in failed.value.message and failed.value.non_retryable and failed.value.type == error_type
    assert backend.jobs == []


@pytest.mark.anyio
@pytest.mark.parametrize("non_retryable", [True, False])
async def test_a_backend_failure_keeps_its_message_and_retryability(tmp_path: Path, non_retryable: bool) -> None:
    (tmp_path / "runs/ml/r/final").mkdir(parents=True)
    failure = PredictFailed("trainer predict exited 65: invalid input: --model", non_retryable=non_retryable)
    activities = RelayActivities(RecordingBackend(failure), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ApplicationError) as failed:
        await ActivityEnvironment().run(activities.predict, PredictRequest(namespace="ml", name="r", texts=["x"]))
    assert failed.value.message == str(failure) and failed.value.non_retryable is non_retryable
    assert failed.value.type == "PredictFailed"


def test_predict_on_a_running_worker_starts_no_server_when_none_answers(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    command = [sys.executable, "-m", "controller.cli", "predict", "r", "--text", "x", "--address", address,
               "--task-queue", "bert-checkpointing-task-queue"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert (
        result.stderr
        == f"relay: cannot reach Temporal at {address} (the controller's; port-forward its frontend first)\n"
    )
    assert list(tmp_path.iterdir()) == [], "no volume, no embedded server's database"


class HangingBackend:
    """A predict that runs until cancelled, then takes a moment to clean up (as a Job deletion does)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cleaned_up = False

    async def predict(self, job: PredictJob) -> list[Prediction]:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)
            self.cleaned_up = True
        return []


@pytest.mark.anyio
async def test_a_cancelled_predict_activity_ends_only_after_the_backend_cleaned_up(tmp_path: Path) -> None:
    (tmp_path / "runs/ml/r/final").mkdir(parents=True)
    backend = HangingBackend()
    activities = RelayActivities(backend, tmp_path)  # type: ignore[arg-type]
    env = ActivityEnvironment()
    running = asyncio.ensure_future(env.run(activities.predict, PredictRequest(namespace="ml", name="r", texts=["x"])))
    await backend.started.wait()
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert backend.cleaned_up


@pytest.mark.anyio
async def test_local_predict_past_its_timeout_is_killed_and_leaves_nothing(tmp_path: Path) -> None:
    """LocalBackend below its deadline: a 'python' that never finishes (it records its pid, then sleeps)."""
    from controller.backends.local import LocalBackend

    python = tmp_path / "slow-python"
    python.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 600\n")
    python.chmod(0o755)
    volume = tmp_path / "volume"
    job = predict_job(namespace="ml", name="r", work_path="runs/ml/r/predictions/0123abcd", timeout_s=2)
    with pytest.raises(PredictFailed) as failed:
        await LocalBackend(volume, python=str(python)).predict(job)
    assert str(failed.value) == "trainer predict did not finish within 2s" and failed.value.non_retryable
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists(), "the predict process outlived its timeout"
    assert not (volume / job.work_path).exists()
