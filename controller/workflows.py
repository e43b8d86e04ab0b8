"""The Temporal workflows: CheckpointedBertTrainingWorkflow (one per TrainingRun) and BertInferenceWorkflow.

Deterministic orchestration only; every side effect is an activity, called by method reference on
`RelayActivityInterface` (controller/messages.py; the implementation in controller/activities.py
is never imported here). The training workflow snapshots the dataset, then runs legs until one
completes: launch, watch (heartbeats carry the newest checkpoint), classify, then carries out what
`controller.decisions.decide` returns (resume after a preemption, back off after a failure, stop on
invalid input), then verifies the final model and records its held-out metrics. All state lives in one
`WorkflowState` handed on at continue-as-new (every `legs_per_run` legs, or when Temporal suggests it),
so history stays bounded for week-long runs.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

from controller.decisions import Action, LegEnd, RunCounts, decide, on_fallback_profile

# Models and enums only (no I/O): passed through, so they are loaded once per process instead of once per run
# in the sandbox (bench/bench_sandbox.py measures what a run costs).
with workflow.unsafe.imports_passed_through():
    from controller.leg_model import LegOutcomeKind, LegSpec
    from controller.messages import (
        RUN_IDENTITY_MISMATCH,
        AwaitLegRequest,
        AwaitLegResult,
        LaunchLegRequest,
        LaunchLegResult,
        LegProgress,
        PauseRequest,
        PredictRequest,
        PredictResult,
        PrepareRunRequest,
        PublishStatusRequest,
        RecordLegRequest,
        RelayActivityInterface,
        ResumeRequest,
        RunRef,
        SnapshotRequest,
        StopLegRequest,
        TrainingRunInput,
        WorkflowState,
    )
    from controller.status import (
        CheckpointStatus,
        LegStatus,
        Phase,
        RunEvent,
        RunStatus,
        SnapshotStatus,
        rfc3339,
    )
    from controller.visibility import MEMO_KEY, SEARCH_ATTRIBUTES, VISIBILITY_PATCH, RunSummary, summarize, upserts_due

TRAINING_RUN_FAILED = "TrainingRunFailed"
MAX_LEGS_IN_STATE = 200  # legs kept in the workflow's status across continue-as-new (all are on the volume)


class _RunFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _reraise_cancellation(error: BaseException) -> None:
    """An activity error caused by the workflow's own cancellation must cancel the workflow, not be handled."""
    if is_cancelled_exception(error):
        raise asyncio.CancelledError() from error


