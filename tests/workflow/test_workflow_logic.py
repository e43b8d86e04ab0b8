"""The training workflow's decisions on the real Temporal dev server, with fake activities under the real names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from workflow_fakes import ScriptedActivities, spec

from controller.messages import PauseRequest, ResumeRequest, TrainingRunInput
from controller.status import CheckpointStatus, Phase, RunStatus
from controller.workflows import BertInferenceWorkflow, CheckpointedBertTrainingWorkflow

pytestmark = pytest.mark.anyio


def _input(**overrides: object) -> TrainingRunInput:
    base: dict[str, object] = {
        "namespace": "default",
        "name": f"run-{uuid.uuid4().hex[:8]}",
        "spec": spec(),
        "await_window_s": 0.3,
        "poll_interval_s": 0.05,
        "heartbeat_timeout_s": 10,
    }
    return TrainingRunInput(**{**base, **overrides})  # type: ignore[arg-type]


def _worker(client: Client, task_queue: str, fakes: ScriptedActivities) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[CheckpointedBertTrainingWorkflow, BertInferenceWorkflow],
        activities=fakes.all(),
    )


async def _start(client: Client, task_queue: str, run_input: TrainingRunInput) -> WorkflowHandle:
    return await client.start_workflow(
        CheckpointedBertTrainingWorkflow.run,
        run_input,
        id=f"trainingrun-{run_input.namespace}-{run_input.name}",
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        execution_timeout=timedelta(minutes=2),
    )


async def _status(handle: WorkflowHandle) -> RunStatus:
    return await handle.query(CheckpointedBertTrainingWorkflow.get_status)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_preempted_and_failed_legs_resume_until_completion(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["preempted", "failed", "completed"])
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input())
        result = await handle.result()
        status = await _status(handle)
        latest = await handle.query(CheckpointedBertTrainingWorkflow.get_latest_checkpoint)
    assert result.phase == Phase.SUCCEEDED and status.phase == Phase.SUCCEEDED
    assert [leg.outcome for leg in status.legs] == ["preempted", "failed", "completed"]
    assert [leg.start_step for leg in status.legs] == [0, 10, 20]
    assert [leg.end_step for leg in status.legs] == [10, 20, 30]
    assert (status.preemptions, status.failures) == (1, 1)
    assert status.metrics == {"accuracy": 0.875}
    assert status.model_path and status.model_path.endswith("/final")
    assert status.progress == 1.0 and status.step == 30
    assert isinstance(latest, CheckpointStatus) and latest.step == 30
    assert sorted(fakes.records) == [0, 1, 2] and fakes.records[0].outcome == "preempted"
    assert {"Preempted", "Resumed", "LegFailed", "Succeeded"} <= set(fakes.events)
    assert status.condition("Succeeded") is not None and status.condition("Succeeded").status == "True"  # type: ignore[union-attr]
    assert fakes.cleaned


async def test_injected_preemptions_are_each_used_once(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["auto", "auto", "auto"])
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input(preempt_at_steps=[15, 5]))
        status = await handle.result()
    assert [leg.outcome for leg in status.legs] == ["preempted", "preempted", "completed"]
    assert [leg.end_step for leg in status.legs] == [5, 15, 25]
    assert "injected preemption at step 5" in status.legs[0].reason
    firsts = {}
    for request in fakes.await_requests:
        firsts.setdefault(request.leg.leg, request.preempt_at_steps)
    assert firsts == {0: [5, 15], 1: [15], 2: []}


async def test_invalid_input_stops_without_retry(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["invalid", "completed"])
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input())
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await _status(handle)
    assert status.phase == Phase.FAILED
    assert fakes.launched == [0]
    failed = status.condition("Failed")
    assert failed is not None and failed.reason == "InvalidInput"
    assert "rejected its input" in status.message


@pytest.mark.parametrize(
    ("outcomes", "retries", "reason", "legs"),
    [
        (["failed", "failed", "completed"], {"max_failures": 1}, "FailureBudgetExhausted", 2),
        (["preempted", "preempted", "completed"], {"max_preemptions": 1}, "PreemptionBudgetExhausted", 2),
    ],
)
async def test_budgets_are_separate_and_enforced(
    temporal_env: WorkflowEnvironment, task_queue: str, outcomes: list[str], retries: dict, reason: str, legs: int
):
    fakes = ScriptedActivities(outcomes)
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input(spec=spec(**retries)))
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await _status(handle)
    assert status.phase == Phase.FAILED and len(fakes.launched) == legs
    assert status.condition("Failed").reason == reason  # type: ignore[union-attr]


async def test_invalid_dataset_fails_before_any_leg(temporal_env: WorkflowEnvironment, task_queue: str):
    message = "dataset.labelField: label 7 outside [0, 2) (spec.training.numLabels=2)"
    fakes = ScriptedActivities(["completed"], snapshot_error=message)
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input())
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await _status(handle)
    assert status.phase == Phase.FAILED and status.message == message
    assert fakes.launched == []


async def test_pause_checkpoints_and_holds_until_resume(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["hang", "completed"])
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input())

        async def running() -> bool:
            return (await _status(handle)).phase == Phase.RUNNING

        await _until(running)
        await handle.signal(CheckpointedBertTrainingWorkflow.pause, PauseRequest(reason="test"))

        async def paused() -> bool:
            return (await _status(handle)).phase == Phase.PAUSED

        await _until(paused)
        await asyncio.sleep(1.0)  # no new leg while paused
        status = await _status(handle)
        assert fakes.stopped == [0] and fakes.launched == [0]
        assert status.legs[0].outcome == "paused" and status.preemptions == 0
        assert status.condition("Suspended").status == "True"  # type: ignore[union-attr]
        await handle.signal(CheckpointedBertTrainingWorkflow.resume, ResumeRequest())
        final = await handle.result()
    assert final.phase == Phase.SUCCEEDED
    assert [leg.outcome for leg in final.legs] == ["paused", "completed"]
    assert final.legs[1].start_step == final.legs[0].end_step
    assert final.condition("Suspended").status == "False"  # type: ignore[union-attr]


async def test_suspended_spec_starts_paused(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["completed"])
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input(spec=spec().model_copy(update={"suspend": True})))

        async def paused() -> bool:
            return (await _status(handle)).phase == Phase.PAUSED

        await _until(paused)
        assert fakes.launched == []
        await handle.signal(CheckpointedBertTrainingWorkflow.resume)
        assert (await handle.result()).phase == Phase.SUCCEEDED


async def test_cancel_stops_the_leg_and_keeps_checkpoints(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["hang"])
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input())

        async def running() -> bool:
            return (await _status(handle)).phase == Phase.RUNNING

        await _until(running)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await _status(handle)
        described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.CANCELED
    assert status.phase == Phase.CANCELLED and fakes.stopped == [0]
    assert fakes.records[0].outcome == "cancelled"
    assert not fakes.cleaned  # nothing on the volume is removed


async def test_continue_as_new_keeps_state(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["preempted"] * 4 + ["completed"], steps_per_leg=5)
    async with _worker(temporal_env.client, task_queue, fakes):
        handle = await _start(temporal_env.client, task_queue, _input(legs_per_run=2, spec=spec()))
        first_run = handle.first_execution_run_id or (await handle.describe()).run_id
        status = await handle.result()
        final_run = (await temporal_env.client.get_workflow_handle(handle.id).describe()).run_id
    assert final_run != first_run  # continued as new (twice: after legs 2 and 4)
    assert [leg.leg for leg in status.legs] == [0, 1, 2, 3, 4]
    assert status.preemptions == 4 and status.phase == Phase.SUCCEEDED
    assert fakes.launched == [0, 1, 2, 3, 4]


async def test_same_run_started_twice_is_one_workflow(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = ScriptedActivities(["hang"])
    async with _worker(temporal_env.client, task_queue, fakes):
        run_input = _input()
        first = await _start(temporal_env.client, task_queue, run_input)
        second = await _start(temporal_env.client, task_queue, run_input)
        assert first.result_run_id == second.result_run_id
        await first.cancel()  # at once, likely while the dataset is being snapshotted
        with pytest.raises(WorkflowFailureError):
            await first.result()
        status = await _status(first)
    assert status.phase == Phase.CANCELLED
