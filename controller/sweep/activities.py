"""The sweep's activities on one machine: start a trial's training workflow, watch its eval records at rungs,
pause, resume and cancel it. The Temporal client does the starting and signalling; the volume (history.jsonl,
through trainer.volume.records) tells when a trial evaluated its rung.

On Kubernetes the same four would create a TrainingRun owned by the TrainingSweep (the operator starts its
workflow), patch its spec.suspend, and delete it; the watch is the same volume read plus the run's status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from controller.messages import PauseRequest, ResumeRequest
from controller.status import RunStatus
from controller.sweep.messages import (
    PublishSweepStatusRequest,
    StartTrialRequest,
    SweepActivityInterface,
    TrialRef,
    TrialSignalRequest,
    WatchTrialRequest,
    WatchTrialResult,
)
from controller.visibility import start_attributes
from trainer.volume.layout import RunLayout
from trainer.volume.records import HistoryEntry, read_history

log = logging.getLogger("relay.sweep")

# The objective's value in an "eval" line of history.jsonl, and in the final metrics (where eval_loss is "loss").
_EVAL_FIELD: dict[str, Callable[[HistoryEntry], float | None]] = {
    "eval_loss": lambda entry: entry.eval_loss,
    "accuracy": lambda entry: entry.eval_accuracy,
    "f1_macro": lambda entry: entry.eval_f1_macro,
}
_FINAL_KEYS = {"eval_loss": ("eval_loss", "loss"), "accuracy": ("accuracy",), "f1_macro": ("f1_macro",)}
_CLOSED_PHASE = {
    WorkflowExecutionStatus.CANCELED: "Cancelled",
    WorkflowExecutionStatus.TERMINATED: "Cancelled",
    WorkflowExecutionStatus.FAILED: "Failed",
    WorkflowExecutionStatus.TIMED_OUT: "Failed",
}


def eval_value(entry: HistoryEntry, metric: str) -> float | None:
    """The objective in an eval line of history.jsonl ("eval" during training, or the final evaluation's)."""
    return _EVAL_FIELD[metric](entry)


def rung_metric(entries: list[HistoryEntry], step: int, metric: str) -> float | None:
    """The objective of the newest "eval" line of `step` (a resumed leg may evaluate a step again), or None."""
    value = None
    for entry in entries:
        if entry.event == "eval" and entry.step == step:
            value = eval_value(entry, metric)
    return value


def final_metric(metrics: dict[str, float], metric: str) -> float | None:
    return next((metrics[key] for key in _FINAL_KEYS[metric] if key in metrics), None)


class SweepActivities(SweepActivityInterface):
    def __init__(self, client: Client, volume_root: Path | str) -> None:
        self.client = client
        self.volume_root = Path(volume_root)

    def all(self) -> list[Any]:
        return [self.start_trial, self.watch_trial, self.signal_trial, self.cancel_trial, self.publish_status]

    @activity.defn(name="sweep_publish_status")
    async def publish_status(self, request: PublishSweepStatusRequest) -> None:
        """Locally the status is read through the get_status query; a log line marks each change of the counts."""
        log.info("TrainingSweep %s/%s: %s", request.namespace, request.name, request.status.message)

    @activity.defn(name="sweep_start_trial")
    async def start_trial(self, request: StartTrialRequest) -> None:
        """Start the trial's training workflow; one already under its id (a retried start) is kept."""
        run = request.run_input
        await self.client.start_workflow(
            "CheckpointedBertTrainingWorkflow",
            run,
            id=request.workflow_id,
            task_queue=request.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=await start_attributes(self.client, run.namespace, run.name, run.spec.model),
        )

    @activity.defn(name="sweep_watch_trial")
    async def watch_trial(self, request: WatchTrialRequest) -> WatchTrialResult:
        """Wait until the trial evaluated `stop_at_step` (its rung) or ended; heartbeats while it trains."""
        layout = RunLayout.for_run(self.volume_root, request.namespace, request.name)
        handle = self.client.get_workflow_handle(request.workflow_id)
        while True:
            activity.heartbeat()
            try:
                description = await handle.describe()  # first: an eval line read after it is never missed
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(request.poll_interval_s)  # not started yet (on Kubernetes the operator starts it)
                continue
            if request.stop_at_step is not None:  # the rung first: a trial that ran past it is compared there too
                entries = await asyncio.to_thread(read_history, layout)
                value = rung_metric(entries, request.stop_at_step, request.metric)
                if value is not None:
                    return WatchTrialResult(kind="rung", step=request.stop_at_step, metric=value)
            if description.status != WorkflowExecutionStatus.RUNNING:
                return await self._finished(request, description.status)
            await self._reconcile(request)
            await asyncio.sleep(request.poll_interval_s)

    async def _reconcile(self, request: WatchTrialRequest) -> None:
        """Each poll of a running trial; locally nothing (the signals go straight to the workflow)."""

    async def _finished(self, request: WatchTrialRequest, closed: WorkflowExecutionStatus | None) -> WatchTrialResult:
        handle = self.client.get_workflow_handle(request.workflow_id, result_type=RunStatus)
        if closed == WorkflowExecutionStatus.COMPLETED:
            status: RunStatus = await handle.result()
            return WatchTrialResult(
                kind="finished",
                step=status.step,
                metric=final_metric(status.metrics, request.metric),
                phase=status.phase.value,
                model_path=status.model_path,
                message=status.message,
            )
        try:
            await handle.result()
            message = ""
        except WorkflowFailureError as exc:
            cause: BaseException | None = exc.cause
            while getattr(cause, "cause", None) is not None:
                cause = getattr(cause, "cause", None)
            message = str(getattr(cause, "message", cause))
        phase = _CLOSED_PHASE.get(closed, "Failed") if closed is not None else "Failed"
        return WatchTrialResult(kind="finished", phase=phase, message=message or phase.lower())

    @activity.defn(name="sweep_signal_trial")
    async def signal_trial(self, request: TrialSignalRequest) -> None:
        message = (
            PauseRequest(reason=request.reason) if request.signal == "pause" else ResumeRequest(reason=request.reason)
        )
        try:
            await self.client.get_workflow_handle(request.workflow_id).signal(request.signal, message)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # a trial that already ended takes no signal: nothing to do
                raise

    @activity.defn(name="sweep_cancel_trial")
    async def cancel_trial(self, request: TrialRef) -> bool:
        """Cancel the trial's workflow; False when it had already ended (a trial can finish while it is stopped)."""
        handle = self.client.get_workflow_handle(request.workflow_id)
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return False
        try:
            await handle.cancel()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # ended since: nothing to cancel
                raise
            return False
        return True
