"""Fake activities under the real names, for testing the workflow's decisions without processes or data.

Each leg ends as scripted: "completed", "preempted", "failed", "invalid" (the trainer's exit codes,
classified by the real `classify_termination`), "auto" (preempted at the next requested preemption
step inside the leg, else completed), or "hang" (runs until stop_leg is called for it, then exits 75
like a trainer that checkpointed on SIGTERM).
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from controller.leg_model import LegHandle, LegObservation, LegState, LegTermination, classify_termination
from controller.messages import (
    AwaitLegRequest,
    AwaitLegResult,
    EvaluateResult,
    LaunchLegRequest,
    LaunchLegResult,
    LegProgress,
    PrepareRunRequest,
    PrepareRunResult,
    PublishStatusRequest,
    RecordLegRequest,
    RunRef,
    SnapshotRequest,
    SnapshotResult,
    StopLegRequest,
)
from controller.spec import DatasetSpec, RetrySpec, TrainingRunSpec
from controller.status import CheckpointStatus, LegStatus, RunStatus
from trainer.config import TrainingSettings

EXIT = {"completed": 0, "preempted": 75, "failed": 1, "invalid": 65}


def spec(**retries: Any) -> TrainingRunSpec:
    return TrainingRunSpec(
        dataset=DatasetSpec(source="demo"),
        training=TrainingSettings(max_steps=30),
        retries=RetrySpec(**{"backoff_seconds": 0.0, **retries}),
        termination_grace_period_seconds=5,
    )


class ScriptedActivities:
    def __init__(self, outcomes: list[str], steps_per_leg: int = 10, snapshot_error: str | None = None) -> None:
        self.outcomes = outcomes
        self.steps_per_leg = steps_per_leg
        self.snapshot_error = snapshot_error
        self.step = 0
        self.launched: list[int] = []
        self.launch_times: list[float] = []
        self.await_requests: list[AwaitLegRequest] = []
        self.stopped: list[int] = []
        self.records: dict[int, LegStatus] = {}
        self.published: list[RunStatus] = []
        self.events: list[str] = []
        self.cleaned = False
        self._ends: dict[int, tuple[str, int, int | None]] = {}

    def all(self) -> list[Any]:
        return [
            self.snapshot_dataset,
            self.prepare_run,
            self.launch_leg,
            self.await_leg,
            self.stop_leg,
            self.record_leg,
            self.publish_status,
            self.evaluate,
            self.cleanup_run,
        ]

    @activity.defn(name="snapshot_dataset")
    async def snapshot_dataset(self, request: SnapshotRequest) -> SnapshotResult:
        if self.snapshot_error:
            raise ApplicationError(self.snapshot_error, type="InvalidDataset", non_retryable=True)
        return SnapshotResult(sha256="ab" * 32, path="snapshots/" + "ab" * 32, rows={"train": 80, "eval": 20},
                              fields=["text", "label"], reused=False)  # fmt: skip

    @activity.defn(name="prepare_run")
    async def prepare_run(self, request: PrepareRunRequest) -> PrepareRunResult:
        return PrepareRunResult(run_path=f"runs/{request.namespace}/{request.name}", config_path="c.json",
                                total_steps=request.spec.training.max_steps, latest_checkpoint=None)  # fmt: skip

    @activity.defn(name="launch_leg")
    async def launch_leg(self, request: LaunchLegRequest) -> LaunchLegResult:
        leg = request.leg.leg
        if leg not in self.launched:
            self.launched.append(leg)
            self.launch_times.append(activity.info().current_attempt_scheduled_time.timestamp())
        handle = LegHandle(leg=leg, backend_id=f"fake:{leg}", started_at=0.0)
        return LaunchLegResult(handle=handle, start_step=self.step, started_at="2026-01-01T00:00:00Z")

    def _progress(self, step: int) -> LegProgress:
        checkpoint = CheckpointStatus(step=step, path=f"ck/{step}") if step else None
        return LegProgress(step=step, total_steps=None, latest_checkpoint=checkpoint, loss=0.5)

    @activity.defn(name="await_leg")
    async def await_leg(self, request: AwaitLegRequest) -> AwaitLegResult:
        leg = request.leg.leg
        self.await_requests.append(request)
        if leg not in self._ends:
            outcome = self.outcomes[leg]
            end, injected = self.step + self.steps_per_leg, None
            if outcome == "auto":
                due = [s for s in request.preempt_at_steps if self.step < s <= end]
                outcome, end, injected = ("preempted", min(due), min(due)) if due else ("completed", end, None)
            self._ends[leg] = (outcome, end, injected)
        outcome, end, injected = self._ends[leg]
        if outcome == "hang":
            deadline = asyncio.get_running_loop().time() + request.max_wait_s
            while leg not in self.stopped:
                if asyncio.get_running_loop().time() > deadline:
                    return AwaitLegResult(terminated=False, progress=self._progress(self.step + 1))
                await asyncio.sleep(0.02)
            outcome = "preempted"
        self.step = end
        termination = LegTermination(exit_code=EXIT[outcome])
        return AwaitLegResult(terminated=True, outcome=classify_termination(termination), termination=termination,
                              detail=f"exit {EXIT[outcome]}", progress=self._progress(end),
                              injected_preempt_at=injected)  # fmt: skip

    @activity.defn(name="stop_leg")
    async def stop_leg(self, request: StopLegRequest) -> LegObservation:
        self.stopped.append(request.leg.leg)
        return LegObservation(state=LegState.TERMINATED, termination=LegTermination(exit_code=75))

    @activity.defn(name="record_leg")
    async def record_leg(self, request: RecordLegRequest) -> None:
        self.records[request.record.leg] = request.record

    @activity.defn(name="publish_status")
    async def publish_status(self, request: PublishStatusRequest) -> None:
        self.published.append(request.status)
        self.events += [e.reason for e in request.events]

    @activity.defn(name="evaluate")
    async def evaluate(self, request: RunRef) -> EvaluateResult:
        return EvaluateResult(metrics={"accuracy": 0.875}, model_path=f"runs/{request.namespace}/{request.name}/final")

    @activity.defn(name="cleanup_run")
    async def cleanup_run(self, request: RunRef) -> None:
        self.cleaned = True
