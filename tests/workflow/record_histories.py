"""Record workflow histories for the replay test: `python tests/workflow/record_histories.py`.

Runs the training workflow through its main paths (preempted + failed + completed, an injected
preemption, pause/resume, cancellation, continue-as-new) and the sweep workflow through ASHA (4 trials,
2 at once: paused at the rung, promoted, pruned, the best reported; suspended and resumed on the way) on a
fresh dev server with fake activities, and stores each history as JSON in tests/workflow/histories/.
`python tests/workflow/record_histories.py NAME...` records only those (e.g. `sweep-asha`). Re-record only on
purpose: a replay failure after a workflow change means running workflows would break (non-determinism);
version the change with workflow.patched() instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from workflow_fakes import ScriptedActivities, spec

from controller.messages import PauseRequest, TrainingRunInput
from controller.status import Phase
from controller.sweep.messages import (
    PublishSweepStatusRequest,
    StartTrialRequest,
    SweepInput,
    TrialRef,
    TrialSignalRequest,
    WatchTrialRequest,
    WatchTrialResult,
)
from controller.sweep.spec import parse_training_sweep, sweep_workflow_id
from controller.sweep.workflow import TrainingSweepWorkflow
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


class ScriptedTrials:
    """The sweep's activities, under their real names: trial i reaches the rung after DELAY[i] s with RUNG[i]."""

    RUNG = {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.9}
    END = {0: 0.45, 1: 0.35, 2: 0.2, 3: 0.8}
    DELAY = {0: 0.1, 1: 0.6, 2: 1.2, 3: 1.6}

    @activity.defn(name="sweep_start_trial")
    async def start_trial(self, request: StartTrialRequest) -> None:
        return None

    @activity.defn(name="sweep_watch_trial")
    async def watch_trial(self, request: WatchTrialRequest) -> WatchTrialResult:
        index = int(request.name.rsplit("-t", 1)[1])
        if request.stop_at_step is not None:
            await asyncio.sleep(self.DELAY[index])
            return WatchTrialResult(kind="rung", step=request.stop_at_step, metric=self.RUNG[index])
        await asyncio.sleep(0.1)
        path = f"runs/default/{request.name}/final"
        return WatchTrialResult(kind="finished", phase="Succeeded", step=20, metric=self.END[index], model_path=path)

    @activity.defn(name="sweep_signal_trial")
    async def signal_trial(self, request: TrialSignalRequest) -> None:
        return None

    @activity.defn(name="sweep_cancel_trial")
    async def cancel_trial(self, request: TrialRef) -> bool:
        return True

    @activity.defn(name="sweep_publish_status")
    async def publish_status(self, request: PublishSweepStatusRequest) -> None:
        return None

    def all(self) -> list[Any]:
        return [self.start_trial, self.watch_trial, self.signal_trial, self.cancel_trial, self.publish_status]


def _sweep_input(name: str) -> SweepInput:
    document: dict[str, Any] = {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {"dataset": {"source": "demo"}},
            "searchSpace": {"learningRate": {"type": "choice", "values": [1e-3, 1e-4, 1e-5, 1e-6]}},
            "algorithm": "grid",
            "maxConcurrentTrials": 2,
            "objective": {"metric": "eval_loss", "goal": "minimize"},
            "asha": {"minSteps": 10, "maxSteps": 20, "reductionFactor": 2},
        },
    }
    spec = parse_training_sweep(document).spec
    return SweepInput(namespace="default", name=name, spec=spec, trial_task_queue="unused", watch_poll_interval_s=0.05)


async def _sweep_scenario(client: Client, name: str) -> WorkflowHandle:
    task_queue = f"record-{uuid.uuid4()}"
    async with Worker(client, task_queue=task_queue, workflows=[TrainingSweepWorkflow],
                      activities=ScriptedTrials().all()):  # fmt: skip
        handle = await client.start_workflow(
            TrainingSweepWorkflow.run, _sweep_input(name), id=sweep_workflow_id("default", name), task_queue=task_queue
        )
        await asyncio.sleep(0.3)  # both first trials training
        await handle.signal(TrainingSweepWorkflow.pause)
        await asyncio.sleep(0.3)
        await handle.signal(TrainingSweepWorkflow.resume)
        status = await asyncio.wait_for(handle.result(), 60)
        assert status.phase == "Succeeded" and status.pruned >= 1 and status.completed >= 1, status
    return handle


async def main(only: list[str]) -> int:
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
            if only and name not in only:
                continue
            handle = await _scenario(env.client, name, outcomes, **overrides)
            # The first run of the chain (continue-as-new leaves later runs with their own histories).
            first = env.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
            history = await first.fetch_history()
            (OUT / f"{name}.json").write_text(history.to_json(), encoding="utf-8")
            print(f"recorded {name}: {len(history.events)} events")
        if not only or "sweep-asha" in only:
            handle = await _sweep_scenario(env.client, "sweep-asha")
            history = await env.client.get_workflow_handle(
                handle.id, run_id=handle.first_execution_run_id
            ).fetch_history()
            (OUT / "sweep-asha.json").write_text(history.to_json(), encoding="utf-8")
            print(f"recorded sweep-asha: {len(history.events)} events")
    finally:
        await env.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
