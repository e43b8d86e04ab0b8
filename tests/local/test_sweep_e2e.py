"""A TrainingSweep end to end on one machine: the real sweep workflow, the real training workflows of its trials,
LocalBackend and the real trainer (tiny BERT). ASHA stops every trial at its rung; the better half is promoted
and resumes from its checkpoint (a leg that starts at a step above zero), the rest are pruned; the best trial is
reported with its metric and model. A trial preempted (a real SIGTERM) before its rung resumes from its
checkpoint and is compared at the rung like the others."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from controller.backends.local import LocalBackend
from controller.spec import workflow_id
from controller.status import RunStatus
from controller.sweep.messages import SweepInput
from controller.sweep.spec import SweepStatus, parse_training_sweep, sweep_workflow_id
from controller.sweep.workflow import TrainingSweepWorkflow
from controller.worker import build_worker

pytestmark = pytest.mark.anyio

MIN_STEPS, MAX_STEPS = 12, 24
PREEMPT_AT = 4
# A tiny step takes milliseconds; a pause or a preemption reaches the trainer a few workflow tasks later (seen
# to take over a second at load 8 on 2 cores, letting a trial run past its rung to its end). At 0.15 s a step,
# the 12 steps between rung and end give 1.8 s: the trial stops where the test looks (+7 s wall).
STEP_SLEEP = {"RELAY_TEST_STEP_SLEEP_S": "0.15"}


def _sweep(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "relay.dev/v1alpha1",
        "kind": "TrainingSweep",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "model": "tiny",
                "dataset": {"source": "demo", "maxRows": 400, "evalFraction": 0.25},
                "training": {"batchSize": 8, "maxSeqLength": 32, "checkpointEverySteps": 100, "logEverySteps": 1},
                "resources": {"cpu": "1"},
                "retries": {"backoffSeconds": 0},
            },
            "searchSpace": {"learningRate": {"type": "choice", "values": [3e-3, 1e-3, 1e-4, 1e-6]}},
            "algorithm": "grid",
            "maxConcurrentTrials": 2,
            "objective": {"metric": "eval_loss", "goal": "minimize"},
            "asha": {"minSteps": MIN_STEPS, "maxSteps": MAX_STEPS, "reductionFactor": 2},
        },
    }


@pytest.mark.slow
async def test_asha_sweep_prunes_promotes_from_checkpoints_and_reports_the_best(
    temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    name = f"sw-{uuid.uuid4().hex[:6]}"
    sweep = parse_training_sweep(_sweep(name))
    client = temporal_env.client
    started = time.monotonic()
    async with build_worker(client, LocalBackend(tmp_path, extra_env=STEP_SLEEP), tmp_path, task_queue=task_queue):
        handle = await client.start_workflow(
            TrainingSweepWorkflow.run,
            SweepInput(
                namespace="default",
                name=name,
                spec=sweep.spec,
                trial_task_queue=task_queue,
                trial_await_window_s=1.0,
                trial_poll_interval_s=0.05,
                trial_heartbeat_timeout_s=5.0,
                watch_poll_interval_s=0.1,
                trial_preempt_at_steps={f"{name}-t000": [PREEMPT_AT]},
            ),
            id=sweep_workflow_id("default", name),
            task_queue=task_queue,
        )
        status: SweepStatus = await asyncio.wait_for(handle.result(), 240)
        # Deterministic: the recorded history replays on this code (the workflow sandbox, as the worker runs it).
        replayer = Replayer(workflows=[TrainingSweepWorkflow], data_converter=client.data_converter)
        await replayer.replay_workflow(await handle.fetch_history())
        trials = {}
        for trial in status.trials:
            trial_handle = client.get_workflow_handle(workflow_id("default", trial.name), result_type=RunStatus)
            trials[trial.name] = await trial_handle.query("get_status", result_type=RunStatus)
    elapsed = time.monotonic() - started
    print(f"sweep took {elapsed:.1f} s", [(t.name, t.state, t.step, t.rung_metrics, t.resumes) for t in status.trials])
    assert status.phase == "Succeeded", status.message
    assert status.trial_count == 4 and len(status.trials) == 4
    states = sorted(t.state for t in status.trials)
    assert "pruned" in states and "completed" in states and "running" not in states and "waiting" not in states
    assert status.pruned + status.completed == 4
    for trial in status.trials:  # every trial was evaluated at the first rung
        assert str(MIN_STEPS) in trial.rung_metrics, trial
    promoted = [t for t in status.trials if t.resumes > 0]
    assert promoted
    for trial in promoted:  # stopped at the rung (its leg paused at a checkpoint), then resumed from it
        legs = trials[trial.name].legs
        assert legs[0].start_step == 0
        paused = [i for i, leg in enumerate(legs) if leg.outcome == "paused"]
        assert paused and paused[0] + 1 < len(legs), legs
        resumed = legs[paused[0] + 1]
        assert resumed.start_step == legs[paused[0]].end_step and resumed.start_step >= MIN_STEPS, legs
    for trial in status.trials:
        if trial.state == "pruned":
            assert trials[trial.name].phase.value == "Cancelled"
            assert trial.step == MIN_STEPS or trial.resumes > 0
    preempted = trials[f"{name}-t000"]
    assert preempted.preemptions == 1 and preempted.legs[0].outcome == "preempted"
    assert PREEMPT_AT <= preempted.legs[1].start_step < MIN_STEPS  # resumed before its rung, not from zero
    completed = [t for t in status.trials if t.state == "completed"]
    for trial in completed:
        assert trial.step == MAX_STEPS and trial.model_path == f"runs/default/{trial.name}/final"
        assert (tmp_path / trial.model_path / "model.safetensors").is_file()
    best = status.best
    assert best is not None and best.metric == "eval_loss"
    assert best.value == min(t.metric for t in completed if t.metric is not None)
    assert best.name in {t.name for t in completed} and best.model_path == f"runs/default/{best.name}/final"
    assert best.params["learningRate"] != 1e-6  # the learning rate that does not learn never wins
