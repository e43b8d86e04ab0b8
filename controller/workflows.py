"""The Temporal workflows: CheckpointedBertTrainingWorkflow (one per TrainingRun) and BertInferenceWorkflow.

Deterministic orchestration only; every side effect is an activity (controller/activities.py). The
training workflow snapshots the dataset, then runs legs until one completes: launch, watch (heartbeats
carry the newest checkpoint), classify, decide (resume after a preemption, back off after a failure,
stop on invalid input), then verifies the final model and records its held-out metrics. All state lives
in one `WorkflowState` handed on at continue-as-new (every `legs_per_run` legs, or when Temporal
suggests it), so history stays bounded for week-long runs.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import timedelta

from pydantic import BaseModel, Field
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from controller.activities import (
        AwaitLegRequest,
        AwaitLegResult,
        EvaluateResult,
        LaunchLegRequest,
        LaunchLegResult,
        LegProgress,
        PredictRequest,
        PredictResult,
        PrepareRunRequest,
        PrepareRunResult,
        PublishStatusRequest,
        RecordLegRequest,
        RunRef,
        SnapshotRequest,
        SnapshotResult,
        StopLegRequest,
    )
    from controller.backends.base import LegOutcomeKind, LegSpec
    from controller.spec import TrainingRunSpec
    from controller.status import (
        CheckpointStatus,
        LegStatus,
        Phase,
        RunEvent,
        RunStatus,
        SnapshotStatus,
        rfc3339,
    )

TRAINING_RUN_FAILED = "TrainingRunFailed"
MAX_LEGS_IN_STATE = 200  # legs kept in the workflow's status across continue-as-new (all are on the volume)


class WorkflowState(BaseModel):
    """Everything the training workflow knows; handed on whole at continue-as-new."""

    status: RunStatus
    snapshot: SnapshotResult | None = None
    prepared: PrepareRunResult | None = None
    next_leg: int = 0
    pending_preempts: list[int] = Field(default_factory=list)
    paused: bool = False
    pause_reason: str = ""


class TrainingRunInput(BaseModel):
    """Start (or continue) the workflow of one TrainingRun."""

    namespace: str
    name: str
    spec: TrainingRunSpec
    owner_uid: str | None = None
    # Demo/test preemptions: SIGTERM the running leg when it reports reaching each of these steps (once each).
    preempt_at_steps: list[int] = Field(default_factory=list)
    legs_per_run: int = Field(20, ge=1, description="Continue-as-new after this many legs.")
    await_window_s: float = Field(10.0, gt=0, description="How often the workflow refreshes its status.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often await_leg looks at the leg and the volume.")
    heartbeat_timeout_s: float = Field(30.0, gt=0)
    state: WorkflowState | None = None


class PauseRequest(BaseModel):
    reason: str = "requested"


class ResumeRequest(BaseModel):
    reason: str = "requested"


class _RunFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _reraise_cancellation(error: BaseException) -> None:
    """An activity error caused by the workflow's own cancellation must cancel the workflow, not be handled."""
    if is_cancelled_exception(error):
        raise asyncio.CancelledError() from error


