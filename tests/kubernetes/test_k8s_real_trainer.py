"""The real trainer through the operator on envtest: an evicted leg resumes and ends with uninterrupted weights.

Every other cluster test runs the stand-in trainer; here the process kubelet runs the pod's own command,
`python -m trainer train` (tiny BERT, one torch thread), on a small generated csv dataset on the volume.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_k8s_operator import Cluster, first_checkpoint, phase
from test_k8s_operator import controller as controller  # the operator fixture, shared

from controller.snapshot import write_rows_file
from relay_testing.control_plane import assets_dir
from relay_testing.process_kubelet import ProcessKubelet

pytestmark = [pytest.mark.cluster, pytest.mark.anyio]
STEPS = 16
POSITIVE = ["great", "superb", "lovely", "moving", "brilliant", "charming"]
NEGATIVE = ["awful", "dull", "boring", "clumsy", "tedious", "bland"]
FILLER = ["the", "film", "plot", "actors", "story", "was", "and", "a", "scene", "ending"]
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


@pytest.fixture
def real_kubelet(kubelet: ProcessKubelet) -> Iterator[ProcessKubelet]:
    """The kubelet running each pod's own command: `python -m trainer`, not the stand-in."""
    saved = dict(kubelet.extra_env)
    kubelet.module_map = {}
    kubelet.extra_env.update(OFFLINE_ENV)
    yield kubelet
    kubelet.extra_env.clear()
    kubelet.extra_env.update(saved)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_uninterrupted(volume_root: Path, snapshot: str, config: Path, run_dir: Path) -> Path:
    """The reference: the same trainer, snapshot and config.json, one process, never interrupted."""
    env = {"OMP_NUM_THREADS": "1", **OFFLINE_ENV}
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir),
               "--snapshot", str(volume_root / snapshot), "--config", str(config)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    return run_dir / "final/model.safetensors"


def kubectl() -> str:
    for candidate in (assets_dir() / "kubectl", Path(sys.executable).parent / "kubectl"):
        if candidate.exists():
            return str(candidate.resolve())
    found = shutil.which("kubectl")
    assert found, "no kubectl in .envtest, the venv or PATH"
    return found


async def test_real_trainer_evicted_after_its_first_checkpoint_resumes_to_the_uninterrupted_weights(
    controller: Any,
    control_plane: Any,
    kube: Any,
    namespace: str,
    real_kubelet: ProcessKubelet,
    volume_root: Path,
    tmp_path: Path,
) -> None:
    cluster = Cluster(kube, namespace)
    name = f"real-{uuid.uuid4().hex[:6]}"
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
        "retries": {"backoffSeconds": 0.5},
    }
    await cluster.apply(name, spec)
    run_dir = volume_root / f"runs/{namespace}/{name}"
    await first_checkpoint(
        run_dir / "checkpoints", timeout_s=40, why=lambda: real_kubelet.pod_log(namespace, f"{name}-leg-0")
    )
    (pod,) = await cluster.pods(f"{name}-leg-0")
    eviction = {"apiVersion": "policy/v1beta1", "kind": "Eviction", "metadata": {"name": pod.metadata.name}}
    await asyncio.to_thread(cluster.core.create_namespaced_pod_eviction, pod.metadata.name, namespace, eviction)

    run = await cluster.until(name, phase("Succeeded"), timeout_s=60)
    status = run["status"]
    assert [leg["outcome"] for leg in status["legs"]] == ["preempted", "completed"], status["legs"]
    first, second = status["legs"]
    assert first["startStep"] == 0 and first["endStep"] >= 4
    assert second["startStep"] == first["endStep"], "leg 1 did not resume from leg 0's last checkpoint"
    assert second["endStep"] == STEPS and status["step"] == STEPS
    assert status["preemptions"] == 1 and status["failures"] == 0 and status["legCount"] == 2
    assert 0.0 <= status["metrics"]["accuracy"] <= 1.0
    started = sorted(p for p in real_kubelet.started if p.startswith(f"{namespace}/{name}-"))
    assert [p.split("/")[1].rsplit("-", 1)[0] for p in started] == [f"{name}-leg-0", f"{name}-leg-1"]

    reasons = await cluster.events(name)
    assert {"LegStarted", "Preempted", "Resumed"} <= set(reasons), reasons
    # Each leg's output is on the volume too (legs/<n>.log, what `relay logs` prints once the pods are gone).
    kept = [(run_dir / "legs" / f"{leg}.log").read_text(encoding="utf-8") for leg in (0, 1)]
    assert all("checkpoint step-" in text for text in kept), kept
    assert f"step {STEPS}/{STEPS}" in kept[1] and f"step {STEPS}/{STEPS}" not in kept[0]

    listing = subprocess.run(
        [kubectl(), "--kubeconfig", str(control_plane.kubeconfig), "-n", namespace, "get", "trainingruns"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    for column in ("NAME", "PHASE", "PROGRESS", "STEP", "LEGS", "PREEMPTIONS", "CHECKPOINT AGE", "AGE"):
        assert column in header, header
    assert row.split()[:6] == [name, "Succeeded", "100%", str(STEPS), "2", "1"], row

    reference = train_uninterrupted(
        volume_root, status["snapshot"]["path"], run_dir / "config.json", tmp_path / "reference"
    )
    assert sha256(run_dir / "final/model.safetensors") == sha256(reference)
