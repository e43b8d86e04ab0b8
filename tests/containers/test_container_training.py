"""TrainingRuns whose legs run from the trainer image, as `docker run` of what a kubelet would start.

The claim is a folder root made (as a fresh volume is); the pods run as UID 1000 with a read-only root, no
capabilities, the Job's memory and CPU limits and its termination-message file. An evicted leg resumes and the
run ends with the weights of one uninterrupted run; a leg over its memory limit is killed by the kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from controller.snapshot import write_rows_file
from controller.spec import TrainingRunSpec
from relay_testing.container_kubelet import ContainerKubelet
from trainer import volume

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
STEPS = 16
POSITIVE = ["great", "superb", "lovely", "moving", "brilliant", "charming"]
NEGATIVE = ["awful", "dull", "boring", "clumsy", "tedious", "bland"]
FILLER = ["the", "film", "plot", "actors", "story", "was", "and", "a", "scene", "ending"]
TRAINER_IMAGE = str(TrainingRunSpec.model_fields["image"].default)  # what `make images` tags
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_reviews(path: Path, count: int = 80, seed: int = 3) -> None:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(count):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    write_rows_file(path, texts, labels)


def run_spec(namespace: str, **resources: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "image": TRAINER_IMAGE,
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
        "resources": {"cpu": "1", "memory": "1Gi", "gpus": 1, **resources},
        "terminationGracePeriodSeconds": 10,
        "retries": {"backoffSeconds": 0.5},
    }


@pytest.fixture
def trainer_env(container_kubelet: ContainerKubelet) -> Iterator[ContainerKubelet]:
    """Offline, and 0.2 s per step (the trainer's test hook) so the eviction lands while leg 0 trains."""
    container_kubelet.extra_env.update(OFFLINE_ENV, RELAY_TEST_STEP_SLEEP_S="0.2")
    yield container_kubelet
    container_kubelet.extra_env.clear()


class Runs:
    def __init__(self, kube: kubernetes.client.ApiClient, namespace: str, controller: Any) -> None:
        self.namespace = namespace
        self.controller = controller
        self.custom = kubernetes.client.CustomObjectsApi(kube)
        self.core = kubernetes.client.CoreV1Api(kube)

    async def apply(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": "relay.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": spec}
        await asyncio.to_thread(
            self.custom.create_namespaced_custom_object, "relay.dev", "v1alpha1", self.namespace, "trainingruns", body
        )

    async def until(
        self, name: str, check: Callable[[dict[str, Any]], bool], timeout_s: float, why: Callable[[], str]
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            run = await asyncio.to_thread(
                self.custom.get_namespaced_custom_object, "relay.dev", "v1alpha1", self.namespace, "trainingruns", name
            )
            if check(run):
                return dict(run)
            assert self.controller.error is None, f"the controller crashed: {self.controller.error!r}"
            assert time.monotonic() < deadline, f"timed out; status: {run.get('status')}\n{why()}"
            await asyncio.sleep(0.3)

    async def events(self, name: str) -> list[str]:
        items = await asyncio.to_thread(
            self.core.list_namespaced_event, self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [e.reason for e in items.items]


def phase(*values: str) -> Callable[[dict[str, Any]], bool]:
    return lambda run: (run.get("status") or {}).get("phase") in values


def logs(kubelet: ContainerKubelet, namespace: str, name: str) -> Callable[[], str]:
    def read() -> str:
        pods = [p for p in list(kubelet.pods.values()) if p.namespace == namespace and p.name.startswith(name)]
        return "\n".join(f"--- {p.name}\n{kubelet.pod_log(namespace, p.name)[-3000:]}" for p in pods)

    return read


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_uninterrupted(volume_root: Path, snapshot: str, config: Path, run_dir: Path) -> Path:
    """The reference: the same torch build (the tests' pin) as a bare process, one leg, never interrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE_ENV}
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir),
               "--snapshot", str(volume_root / snapshot), "--config", str(config)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    return run_dir / "final/model.safetensors"


async def test_legs_from_the_image_on_a_root_owned_volume_are_evicted_resume_and_match_the_uninterrupted_weights(
    controller: Any,
    kube: kubernetes.client.ApiClient,
    namespace: str,
    trainer_env: ContainerKubelet,
    volume_root: Path,
    tmp_path: Path,
) -> None:
    runs = Runs(kube, namespace, controller)
    name = f"img-{uuid.uuid4().hex[:6]}"
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")
    assert volume_root.stat().st_uid == 0, "the claim must start as a fresh volume does: owned by root"
    await runs.apply(name, run_spec(namespace))
    run_dir = volume_root / f"runs/{namespace}/{name}"
    why = logs(trainer_env, namespace, name)
    deadline = time.monotonic() + 90
    while not volume.list_checkpoint_dirs(run_dir / "checkpoints"):
        assert time.monotonic() < deadline, f"no checkpoint from leg 0\n{why()}"
        await asyncio.sleep(0.1)

    pods = await asyncio.to_thread(runs.core.list_namespaced_pod, namespace, label_selector=f"job-name={name}-leg-0")
    (pod,) = pods.items
    launched = trainer_env.docker_args[f"{namespace}/{pod.metadata.name}"]
    for flag in ("--read-only", "--user", "1000:1000", "--cap-drop", "ALL", "no-new-privileges", TRAINER_IMAGE):
        assert flag in launched, f"{flag} missing from docker {' '.join(launched)}"
    eviction = {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": pod.metadata.name}}
    await asyncio.to_thread(runs.core.create_namespaced_pod_eviction, pod.metadata.name, namespace, eviction)

    run = await runs.until(name, phase("Succeeded", "Failed"), 180, why)
    status = run["status"]
    assert status["phase"] == "Succeeded", f"{status.get('message')}\n{why()}"
    assert [leg["outcome"] for leg in status["legs"]] == ["preempted", "completed"], status["legs"]
    first, second = status["legs"]
    assert second["startStep"] == first["endStep"] >= 4, "leg 1 did not resume from leg 0's last checkpoint"
    assert status["step"] == STEPS and status["preemptions"] == 1 and status["failures"] == 0
    assert {"LegStarted", "Preempted", "Resumed"} <= set(await runs.events(name))
    # What the UID-1000 container wrote is its own, in the fsGroup the kubelet gave the root-made claim.
    final = run_dir / "final/model.safetensors"
    assert (final.stat().st_uid, final.stat().st_gid) == (1000, 1000)

    reference = train_uninterrupted(
        volume_root, status["snapshot"]["path"], run_dir / "config.json", tmp_path / "reference"
    )
    assert sha256(final) == sha256(reference), "a leg in the image and a bare process differ: not the same torch"


async def test_a_leg_over_its_memory_limit_ends_the_run_failed_with_reason_oomkilled(
    controller: Any,
    kube: kubernetes.client.ApiClient,
    namespace: str,
    trainer_env: ContainerKubelet,
    volume_root: Path,
) -> None:
    """A leg the kernel kills at its own memory limit (exit 137, OOMKilled) is the run's failure, not a free
    preemption: it counts against retries.maxFailures (here 1: one retry), and the run ends Failed naming
    OOMKilled, where the next leg with the same limit would otherwise die the same way up to maxPreemptions."""
    runs = Runs(kube, namespace, controller)
    name = f"oom-{uuid.uuid4().hex[:6]}"
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")
    # 48Mi: importing torch alone takes twice that in anonymous memory, so the kernel kills the leg before its first
    # step (at 96Mi a loaded machine could leave it reclaiming page cache for minutes instead of killing it).
    spec = run_spec(namespace, memory="48Mi")
    spec["retries"] = {"backoffSeconds": 0.5, "maxFailures": 1}
    await runs.apply(name, spec)
    why = logs(trainer_env, namespace, name)

    def ended(run: dict[str, Any]) -> bool:
        return (run.get("status") or {}).get("phase") in ("Failed", "Succeeded")

    run = await runs.until(name, ended, 180, why)
    pods = await asyncio.to_thread(runs.core.list_namespaced_pod, namespace, label_selector=f"job-name={name}-leg-0")
    terminated = pods.items[0].status.container_statuses[0].state.terminated if pods.items else None
    if terminated is not None:  # what the kubelet reported for leg 0, as a kubelet does
        assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled"), terminated
    status = run["status"]
    assert status["phase"] == "Failed", f"phase {status.get('phase')}, {status.get('legCount')} legs, {status}"
    assert "OOMKilled" in status.get("message", ""), status
    assert status["preemptions"] == 0 and status["legCount"] == 2, status


async def test_an_image_that_cannot_be_pulled_is_stuck_with_the_runtime_reason(
    controller: Any,
    kube: kubernetes.client.ApiClient,
    namespace: str,
    trainer_env: ContainerKubelet,
    volume_root: Path,
) -> None:
    runs = Runs(kube, namespace, controller)
    name = f"pull-{uuid.uuid4().hex[:6]}"
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")
    spec = run_spec(namespace)
    spec["image"] = "relay-missing.invalid/relay-trainer:0.0.0"
    spec["retries"] = {"stuckAfterSeconds": 3, "maxFailures": 0}
    await runs.apply(name, spec)
    run = await runs.until(name, phase("Failed", "Succeeded"), 90, logs(trainer_env, namespace, name))
    status = run["status"]
    assert status["phase"] == "Failed", status
    (leg,) = status["legs"]
    assert leg["outcome"] == "stuck", leg
    assert "ErrImagePull" in leg["reason"] and "relay-missing.invalid" in leg["reason"], leg
    assert not [p for p in trainer_env.started if p.startswith(f"{namespace}/")], "no container may start"


async def test_a_leg_that_cannot_write_the_volume_fails_naming_the_path_not_as_a_preemption(
    controller: Any,
    kube: kubernetes.client.ApiClient,
    namespace: str,
    trainer_env: ContainerKubelet,
    volume_root: Path,
) -> None:
    """A volume whose files keep their owner (hostPath, NFS: no fsGroup) and were made by root. The trainer's
    message names the folder, the image's UID that cannot write it, and its owner."""
    runs = Runs(kube, namespace, controller)
    name = f"ro-{uuid.uuid4().hex[:6]}"
    write_reviews(volume_root / f"data/{namespace}/reviews.csv")
    trainer_env.fs_group_on_claims = False
    try:
        spec = run_spec(namespace)
        spec["retries"] = {"maxFailures": 0, "backoffSeconds": 0.5}
        await runs.apply(name, spec)
        run = await runs.until(name, phase("Failed", "Succeeded"), 120, logs(trainer_env, namespace, name))
    finally:
        trainer_env.fs_group_on_claims = True
    status = run["status"]
    assert status["phase"] == "Failed", status
    assert status["preemptions"] == 0, "not retried as a preemption"
    message = status.get("message", "")
    assert f"/relay-volume/runs/{namespace}/{name}: not writable by UID 1000 (GID 1000)" in message, message
    assert "owned by UID 0 " in message, message
    assert status["legs"][0]["outcome"] == "invalid", status["legs"]