def _non_retryable_message(error: ActivityError) -> str | None:
    """The message of an activity's non-retryable ApplicationError (bad input), else None."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.non_retryable:
        return cause.message
    return None


@workflow.defn(name="CheckpointedBertTrainingWorkflow")
class CheckpointedBertTrainingWorkflow:
    def __init__(self) -> None:
        self._state: WorkflowState | None = None
        self._events: list[RunEvent] = []
        self._published: RunStatus | None = None

    # ------------------------------------------------------------ queries and signals

    @workflow.query(name="get_status")
    def get_status(self) -> RunStatus:
        return self._state.status if self._state else RunStatus(phase=Phase.PENDING, message="starting")

    @workflow.query(name="get_latest_checkpoint")
    def get_latest_checkpoint(self) -> CheckpointStatus | None:
        return self._state.status.latest_checkpoint if self._state else None

    @workflow.signal(name="pause")
    def pause(self, request: PauseRequest | None = None) -> None:
        if self._state and not self._state.paused and not self._state.status.phase.finished:
            self._state.paused = True
            self._state.pause_reason = (request or PauseRequest()).reason
            self._event("Normal", "PauseRequested", f"pause requested ({self._state.pause_reason})")

    @workflow.signal(name="resume")
    def resume(self, request: ResumeRequest | None = None) -> None:
        if self._state and self._state.paused:
            self._state.paused = False
            self._event("Normal", "ResumeRequested", f"resume requested ({(request or ResumeRequest()).reason})")

    # ------------------------------------------------------------ the run

    @workflow.run
    async def run(self, run_input: TrainingRunInput) -> RunStatus:
        self._input = run_input
        if run_input.state is None:
            status = RunStatus(workflow_id=workflow.info().workflow_id, started_at=self._now(), message="accepted")
            status.set_condition("Ready", "False", "Pending", "accepted", self._now())
            self._state = WorkflowState(
                status=status,
                pending_preempts=sorted(set(run_input.preempt_at_steps)),
                paused=run_input.spec.suspend,
                pause_reason="spec.suspend" if run_input.spec.suspend else "",
            )
        else:
            self._state = run_input.state
        state = self._state
        legs_this_run = 0
        current: LegSpec | None = None
        try:
            await self._snapshot_and_prepare()
            while True:
                if state.paused:
                    await self._wait_while_paused()
                if legs_this_run >= run_input.legs_per_run:
                    self._continue_as_new()
                current = self._leg_spec(state.next_leg)
                finished = await self._run_leg(current)
                current = None
                legs_this_run += 1
                if finished:
                    break
            await self._evaluate()
        except _RunFailed as failure:
            await self._fail(failure.reason, failure.message)
            raise ApplicationError(failure.message, type=TRAINING_RUN_FAILED, non_retryable=True) from None
        except (asyncio.CancelledError, ActivityError) as error:
            if not is_cancelled_exception(error):
                raise
            await self._cancelled(current)
            raise asyncio.CancelledError() from None
        return state.status

    async def _snapshot_and_prepare(self) -> None:
        state, spec = self._require_state(), self._input.spec
        ref = {"namespace": self._input.namespace, "name": self._input.name}
        if state.snapshot is None:
            self._set_phase(Phase.SNAPSHOTTING, "snapshotting the dataset")
            await self._publish()
            try:
                state.snapshot = await workflow.execute_activity(
                    "snapshot_dataset",
                    SnapshotRequest(**ref, dataset=spec.dataset, num_labels=spec.training.num_labels),
                    result_type=SnapshotResult,
                    start_to_close_timeout=timedelta(hours=6),
                    heartbeat_timeout=timedelta(minutes=1),
                    retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(minutes=2)),
                )
            except ActivityError as error:
                _reraise_cancellation(error)
                message = _non_retryable_message(error) or f"snapshot failed: {error.cause}"
                raise _RunFailed("InvalidDataset", message) from None
            snap = state.snapshot
            state.status.snapshot = SnapshotStatus(
                sha256=snap.sha256, path=snap.path, rows=snap.rows, reused=snap.reused
            )
            verb = "reused verified" if snap.reused else "wrote"
            rows = ", ".join(f"{k}={v}" for k, v in snap.rows.items())
            self._event("Normal", "SnapshotReady", f"{verb} snapshot {snap.sha256[:12]} ({rows})")
        if state.prepared is None:
            try:
                state.prepared = await workflow.execute_activity(
                    "prepare_run",
                    PrepareRunRequest(**ref, spec=spec, snapshot=state.snapshot),
                    result_type=PrepareRunResult,
                    start_to_close_timeout=timedelta(minutes=2),
                    retry_policy=RetryPolicy(maximum_attempts=5),
                )
            except ActivityError as error:
                _reraise_cancellation(error)
                raise _RunFailed("PrepareFailed", f"could not write the run's config: {error.cause}") from None
            state.status.total_steps = state.prepared.total_steps
            state.next_leg = max(state.next_leg, state.prepared.next_leg)
            if state.prepared.latest_checkpoint is not None:
                state.status.latest_checkpoint = state.prepared.latest_checkpoint
                state.status.step = state.prepared.latest_checkpoint.step
                self._update_progress_fraction()

    def _leg_spec(self, leg: int) -> LegSpec:
        state = self._require_state()
        scheduling = self._input.spec.scheduling
        fallback = (
            scheduling.fallback is not None
            and scheduling.fallback_after_preemptions is not None
            and state.status.preemptions >= scheduling.fallback_after_preemptions
        )
        assert state.snapshot is not None and state.prepared is not None
        return LegSpec(
            namespace=self._input.namespace,
            name=self._input.name,
            leg=leg,
            run_path=state.prepared.run_path,
            snapshot_path=state.snapshot.path,
            spec=self._input.spec,
            use_fallback_profile=fallback,
            owner_uid=self._input.owner_uid,
        )

    async def _run_leg(self, leg: LegSpec) -> bool:
        """Run one leg to its end and decide what comes next; True when training is complete."""
        state, run_input = self._require_state(), self._input
        grace = float(run_input.spec.termination_grace_period_seconds)
        try:
            launched = await workflow.execute_activity(
                "launch_leg",
                LaunchLegRequest(leg=leg),
                result_type=LaunchLegResult,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=30)),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            record = LegStatus(leg=leg.leg, started_at=self._now())
            state.status.legs.append(record)
            await self._after_failure(leg, record, LegOutcomeKind.FAILED, f"could not launch: {error.cause}")
            return False
        record = self._leg_started(leg, launched)
        await self._publish()

        stop_sent = False

        def should_wake(handle: asyncio.Future[AwaitLegResult], stop_sent: bool) -> bool:
            return handle.done() or (state.paused and not stop_sent)

        while True:
            handle = workflow.start_activity(
                "await_leg",
                AwaitLegRequest(
                    leg=leg,
                    preempt_at_steps=list(state.pending_preempts),
                    max_wait_s=run_input.await_window_s,
                    poll_interval_s=run_input.poll_interval_s,
                    grace_s=grace,
                ),
                result_type=AwaitLegResult,
                start_to_close_timeout=timedelta(seconds=run_input.await_window_s + 2 * grace + 120),
                heartbeat_timeout=timedelta(seconds=run_input.heartbeat_timeout_s),
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
            )
            await workflow.wait_condition(functools.partial(should_wake, handle, stop_sent))
            if not handle.done():
                stop_sent = True
                self._event("Normal", "Pausing", f"leg {leg.leg}: SIGTERM, waiting for its checkpoint")
                await workflow.execute_activity(
                    "stop_leg",
                    StopLegRequest(leg=leg, grace_s=grace),
                    start_to_close_timeout=timedelta(seconds=2 * grace + 120),
                    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
                )
            result = await handle
            self._apply_progress(result.progress)
            if result.injected_preempt_at is not None and result.injected_preempt_at in state.pending_preempts:
                state.pending_preempts.remove(result.injected_preempt_at)
            if result.terminated:
                break
            await self._publish()
            if workflow.info().is_continue_as_new_suggested():
                self._continue_as_new()  # the new run adopts the running leg (launch is idempotent)

        assert result.outcome is not None
        record.end_step = result.progress.latest_checkpoint.step if result.progress.latest_checkpoint else None
        record.ended_at = self._now()
        state.status.current_leg = None
        state.next_leg = leg.leg + 1
        outcome, detail = result.outcome, result.detail
        if result.injected_preempt_at is not None and outcome == LegOutcomeKind.PREEMPTED:
            detail = f"injected preemption at step {result.injected_preempt_at}: {detail}"

        if outcome == LegOutcomeKind.COMPLETED:
            self._finish_record(record, "completed", detail)
            self._event("Normal", "LegCompleted", f"leg {leg.leg} completed training at step {state.status.step}")
            await self._record(record)
            return True
        if stop_sent and outcome in (LegOutcomeKind.PREEMPTED, LegOutcomeKind.FAILED):
            self._finish_record(record, "paused", f"paused ({state.pause_reason}): {detail}")
            self._event("Normal", "Paused", f"leg {leg.leg} stopped at checkpoint step {record.end_step}")
            await self._record(record)
            return False
        if outcome == LegOutcomeKind.PREEMPTED:
            state.status.preemptions += 1
            self._finish_record(record, "preempted", detail)
            where = f"checkpoint step {record.end_step}" if record.end_step is not None else "the start"
            self._event("Warning", "Preempted", f"leg {leg.leg} preempted ({detail}); resuming from {where}")
            await self._record(record)
            budget = run_input.spec.retries.max_preemptions
            if state.status.preemptions > budget:
                raise _RunFailed("PreemptionBudgetExhausted", f"more than {budget} preemptions (maxPreemptions)")
            return False
        if outcome == LegOutcomeKind.INVALID:
            self._finish_record(record, "invalid", detail)
            await self._record(record)
            raise _RunFailed("InvalidInput", f"leg {leg.leg}: the trainer rejected its input ({detail})")
        await self._after_failure(leg, record, outcome, detail)
        return False

    async def _after_failure(self, leg: LegSpec, record: LegStatus, outcome: LegOutcomeKind, detail: str) -> None:
        """Count a failed or stuck leg against maxFailures and back off exponentially before the next."""
        state, retries = self._require_state(), self._input.spec.retries
        state.status.failures += 1
        state.status.current_leg = None
        state.next_leg = leg.leg + 1
        record.ended_at = record.ended_at or self._now()
        self._finish_record(record, "stuck" if outcome == LegOutcomeKind.STUCK else "failed", detail)
        await self._record(record)
        if state.status.failures > retries.max_failures:
            raise _RunFailed("FailureBudgetExhausted", f"leg {leg.leg} failed ({detail}); maxFailures exhausted")
        backoff = min(retries.backoff_seconds * 2 ** (state.status.failures - 1), retries.max_backoff_seconds)
        self._event("Warning", "LegFailed", f"leg {leg.leg} failed ({detail}); retrying in {backoff:g}s")
        state.status.message = f"leg {leg.leg} failed; next leg in {backoff:g}s"
        await self._publish()
        if backoff > 0:
            await workflow.sleep(timedelta(seconds=backoff))

    async def _wait_while_paused(self) -> None:
        state = self._require_state()
        self._set_phase(Phase.PAUSED, f"paused ({state.pause_reason})")
        state.status.set_condition("Suspended", "True", "Paused", state.pause_reason, self._now())
        await self._publish()
        await workflow.wait_condition(lambda: not state.paused)
        state.status.set_condition("Suspended", "False", "Resumed", "", self._now())
        self._event("Normal", "Resumed", f"resuming from checkpoint step {state.status.step}")

    async def _evaluate(self) -> None:
        state = self._require_state()
        self._set_phase(Phase.EVALUATING, "verifying the final model and its held-out metrics")
        await self._publish()
        ref = RunRef(namespace=self._input.namespace, name=self._input.name)
        try:
            result = await workflow.execute_activity(
                "evaluate",
                ref,
                result_type=EvaluateResult,
                start_to_close_timeout=timedelta(minutes=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            message = _non_retryable_message(error) or f"evaluation failed: {error.cause}"
            raise _RunFailed("EvaluationFailed", message) from None
        state.status.metrics = result.metrics
        state.status.model_path = result.model_path
        if state.status.total_steps:
            state.status.step = max(state.status.step, state.status.total_steps)
        state.status.progress = 1.0
        state.status.finished_at = self._now()
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
        self._set_phase(Phase.SUCCEEDED, f"finished: {summary}")
        state.status.set_condition("Succeeded", "True", "Succeeded", summary, self._now())
        state.status.set_condition("Ready", "False", "Finished", "training finished", self._now())
        self._event("Normal", "Succeeded", f"final model at {result.model_path}; {summary}")
        try:
            await workflow.execute_activity(
                "cleanup_run",
                ref,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            workflow.logger.warning("cleanup of leg objects failed; they are harmless leftovers")
        await self._publish()

    async def _fail(self, reason: str, message: str) -> None:
        state = self._require_state()
        state.status.finished_at = self._now()
        state.status.current_leg = None
        self._set_phase(Phase.FAILED, message)
        state.status.set_condition("Failed", "True", reason, message, self._now())
        state.status.set_condition("Ready", "False", reason, message, self._now())
        self._event("Warning", reason, message)
        await self._publish()

    async def _cancelled(self, leg: LegSpec | None) -> None:
        """Stop the running leg (it checkpoints on SIGTERM); checkpoints stay on the volume."""
        state = self._require_state()
        grace = self._input.spec.termination_grace_period_seconds
        if leg is not None and state.status.current_leg == leg.leg:
            try:
                await workflow.execute_activity(
                    "stop_leg",
                    StopLegRequest(leg=leg, grace_s=float(grace)),
                    start_to_close_timeout=timedelta(seconds=2 * grace + 120),
                    retry_policy=RetryPolicy(maximum_attempts=5),
                )
            except ActivityError:
                workflow.logger.warning("could not stop leg %d on cancellation", leg.leg)
            record = next((r for r in state.status.legs if r.leg == leg.leg), None)
            if record is not None:
                record.ended_at = self._now()
                self._finish_record(record, "cancelled", "workflow cancelled")
                await self._record(record)
        state.status.current_leg = None
        state.status.finished_at = self._now()
        self._set_phase(Phase.CANCELLED, "cancelled; checkpoints kept")
        state.status.set_condition("Ready", "False", "Cancelled", "cancelled", self._now())
        self._event("Normal", "Cancelled", "run cancelled; checkpoints kept on the volume")
        await self._publish()

    # ------------------------------------------------------------ status bookkeeping

    def _leg_started(self, leg: LegSpec, launched: LaunchLegResult) -> LegStatus:
        state = self._require_state()
        existing = next((r for r in state.status.legs if r.leg == leg.leg), None)
        if existing is not None:  # adopted after continue-as-new or a worker restart
            existing.backend_id = launched.handle.backend_id
            record = existing
        else:
            record = LegStatus(
                leg=leg.leg,
                start_step=launched.start_step,
                started_at=launched.started_at,
                backend_id=launched.handle.backend_id,
            )
            state.status.legs.append(record)
            state.status.legs = state.status.legs[-MAX_LEGS_IN_STATE:]
            if launched.handle.adopted:
                self._event("Normal", "LegAdopted", f"leg {leg.leg} already running ({launched.handle.backend_id})")
            elif launched.start_step > 0:
                self._event("Normal", "Resumed", f"leg {leg.leg} resumed from checkpoint step {launched.start_step}")
            else:
                self._event("Normal", "LegStarted", f"leg {leg.leg} started from step 0")
        state.status.current_leg = leg.leg
        state.status.set_condition("Ready", "True", "Training", f"leg {leg.leg} running", self._now())
        self._set_phase(Phase.RUNNING, f"leg {leg.leg} running ({launched.handle.backend_id})")
        return record

    def _apply_progress(self, progress: LegProgress) -> None:
        status = self._require_state().status
        status.step = max(status.step, progress.step)
        if progress.total_steps:
            status.total_steps = progress.total_steps
        status.epoch = progress.epoch
        status.loss = progress.loss
        status.samples_per_second = progress.samples_per_second
        status.eta_seconds = progress.eta_seconds
        if progress.latest_checkpoint is not None:
            status.latest_checkpoint = progress.latest_checkpoint
        known = {q.path for q in status.quarantined}
        for entry in progress.quarantined:
            if entry.path not in known:
                status.quarantined.append(entry)
                self._event("Warning", "CheckpointQuarantined", f"step {entry.step}: {entry.reason}")
        self._update_progress_fraction()

    def _update_progress_fraction(self) -> None:
        status = self._require_state().status
        if status.total_steps:
            status.progress = min(1.0, status.step / status.total_steps)

    def _finish_record(self, record: LegStatus, outcome: str, reason: str) -> None:
        record.outcome = outcome  # type: ignore[assignment]
        record.reason = reason

    async def _record(self, record: LegStatus) -> None:
        await workflow.execute_activity(
            "record_leg",
            RecordLegRequest(namespace=self._input.namespace, name=self._input.name, record=record),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10), maximum_attempts=20),
        )

    def _set_phase(self, phase: Phase, message: str) -> None:
        status = self._require_state().status
        status.phase = phase
        status.message = message

    def _event(self, type_: str, reason: str, message: str) -> None:
        self._events.append(RunEvent(type=type_, reason=reason, message=message))  # type: ignore[arg-type]

    async def _publish(self) -> None:
        """Hand status and new events to the StatusSink; a failing sink never fails the run."""
        state = self._require_state()
        if not self._events and self._published == state.status:
            return  # nothing new: no activity, no history events
        events, self._events = self._events, []
        self._published = state.status.model_copy(deep=True)
        try:
            await workflow.execute_activity(
                "publish_status",
                PublishStatusRequest(
                    namespace=self._input.namespace, name=self._input.name, status=state.status, events=events
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            workflow.logger.warning("publishing status failed; it will be published with the next change")

    def _continue_as_new(self) -> None:
        state = self._require_state()
        state.status.legs = state.status.legs[-MAX_LEGS_IN_STATE:]
        workflow.continue_as_new(self._input.model_copy(update={"state": state, "preempt_at_steps": []}))

    def _now(self) -> str:
        return rfc3339(workflow.now())

    def _require_state(self) -> WorkflowState:
        assert self._state is not None
        return self._state


@workflow.defn(name="BertInferenceWorkflow")
class BertInferenceWorkflow:
    """Predictions for given texts from a finished run's final model (or a chosen checkpoint folder)."""

    @workflow.run
    async def run(self, request: PredictRequest) -> PredictResult:
        return await workflow.execute_activity(
            "predict",
            request,
            result_type=PredictResult,
            start_to_close_timeout=timedelta(seconds=request.timeout_s + 60),
            heartbeat_timeout=timedelta(seconds=30),  # a lost worker's predict Job is retried (adopted) soon
            retry_policy=RetryPolicy(maximum_attempts=2),
        )
