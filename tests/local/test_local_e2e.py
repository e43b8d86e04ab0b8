"""End to end on one machine: the real workflow, real activities, LocalBackend and the real trainer (tiny BERT).

A run preempted twice by real SIGTERMs resumes from its checkpoints and ends with the same final
weights as an uninterrupted run; a worker SIGKILLed mid-leg is replaced and the run completes with no
duplicate leg.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
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
from trainer.volume import read_json

pytestmark = pytest.mark.anyio


def _spec(max_steps: int) -> TrainingRunSpec:
    document = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "e2e"},
        "spec": {
            "model": "tiny",
            "dataset": {"source": "demo", "maxRows": 400, "evalFraction": 0.25},
            "training": {
                "maxSteps": max_steps,
                "batchSize": 8,
                "maxSeqLength": 32,
                "checkpointEverySteps": 25,
                "logEverySteps": 1,
                "learningRate": 1e-3,
            },
            "resources": {"cpu": "1"},
            "retries": {"backoffSeconds": 0},
            "terminationGracePeriodSeconds": 30,
        },
    }
    return parse_training_run(document).spec


def _input(name: str, spec: TrainingRunSpec, preempt: list[int] | None = None) -> TrainingRunInput:
    return TrainingRunInput(
        namespace="default",
        name=name,
        spec=spec,
        preempt_at_steps=preempt or [],
        await_window_s=1.0,
        poll_interval_s=0.05,
        heartbeat_timeout_s=3.0,
    )


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


def _train_uninterrupted(volume: Path, snapshot: str, config: Path) -> Path:
    run_dir = volume / "runs/default/reference"
    run_dir.mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir), "--snapshot", str(volume / snapshot),
         "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir / "final/model.safetensors"


@pytest.mark.slow
async def test_preempted_twice_resumes_to_identical_weights(
    temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
):
    name = f"twice-{uuid.uuid4().hex[:6]}"
    backend = LocalBackend(tmp_path)
    async with build_worker(temporal_env.client, backend, tmp_path, task_queue=task_queue):
        handle = await _start(temporal_env.client, task_queue, _input(name, _spec(160), preempt=[40, 100]))
        status: RunStatus = await asyncio.wait_for(handle.result(), 240)
    assert status.phase == Phase.SUCCEEDED, status.message
    assert [leg.outcome for leg in status.legs] == ["preempted", "preempted", "completed"]
    first, second, third = status.legs
    assert "injected preemption at step 40" in first.reason and "exit 75" in first.reason
    assert first.start_step == 0 and first.end_step is not None and first.end_step >= 40
    assert second.start_step == first.end_step and second.end_step is not None and second.end_step >= 100
    assert third.start_step == second.end_step and third.end_step == 160
    assert status.preemptions == 2 and status.failures == 0 and status.step == 160
    assert 0.0 <= status.metrics["accuracy"] <= 1.0
    run_dir = tmp_path / "runs/default" / name
    for leg in status.legs:  # legs/<n>.json written on the volume agrees with the status
        record = read_json(run_dir / "legs" / f"{leg.leg}.json")
        assert (record["startStep"], record["endStep"], record["outcome"]) == (
            leg.start_step,
            leg.end_step,
            leg.outcome,
        )
    assert status.snapshot is not None
    reference = _train_uninterrupted(tmp_path, status.snapshot.path, run_dir / "config.json")
    assert _sha256(run_dir / "final/model.safetensors") == _sha256(reference)


@pytest.mark.slow
async def test_worker_killed_mid_leg_is_replaced_without_a_duplicate_leg(
    temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
):
    address = temporal_env.client.service_client.config.target_host
    command = [sys.executable, "-m", "controller.cli", "worker", "--address", address, "--volume", str(tmp_path),
               "--task-queue", task_queue]  # fmt: skip
    name = f"restart-{uuid.uuid4().hex[:6]}"
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    replacement: subprocess.Popen[bytes] | None = None
    try:
        handle = await _start(temporal_env.client, task_queue, _input(name, _spec(600)))
        deadline = time.monotonic() + 120
        while True:
            status = await handle.query(CheckpointedBertTrainingWorkflow.get_status)
            if status.phase == Phase.RUNNING and status.step >= 20:
                break
            assert time.monotonic() < deadline, f"leg did not start: {status.message}"
            await asyncio.sleep(0.1)
        backend = LocalBackend(tmp_path)
        assert backend.alive_legs("default", name) == [0]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        assert backend.alive_legs("default", name) == [0]  # the leg outlives its worker, like a pod
        replacement = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        status = await asyncio.wait_for(handle.result(), 180)
    finally:
        for process in (worker, replacement):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert status.phase == Phase.SUCCEEDED, status.message
    assert [(leg.leg, leg.outcome) for leg in status.legs] == [(0, "completed")]
    assert status.preemptions == 0 and status.failures == 0 and status.step == 600
    legs_dir = tmp_path / "runs/default" / name / "legs"
    assert sorted(p.name for p in legs_dir.glob("*.pid.json")) == ["0.pid.json"]


def test_activities_never_import_torch():
    modules = "controller.cli, controller.worker, controller.activities, controller.snapshot, controller.backends.local"
    code = f"import sys, {modules}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