def _raise_if_not_the_owner(error: ActivityError, what: str) -> None:
    """An activity refused this workflow as not its TrainingRun's (issue 11): fail at once, saying what did not match.
    Retrying would not make it so, and no recorded history reaches this (replay is unchanged)."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == RUN_IDENTITY_MISMATCH:
        raise _RunFailed(RUN_IDENTITY_MISMATCH, f"{what}: {cause.message}") from None


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
        self._visible = False  # upserts search attributes and memo (not in histories recorded before them)
        self._shown: RunSummary | None = None  # what visibility shows of this run
        self._shown_at: datetime | None = None

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
        self._visible = workflow.patched(VISIBILITY_PATCH)
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
                state.snapshot = await workflow.execute_activity_method(
                    RelayActivityInterface.snapshot_dataset,
                    SnapshotRequest(
                        **ref,
                        dataset=spec.dataset,
                        num_labels=spec.training.num_labels,
                        owner_uid=self._input.owner_uid,
                    ),
                    start_to_close_timeout=timedelta(hours=6),
                    heartbeat_timeout=timedelta(minutes=1),
                    retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(minutes=2)),
                )
            except ActivityError as error:
                _reraise_cancellation(error)
                _raise_if_not_the_owner(error, "no snapshot made")
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
                state.prepared = await workflow.execute_activity_method(
                    RelayActivityInterface.prepare_run,
                    PrepareRunRequest(**ref, spec=spec, snapshot=state.snapshot, owner_uid=self._input.owner_uid),
                    start_to_close_timeout=timedelta(minutes=2),
                    retry_policy=RetryPolicy(maximum_attempts=5),
                )
            except ActivityError as error:
                _reraise_cancellation(error)
                _raise_if_not_the_owner(error, "run folder untouched")
                raise _RunFailed("PrepareFailed", f"could not write the run's config: {error.cause}") from None
            state.status.total_steps = state.prepared.total_steps
            if state.prepared.previous_run_path:  # an event only: no command, recorded histories replay unchanged
                moved = state.prepared.previous_run_path
                self._event("Normal", "PreviousRunKept", f"a same-named earlier run's folder was moved to {moved}")
            state.next_leg = max(state.next_leg, state.prepared.next_leg)
            if state.prepared.latest_checkpoint is not None:
                state.status.latest_checkpoint = state.prepared.latest_checkpoint
                state.status.step = state.prepared.latest_checkpoint.step
                self._update_progress_fraction()

    def _leg_spec(self, leg: int) -> LegSpec:
        state = self._require_state()
        assert state.snapshot is not None and state.prepared is not None
        return LegSpec(
            namespace=self._input.namespace,
            name=self._input.name,
            leg=leg,
            run_path=state.prepared.run_path,
            snapshot_path=state.snapshot.path,
            spec=self._input.spec,
            use_fallback_profile=on_fallback_profile(state.status.preemptions, self._input.spec.scheduling),
            owner_uid=self._input.owner_uid,
        )

    async def _run_leg(self, leg: LegSpec) -> bool:
        """Run one leg to its end and decide what comes next; True when training is complete."""
        state, run_input = self._require_state(), self._input
        grace = float(run_input.spec.termination_grace_period_seconds)
        try:
            launched = await workflow.execute_activity_method(
                RelayActivityInterface.launch_leg,
                LaunchLegRequest(leg=leg),
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=30)),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            _raise_if_not_the_owner(error, f"leg {leg.leg} not launched")  # nothing was created
            record = LegStatus(leg=leg.leg, started_at=self._now())
            state.status.legs.append(record)
            return await self._carry_out(
                record, LegEnd(leg.leg, LegOutcomeKind.FAILED, f"could not launch: {error.cause}")
            )
        record = self._leg_started(leg, launched)
        await self._publish()

        stop_sent = False

        def should_wake(handle: asyncio.Future[AwaitLegResult], stop_sent: bool) -> bool:
            return handle.done() or (state.paused and not stop_sent)

        while True:
            handle = workflow.start_activity_method(
                RelayActivityInterface.await_leg,
                AwaitLegRequest(
                    leg=leg,
                    preempt_at_steps=list(state.pending_preempts),
                    max_wait_s=run_input.await_window_s,
                    poll_interval_s=run_input.poll_interval_s,
                    grace_s=grace,
                ),
                start_to_close_timeout=timedelta(seconds=run_input.await_window_s + 2 * grace + 120),
                heartbeat_timeout=timedelta(seconds=run_input.heartbeat_timeout_s),
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
            )
            await workflow.wait_condition(functools.partial(should_wake, handle, stop_sent))
            if not handle.done():
                stop_sent = True
                self._event("Normal", "Pausing", f"leg {leg.leg}: SIGTERM, waiting for its checkpoint")
                await workflow.execute_activity_method(
                    RelayActivityInterface.stop_leg,
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
        detail = result.detail
        if result.injected_preempt_at is not None and result.outcome == LegOutcomeKind.PREEMPTED:
            detail = f"injected preemption at step {result.injected_preempt_at}: {detail}"
        return await self._carry_out(record, LegEnd(leg.leg, result.outcome, detail, stopped_for_pause=stop_sent))

    async def _carry_out(self, record: LegStatus, end: LegEnd) -> bool:
        """Decide what follows the leg that ended and do it; True when training is complete.

        The order of activities and timers here is what recorded histories replay against: record_leg,
        then the run's failure (STOP) or, for BACK_OFF, publish_status and the backoff timer.
        """
        state, spec = self._require_state(), self._input.spec
        counts = RunCounts(preemptions=state.status.preemptions, failures=state.status.failures)
        decision = decide(counts, end, spec.retries, spec.scheduling)
        state.status.preemptions, state.status.failures = decision.counts.preemptions, decision.counts.failures
        state.status.current_leg = None
        state.next_leg = end.leg + 1
        record.ended_at = record.ended_at or self._now()
        paused = decision.action == Action.PAUSE
        self._finish_record(
            record, decision.recorded, f"paused ({state.pause_reason}): {end.detail}" if paused else end.detail
        )
        if decision.action == Action.FINISH:
            self._event("Normal", "LegCompleted", f"leg {end.leg} completed training at step {state.status.step}")
        elif paused:
            self._event("Normal", "Paused", f"leg {end.leg} stopped at checkpoint step {record.end_step}")
        elif decision.recorded == "preempted":
            where = f"checkpoint step {record.end_step}" if record.end_step is not None else "the start"
            self._event("Warning", "Preempted", f"leg {end.leg} preempted ({end.detail}); resuming from {where}")
        await self._record(record)
        if decision.action == Action.STOP:
            raise _RunFailed(decision.stop_reason, decision.stop_message)
        if decision.action == Action.BACK_OFF:
            backoff = decision.backoff_s
            self._event("Warning", "LegFailed", f"leg {end.leg} failed ({end.detail}); retrying in {backoff:g}s")
            state.status.message = f"leg {end.leg} failed; next leg in {backoff:g}s"
            await self._publish()
            if backoff > 0:
                await workflow.sleep(timedelta(seconds=backoff))
        return decision.action == Action.FINISH

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
            result = await workflow.execute_activity_method(
                RelayActivityInterface.evaluate,
                ref,
                start_to_close_timeout=timedelta(minutes=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            message = _non_retryable_message(error) or f"evaluation failed: {error.cause}"
            raise _RunFailed("EvaluationFailed", message) from None
        state.status.metrics = result.metrics
        state.status.model_path = result.model_path
        if result.stop_reason and "steps" in result.metrics:  # ended early (EarlyStopped): at its own step
            state.status.step = int(result.metrics["steps"])
        elif state.status.total_steps:
            state.status.step = max(state.status.step, state.status.total_steps)
        state.status.progress = 1.0
        state.status.finished_at = self._now()
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()))
        how = f"finished ({result.stop_reason} at step {state.status.step})" if result.stop_reason else "finished"
        self._set_phase(Phase.SUCCEEDED, f"{how}: {summary}")
        state.status.set_condition("Succeeded", "True", result.stop_reason or "Succeeded", summary, self._now())
        state.status.set_condition("Ready", "False", "Finished", "training finished", self._now())
        self._event("Normal", "Succeeded", f"final model at {result.model_path}; {summary}")
        try:
            await workflow.execute_activity_method(
                RelayActivityInterface.cleanup_run,
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
                await workflow.execute_activity_method(
                    RelayActivityInterface.stop_leg,
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
        await workflow.execute_activity_method(
            RelayActivityInterface.record_leg,
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
        self._show()
        if not self._events and self._published == state.status:
            return  # nothing new: no activity, no history events
        events, self._events = self._events, []
        self._published = state.status.model_copy(deep=True)
        try:
            await workflow.execute_activity_method(
                RelayActivityInterface.publish_status,
                PublishStatusRequest(
                    namespace=self._input.namespace,
                    name=self._input.name,
                    status=state.status,
                    events=events,
                    owner_uid=self._input.owner_uid,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            _reraise_cancellation(error)
            workflow.logger.warning("publishing status failed; it will be published with the next change")

    def _show(self) -> None:
        """Upsert the memo and the search attributes the run was started with, when visibility.upserts_due says."""
        if not self._visible:
            return
        summary = summarize(
            self._input.namespace, self._input.name, self._input.spec.model, self._require_state().status
        )
        started_with = workflow.info().typed_search_attributes
        registered = [key for key in SEARCH_ATTRIBUTES if started_with.get(key) is not None]
        updates = upserts_due(self._shown, summary, self._shown_at, workflow.now(), registered)
        if updates is None:
            return
        if updates:
            workflow.upsert_search_attributes(updates)
        workflow.upsert_memo({MEMO_KEY: summary})
        self._shown, self._shown_at = summary, workflow.now()

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
        return await workflow.execute_activity_method(
            RelayActivityInterface.predict,
            request,
            start_to_close_timeout=timedelta(seconds=request.timeout_s + 60),
            heartbeat_timeout=timedelta(seconds=30),  # a lost worker's predict Job is retried (adopted) soon
            retry_policy=RetryPolicy(maximum_attempts=2),
        )
