"""Long waits in seconds of real time: exponential backoff between failed legs on the time-skipping test server."""

from __future__ import annotations

import time
import uuid

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from workflow_fakes import ScriptedActivities, spec

from controller.messages import TrainingRunInput
from controller.status import Phase
from controller.workflows import CheckpointedBertTrainingWorkflow

pytestmark = pytest.mark.anyio


async def test_failure_backoff_doubles_up_to_its_cap(time_skipping_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["failed", "failed", "failed", "completed"])
    run_input = TrainingRunInput(
        namespace="default",
        name=f"backoff-{uuid.uuid4().hex[:6]}",
        spec=spec(max_failures=3, backoff_seconds=600, max_backoff_seconds=1500),
        await_window_s=0.2,
        poll_interval_s=0.05,
    )
    started = time.monotonic()
    async with Worker(
        time_skipping_env.client,
        task_queue=task_queue,
        workflows=[CheckpointedBertTrainingWorkflow],
        activities=fakes.all(),
    ):
        status = await time_skipping_env.client.execute_workflow(
            CheckpointedBertTrainingWorkflow.run,
            run_input,
            id=f"trainingrun-default-{run_input.name}",
            task_queue=task_queue,
        )
    assert status.phase == Phase.SUCCEEDED and status.failures == 3
    gaps = [later - earlier for earlier, later in zip(fakes.launch_times, fakes.launch_times[1:], strict=False)]
    for gap, backoff in zip(gaps, [600, 1200, 1500], strict=True):  # 600, doubled, then capped at 1500
        assert backoff <= gap < backoff + 30, gaps
    assert time.monotonic() - started < 60  # almost an hour of backoff, skipped


async def test_exhausted_failure_budget_after_long_backoffs(time_skipping_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["failed"] * 3)
    run_input = TrainingRunInput(
        namespace="default",
        name=f"exhaust-{uuid.uuid4().hex[:6]}",
        spec=spec(max_failures=2, backoff_seconds=3600, max_backoff_seconds=86_400),
        await_window_s=0.2,
        poll_interval_s=0.05,
    )
    async with Worker(
        time_skipping_env.client,
        task_queue=task_queue,
        workflows=[CheckpointedBertTrainingWorkflow],
        activities=fakes.all(),
    ):
        handle = await time_skipping_env.client.start_workflow(
            CheckpointedBertTrainingWorkflow.run,
            run_input,
            id=f"trainingrun-default-{run_input.name}",
            task_queue=task_queue,
        )
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await handle.query(CheckpointedBertTrainingWorkflow.get_status)
    assert status.phase == Phase.FAILED and status.failures == 3 and len(fakes.launched) == 3
    assert fakes.launch_times[2] - fakes.launch_times[0] >= 3 * 3600  # 1 h, then 2 h of backoff
