"""`relay pause`, `relay resume` and `relay status` against a running workflow on the session's dev server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from workflow_fakes import ScriptedActivities, spec

from controller.messages import TrainingRunInput
from controller.spec import workflow_id
from controller.status import Phase
from controller.workflows import CheckpointedBertTrainingWorkflow

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]


async def relay(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "controller.cli", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60, cwd=REPO)


async def test_pause_resume_and_status_from_the_command_line(temporal_env: WorkflowEnvironment, task_queue: str):
    address = temporal_env.client.service_client.config.target_host
    name = f"cli-{uuid.uuid4().hex[:6]}"
    fakes = ScriptedActivities(["hang", "completed"])
    run_input = TrainingRunInput(namespace="default", name=name, spec=spec(), await_window_s=0.3, poll_interval_s=0.05)
    async with Worker(
        temporal_env.client, task_queue=task_queue, workflows=[CheckpointedBertTrainingWorkflow], activities=fakes.all()
    ):
        handle = await temporal_env.client.start_workflow(
            CheckpointedBertTrainingWorkflow.run, run_input, id=workflow_id("default", name), task_queue=task_queue
        )
        for _ in range(200):
            if (await handle.query(CheckpointedBertTrainingWorkflow.get_status)).phase == Phase.RUNNING:
                break
            await asyncio.sleep(0.05)
        paused = await relay("pause", name, "--address", address)
        assert paused.returncode == 0 and f"pause sent to {workflow_id('default', name)}" in paused.stdout
        for _ in range(200):
            if (await handle.query(CheckpointedBertTrainingWorkflow.get_status)).phase == Phase.PAUSED:
                break
            await asyncio.sleep(0.05)
        shown = await relay("status", name, "--address", address)
        assert shown.returncode == 0 and "Paused: paused (relay pause)" in shown.stdout
        assert fakes.stopped == [0]
        resumed = await relay("resume", name, "--address", address)
        assert resumed.returncode == 0
        final = await handle.result()
    assert final.phase == Phase.SUCCEEDED and [leg.outcome for leg in final.legs] == ["paused", "completed"]
    unknown = await relay("pause", "no-such-run", "--address", address)
    assert unknown.returncode == 1 and unknown.stderr.startswith("relay: no running TrainingRun default/no-such-run")
