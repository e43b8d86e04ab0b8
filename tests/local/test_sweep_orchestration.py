"""The sweep workflow's orchestration on the real Temporal dev server, its activities swapped for fakes registered
under the real names: trials arrive at rungs in a scripted order with scripted metrics, so ASHA's promotions, the
concurrency bound, pruning, continue-as-new, a failed trial, a trial that finished before it could stop,
suspending and cancelling the sweep are each provoked and checked in well under a second of workflow time."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from controller.sweep.messages import (
    PublishSweepStatusRequest,
    StartTrialRequest,
    SweepInput,
    TrialRef,
    TrialSignalRequest,
    WatchTrialRequest,
    WatchTrialResult,
)
from controller.sweep.spec import SweepStatus, parse_training_sweep, sweep_workflow_id
from controller.sweep.workflow import TrainingSweepWorkflow

pytestmark = pytest.mark.anyio

# Trial i: its eval_loss at the rung (step 10) and at the end (step 20), and how long it takes to reach the rung.
RUNG = {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.9}
END = {0: 0.45, 1: 0.35, 2: 0.2, 3: 0.8}
DELAY = {0: 0.1, 1: 0.6, 2: 1.2, 3: 1.6}  # arrivals at the rung 0.5 s or more apart


class FakeTrials:
    """Stand-ins for the four sweep activities: a trial 'trains' by sleeping, and the calls are recorded."""

    def __init__(self, failing: set[int] | None = None, done_early: set[int] | None = None) -> None:
        self.failing, self.done_early = failing or set(), done_early or set()
        self.started: list[str] = []
        self.signals: list[tuple[str, str]] = []
        self.cancelled: list[str] = []
        self.training: set[str] = set()
        self.most_at_once = 0
        self.max_steps: list[int | None] = []
        self.published: list[SweepStatus] = []
        self.eval_every: list[int | None] = []

    def _index(self, name: str) -> int:
        return int(name.rsplit("-t", 1)[1])

    def _train(self, name: str) -> None:
        self.training.add(name)
        self.most_at_once = max(self.most_at_once, len(self.training))

    @activity.defn(name="sweep_start_trial")
    async def start_trial(self, request: StartTrialRequest) -> None:
        name = request.run_input.name
        training = request.run_input.spec.training
        self.max_steps.append(training.max_steps)
        self.eval_every.append(training.eval_every_steps)
        if name not in self.started:
            self.started.append(name)
            self._train(name)

    @activity.defn(name="sweep_watch_trial")
    async def watch_trial(self, request: WatchTrialRequest) -> WatchTrialResult:
        index = self._index(request.name)
        if index in self.failing:
            await asyncio.sleep(DELAY[index])
            self.training.discard(request.name)
            return WatchTrialResult(kind="finished", phase="Failed", message="leg failed 4 times")
        if request.stop_at_step is not None:
            await asyncio.sleep(DELAY[index])
            return WatchTrialResult(kind="rung", step=request.stop_at_step, metric=RUNG[index])
        await asyncio.sleep(0.1)
        self.training.discard(request.name)
        path = f"runs/default/{request.name}/final"
        return WatchTrialResult(kind="finished", phase="Succeeded", step=20, metric=END[index], model_path=path)

    @activity.defn(name="sweep_signal_trial")
    async def signal_trial(self, request: TrialSignalRequest) -> None:
        name = request.workflow_id.split(".", 1)[1]
        self.signals.append((name, request.signal))
        if request.signal == "pause":
            self.training.discard(name)
        else:
            self._train(name)

    @activity.defn(name="sweep_cancel_trial")
    async def cancel_trial(self, request: TrialRef) -> bool:
        name = request.workflow_id.split(".", 1)[1]
        self.cancelled.append(name)
        self.training.discard(name)
        return self._index(name) not in self.done_early

    @activity.defn(name="sweep_publish_status")
    async def publish_status(self, request: PublishSweepStatusRequest) -> None:
        self.published.append(request.status)

    def all(self) -> list[Any]:
        return [self.start_trial, self.watch_trial, self.signal_trial, self.cancel_trial, self.publish_status]


def _input(name: str, asha: bool = True, **changes: Any) -> SweepInput:
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
    if not asha:
        document["spec"]["asha"] = None
        document["spec"]["template"]["training"] = {"maxSteps": 20}
    spec = parse_training_sweep(document).spec
    return SweepInput(namespace="default", name=name, spec=spec, trial_task_queue="unused", **changes)


async def _run(
    env: WorkflowEnvironment, task_queue: str, fakes: FakeTrials, asha: bool = True, **changes: Any
) -> tuple[SweepStatus, str]:
    name = f"sw-{uuid.uuid4().hex[:6]}"
    async with Worker(env.client, task_queue=task_queue, workflows=[TrainingSweepWorkflow], activities=fakes.all()):
        handle = await env.client.start_workflow(
            TrainingSweepWorkflow.run,
            _input(name, asha, **changes),
            id=sweep_workflow_id("default", name),
            task_queue=task_queue,
        )
        return await asyncio.wait_for(handle.result(), 30), handle.first_execution_run_id or ""


def _states(status: SweepStatus) -> list[str]:
    return [trial.state for trial in status.trials]


async def test_asha_promotes_the_better_half_in_arrival_order_and_prunes_the_rest(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    fakes = FakeTrials()
    status, _ = await _run(temporal_env, task_queue, fakes)
    # t0 waits alone; t1 (0.4) beats it at n=2 and goes on; at n=4 the top two are t2 (0.3) and t1: t2 goes on.
    assert _states(status) == ["pruned", "completed", "completed", "pruned"]
    assert [t.resumes for t in status.trials] == [0, 1, 1, 0]
    assert fakes.started == [f"{status.trials[i].name}" for i in range(4)]
    assert fakes.most_at_once == 2  # maxConcurrentTrials
    paused = [name for name, signal in fakes.signals if signal == "pause"]
    resumed = [name for name, signal in fakes.signals if signal == "resume"]
    assert sorted(paused) == sorted(fakes.started) and resumed == [status.trials[1].name, status.trials[2].name]
    assert fakes.cancelled == [status.trials[0].name, status.trials[3].name]
    assert status.phase == "Succeeded" and (status.pruned, status.completed, status.running) == (2, 2, 0)
    assert status.best is not None and status.best.name == status.trials[2].name and status.best.value == END[2]
    assert status.best.model_path == f"runs/default/{status.trials[2].name}/final"
    assert status.trials[0].rung_metrics == {"10": RUNG[0]}
    assert status.best_text == f"{status.trials[2].name} eval_loss=0.2"
    assert fakes.max_steps == [20] * 4 and fakes.eval_every == [10] * 4  # ASHA's budget; every rung evaluated
    assert fakes.published[-1] == status  # what .status shows on Kubernetes: the final state, counts included
    assert [p.running for p in fakes.published].count(2) >= 1 and all(p.running <= 2 for p in fakes.published)
    assert len(fakes.published) == len({p.model_dump_json() for p in fakes.published})  # only changes published


async def test_without_asha_every_trial_runs_to_its_end(temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    fakes = FakeTrials()
    status, _ = await _run(temporal_env, task_queue, fakes, asha=False)
    assert _states(status) == ["completed"] * 4 and fakes.signals == [] and fakes.cancelled == []
    assert fakes.most_at_once == 2 and fakes.eval_every == [None] * 4
    assert status.best is not None and status.best.name == status.trials[2].name and status.best.value == END[2]


async def test_a_suspended_sweep_starts_nothing_until_resumed(temporal_env: WorkflowEnvironment, task_queue: str):
    fakes = FakeTrials()
    name = f"sw-{uuid.uuid4().hex[:6]}"
    suspended = _input(name)
    suspended = suspended.model_copy(update={"spec": suspended.spec.model_copy(update={"suspend": True})})
    async with Worker(
        temporal_env.client, task_queue=task_queue, workflows=[TrainingSweepWorkflow], activities=fakes.all()
    ):
        handle = await temporal_env.client.start_workflow(
            TrainingSweepWorkflow.run, suspended, id=sweep_workflow_id("default", name), task_queue=task_queue
        )
        await asyncio.sleep(1.0)
        status = await handle.query(TrainingSweepWorkflow.get_status)
        assert status.phase == "Paused" and fakes.started == []
        await handle.signal(TrainingSweepWorkflow.resume)
        status = await asyncio.wait_for(handle.result(), 30)
    assert status.phase == "Succeeded" and _states(status) == ["pruned", "completed", "completed", "pruned"]


async def test_continue_as_new_hands_on_the_whole_state(temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    status, first_run = await _run(temporal_env, task_queue, FakeTrials(), results_per_run=1)
    assert _states(status) == ["pruned", "completed", "completed", "pruned"]
    assert status.best is not None and status.best.value == END[2]
    first = temporal_env.client.get_workflow_handle(status.workflow_id or "", run_id=first_run)
    assert (await first.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW


async def test_a_failed_trial_is_counted_and_the_sweep_goes_on(temporal_env: WorkflowEnvironment, task_queue: str):
    status, _ = await _run(temporal_env, task_queue, FakeTrials(failing={1}))
    assert status.trials[1].state == "failed" and status.trials[1].message == "leg failed 4 times"
    assert status.failed == 1 and status.phase == "Succeeded" and status.completed >= 1


async def test_a_sweep_whose_every_trial_failed_fails(temporal_env: WorkflowEnvironment, task_queue: str) -> None:
    status, _ = await _run(temporal_env, task_queue, FakeTrials(failing={0, 1, 2, 3}))
    assert status.phase == "Failed" and status.failed == 4 and status.best is None
    assert status.message == f"every trial failed; {status.trials[0].name}: leg failed 4 times"


async def test_a_trial_that_finished_before_it_stopped_counts_as_completed(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    fakes = FakeTrials(done_early={3})  # its leg reached the end before the pause took: nothing left to cancel
    status, _ = await _run(temporal_env, task_queue, fakes)
    assert _states(status) == ["pruned", "completed", "completed", "completed"]
    assert (status.trials[3].metric == END[3] and status.trials[3].message == "Succeeded") or status.trials[
        3
    ].step == 20


async def test_suspend_pauses_the_running_trials_and_cancel_cancels_them(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    fakes = FakeTrials()
    name = f"sw-{uuid.uuid4().hex[:6]}"
    slow = {**DELAY}
    DELAY.update({0: 5.0, 1: 5.0})  # both first trials stay in training while the sweep is suspended and cancelled
    try:
        async with Worker(
            temporal_env.client, task_queue=task_queue, workflows=[TrainingSweepWorkflow], activities=fakes.all()
        ):
            handle = await temporal_env.client.start_workflow(
                TrainingSweepWorkflow.run, _input(name), id=sweep_workflow_id("default", name), task_queue=task_queue
            )
            while len(fakes.started) < 2:
                await asyncio.sleep(0.05)
            await handle.signal(TrainingSweepWorkflow.pause)
            while len(fakes.signals) < 2:
                await asyncio.sleep(0.05)
            assert (await handle.query(TrainingSweepWorkflow.get_status)).phase == "Paused"
            await handle.signal(TrainingSweepWorkflow.resume)
            while len(fakes.signals) < 4:
                await asyncio.sleep(0.05)
            await handle.cancel()
            with pytest.raises(WorkflowFailureError):
                await asyncio.wait_for(handle.result(), 30)
            status = await handle.query(TrainingSweepWorkflow.get_status)
    finally:
        DELAY.update(slow)
    trials = [status.trials[0].name, status.trials[1].name]
    assert fakes.signals == [(trials[0], "pause"), (trials[1], "pause"), (trials[0], "resume"), (trials[1], "resume")]
    assert fakes.cancelled == trials  # deleting the sweep cancels its trials
    assert status.phase == "Cancelled" and _states(status)[:2] == ["cancelled", "cancelled"]
    assert _states(status)[2:] == ["pending", "pending"]  # none started while suspended or after
