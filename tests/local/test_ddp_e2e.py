"""A data-parallel run end to end on one machine (issue 14): the real workflow, LocalBackend and the real trainer
with `resources.processes: 2` (two ranks through torchrun, gloo over loopback). The injected preemption's SIGTERM
reaches both ranks through the leg's supervisor, they save one checkpoint and exit 75 (counted a preemption, not a
failure), and the next leg resumes from it and completes with the weights of an uninterrupted 2-process leg."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment

from controller.backends.local import LocalBackend
from controller.spec import TrainingRunSpec, parse_training_run, workflow_id
from controller.status import Phase, RunStatus
from controller.worker import build_worker
from controller.workflows import CheckpointedBertTrainingWorkflow, TrainingRunInput

# ~1 minute: `make drill` runs it (pytest -m drill), so that make test stays under 20 minutes on 2 cores.
pytestmark = [pytest.mark.anyio, pytest.mark.drill]

STEPS = 30


def _spec() -> TrainingRunSpec:
    document = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "ddp"},
        "spec": {
            "model": "tiny",
            "dataset": {"source": "demo", "maxRows": 200, "evalFraction": 0.2},
            "training": {
                "maxSteps": STEPS,
                "batchSize": 4,
                "maxSeqLength": 32,
                "checkpointEverySteps": 10,
                "logEverySteps": 1,
                "learningRate": 1e-3,
            },
            "resources": {"cpu": "1", "processes": 2},
            "retries": {"backoffSeconds": 0},
            "terminationGracePeriodSeconds": 30,
        },
    }
    return parse_training_run(document).spec


async def _start(client: Client, task_queue: str, run_input: TrainingRunInput) -> WorkflowHandle:
    return await client.start_workflow(
        CheckpointedBertTrainingWorkflow.run,
        run_input,
        id=workflow_id(run_input.namespace, run_input.name),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
async def test_two_process_run_preempted_resumes_to_identical_weights(
    temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    name = f"ddp-{uuid.uuid4().hex[:6]}"
    run_input = TrainingRunInput(
        namespace="default",
        name=name,
        spec=_spec(),
        preempt_at_steps=[12],
        await_window_s=1.0,
        poll_interval_s=0.05,
        heartbeat_timeout_s=5.0,
    )
    async with build_worker(temporal_env.client, LocalBackend(tmp_path), tmp_path, task_queue=task_queue):
        handle = await _start(temporal_env.client, task_queue, run_input)
        status: RunStatus = await asyncio.wait_for(handle.result(), 240)
    assert status.phase == Phase.SUCCEEDED, status.message
    assert [leg.outcome for leg in status.legs] == ["preempted", "completed"]
    first, second = status.legs
    assert "exit 75" in first.reason and first.end_step is not None and first.end_step >= 12
    assert second.start_step == first.end_step and second.end_step == STEPS
    assert status.preemptions == 1 and status.failures == 0
    run_dir = tmp_path / "runs/default" / name
    leg_log = (run_dir / "legs/0.log").read_text(encoding="utf-8")
    assert "data-parallel: 2 process(es), 1 micro-batch(es) of 4 each per step: global batch 8" in leg_log

    assert status.snapshot is not None
    reference = tmp_path / "reference"
    snapshot = str(tmp_path / status.snapshot.path)
    command = [sys.executable, "-m", "trainer", "train", "--run-dir", str(reference), "--snapshot", snapshot,
               "--config", str(run_dir / "config.json"), "--processes", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _sha256(run_dir / "final/model.safetensors") == _sha256(reference / "final/model.safetensors")
