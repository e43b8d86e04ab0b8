"""Record workflow histories for the replay test: `python tests/workflow/record_histories.py`.

Runs the training workflow through its main paths (preempted + failed + completed, an injected
preemption, pause/resume, cancellation, continue-as-new) on a fresh dev server with the fake
activities and stores each history as JSON in tests/workflow/histories/. Re-record only on purpose:
a replay failure after a workflow change means running workflows would break (non-determinism);
version the change with workflow.patched() instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from pathlib import Path

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from workflow_fakes import ScriptedActivities, spec

from controller.messages import PauseRequest, TrainingRunInput
from controller.status import Phase
from controller.workflows import CheckpointedBertTrainingWorkflow

OUT = Path(__file__).resolve().parent / "histories"


def _input(name: str, **overrides: object) -> TrainingRunInput:
    base: dict[str, object] = {"namespace": "default", "name": name, "spec": spec(), "await_window_s": 0.3,
                               "poll_interval_s": 0.05}  # fmt: skip
    return TrainingRunInput(**{**base, **overrides})  # type: ignore[arg-type]


async def _phase(handle: WorkflowHandle, phase: Phase) -> None:
    for _ in range(400):
        if (await handle.query(CheckpointedBertTrainingWorkflow.get_status)).phase == phase:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{handle.id} never reached {phase}")


async def _scenario(client: Client, name: str, outcomes: list[str], **overrides: object) -> WorkflowHandle:
    task_queue = f"record-{uuid.uuid4()}"
    fakes = ScriptedActivities(outcomes)
    async with Worker(client, task_queue=task_queue, workflows=[CheckpointedBertTrainingWorkflow],
                      activities=fakes.all()):  # fmt: skip
        handle = await client.start_workflow(
            CheckpointedBertTrainingWorkflow.run, _input(name, **overrides), id=f"trainingrun-default-{name}",
            task_queue=task_queue,
        )  # fmt: skip
        if "hang" in outcomes:
            await _phase(handle, Phase.RUNNING)
            if name == "pause-resume":
                await handle.signal(CheckpointedBertTrainingWorkflow.pause, PauseRequest(reason="record"))
                await _phase(handle, Phase.PAUSED)
                await handle.signal(CheckpointedBertTrainingWorkflow.resume)
            else:
                await handle.cancel()
        with contextlib.suppress(WorkflowFailureError):
            await handle.result()
    return handle


async def main() -> int:
    OUT.mkdir(exist_ok=True)
    temporal = Path(sys.executable).parent / "temporal"
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(temporal), data_converter=pydantic_data_converter, ui=False
    )
    try:
        scenarios = {
            "preempted-failed-completed": (["preempted", "failed", "completed"], {}),
            "injected-preemption": (["auto", "auto"], {"preempt_at_steps": [5]}),
            "pause-resume": (["hang", "completed"], {}),
            "cancelled": (["hang"], {}),
            "invalid-input": (["invalid"], {}),
            "continue-as-new": (["preempted", "preempted", "completed"], {"legs_per_run": 2}),
        }
        for name, (outcomes, overrides) in scenarios.items():
            handle = await _scenario(env.client, name, outcomes, **overrides)
            # The first run of the chain (continue-as-new leaves later runs with their own histories).
            first = env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
            history = await first.fetch_history()
            (OUT / f"{name}.json").write_text(history.to_json(), encoding="utf-8")
            print(f"recorded {name}: {len(history.events)} events")
    finally:
        await env.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
