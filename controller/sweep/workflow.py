"""TrainingSweepWorkflow: runs a TrainingSweep's trials, each a training workflow of its own, and stops them by ASHA.

Deterministic orchestration only; every side effect is an activity of `SweepActivityInterface`. The trials and
their field values come from the spec (`controller.sweep.space`: the same seed, the same trials). At most
maxConcurrentTrials train at once. With ASHA every trial trains toward asha.maxSteps and is watched to its next
rung; when it has evaluated the rung it is paused (its leg checkpoints and stops) and waits; `asha.promotions`
says which waiting trials go on, and those are resumed: their next leg starts from the checkpoint. When nothing
trains and no trial is left to start, the trials still waiting are pruned (cancelled; checkpoints kept). All
state is one `SweepState`, handed on at continue-as-new every `results_per_run` trial results, so history
stays bounded; the new run watches the running trials again.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from controller.messages import TrainingRunInput
    from controller.spec import workflow_id
    from controller.status import rfc3339
    from controller.sweep.asha import promotions, ranked
    from controller.sweep.messages import (
        PublishSweepStatusRequest,
        StartTrialRequest,
        SweepActivityInterface,
        SweepInput,
        SweepState,
        TrialRef,
        TrialSignalRequest,
        WatchTrialRequest,
        WatchTrialResult,
    )
    from controller.sweep.spec import BestTrial, SweepStatus, TrialStatus, finite, trial_name

_QUICK = RetryPolicy(maximum_interval=timedelta(seconds=10), maximum_attempts=20)


@workflow.defn(name="TrainingSweepWorkflow")
class TrainingSweepWorkflow:
    def __init__(self) -> None:
        self._state: SweepState | None = None
        self._watches: dict[str, asyncio.Future[WatchTrialResult]] = {}
        self._suspend_changed = False
        self._published: SweepStatus | None = None

    @workflow.query(name="get_status")
    def get_status(self) -> SweepStatus:
        return self._state.status if self._state else SweepStatus(message="starting")

    @workflow.signal(name="pause")
    def pause(self) -> None:
        if self._state and not self._state.paused:
            self._state.paused, self._suspend_changed = True, True

    @workflow.signal(name="resume")
    def resume(self) -> None:
        if self._state and self._state.paused:
            self._state.paused, self._suspend_changed = False, True

    @workflow.run
    async def run(self, sweep: SweepInput) -> SweepStatus:
        self._input = sweep
        if sweep.state is None:
            status = SweepStatus(workflow_id=workflow.info().workflow_id, started_at=self._now(), phase="Running")
            status.trials = [
                TrialStatus(index=i, name=trial_name(sweep.name, i), params=params)
                for i, params in enumerate(sweep.spec.assignments())
            ]
            status.message = f"{len(status.trials)} trials, at most {sweep.spec.max_concurrent_trials} at once"
            if sweep.spec.suspend:
                status.phase, status.message = "Paused", "spec.suspend: no trial starts until it is resumed"
            self._state = SweepState(status=status, paused=sweep.spec.suspend)
        else:
            self._state = sweep.state
        state = self._state
        results = 0
        try:
            for trial in state.status.trials:  # after continue-as-new: watch the running trials again
                if trial.state == "running":
                    self._watch(trial)
            while True:
                if self._suspend_changed:
                    await self._carry_out_suspend()
                if not state.paused:
                    await self._promote()
                    await self._start_trials()
                if not self._watches:
                    if state.paused:
                        await workflow.wait_condition(lambda: self._suspend_changed)
                        continue
                    if state.waiting:
                        await self._prune_waiting()  # one that had already finished is watched to its result
                        continue
                    break
                await self._publish()
                await workflow.wait_condition(
                    lambda: self._suspend_changed or any(w.done() for w in self._watches.values())
                )
                for name in [n for n, w in self._watches.items() if w.done()]:
                    await self._on_result(self._trial(name), self._watches.pop(name).result())
                    results += 1
                due = results >= sweep.results_per_run or workflow.info().is_continue_as_new_suggested()
                if due and not self._suspend_changed:  # a suspend not yet passed on to the trials is done first
                    self._refresh()
                    workflow.continue_as_new(sweep.model_copy(update={"state": state}))
        except (asyncio.CancelledError, ActivityError) as error:
            if not is_cancelled_exception(error):
                raise
            await self._cancel_all()
            raise asyncio.CancelledError() from None
        status = state.status
        status.finished_at = self._now()
        best = status.best
        failed = [t for t in status.trials if t.state == "failed"]
        if best is None and failed:  # not one trial scored: the sweep failed (each trial's message says why)
            status.phase, status.message = "Failed", f"every trial failed; {failed[0].name}: {failed[0].message}"
        else:
            status.phase = "Succeeded"
            status.message = (
                f"best {best.name}: {best.metric} {best.value:.4g} at step {best.step}" if best else "no trial scored"
            )
        await self._publish()
        return status

    # ------------------------------------------------------------ trials

    async def _start_trials(self) -> None:
        state, spec = self._require_state(), self._input.spec
        for trial in state.status.trials:
            if sum(t.state == "running" for t in state.status.trials) >= spec.max_concurrent_trials:
                return
            if trial.state != "pending":
                continue
            run_input = TrainingRunInput(
                namespace=self._input.namespace,
                name=trial.name,
                spec=spec.trial_spec(trial.params),
                await_window_s=self._input.trial_await_window_s,
                poll_interval_s=self._input.trial_poll_interval_s,
                heartbeat_timeout_s=self._input.trial_heartbeat_timeout_s,
                preempt_at_steps=self._input.trial_preempt_at_steps.get(trial.name, []),
            )
            await workflow.execute_activity_method(
                SweepActivityInterface.start_trial,
                StartTrialRequest(
                    run_input=run_input,
                    workflow_id=self._trial_id(trial),
                    task_queue=self._input.trial_task_queue,
                    sweep_name=self._input.name,
                    sweep_uid=self._input.owner_uid,
                ),
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=_QUICK,
            )
            trial.state, trial.message = "running", "started"
            self._watch(trial)

    def _watch(self, trial: TrialStatus, *, to_the_end: bool = False) -> None:
        asha = self._input.spec.asha
        stop_at = None
        if asha is not None and not to_the_end:
            stop = asha.rungs.next_stop(trial.step)
            stop_at = stop if stop < asha.max_steps else None
        self._watches[trial.name] = workflow.start_activity_method(
            SweepActivityInterface.watch_trial,
            WatchTrialRequest(
                namespace=self._input.namespace,
                name=trial.name,
                workflow_id=self._trial_id(trial),
                stop_at_step=stop_at,
                metric=self._input.spec.objective.metric,
                poll_interval_s=self._input.watch_poll_interval_s,
            ),
            start_to_close_timeout=timedelta(days=30),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)),
        )

    async def _on_result(self, trial: TrialStatus, result: WatchTrialResult) -> None:
        state = self._require_state()
        if result.kind == "rung":
            asha = self._input.spec.asha
            assert asha is not None
            rung = asha.rungs.steps.index(result.step)
            value = result.metric if result.metric is not None else float("nan")
            state.rung_results.setdefault(rung, {})[trial.name] = value
            trial.step, trial.metric = result.step, value
            trial.rung_metrics[str(result.step)] = value
            trial.state, trial.message = "waiting", f"stopped at rung step {result.step}"
            state.waiting[trial.name] = rung
            await self._signal(trial, "pause", f"sweep: rung step {result.step}")
        elif result.phase == "Succeeded":
            trial.state, trial.message = "completed", result.message
            trial.step, trial.metric, trial.model_path = result.step, result.metric, result.model_path
            if result.metric is not None:
                trial.rung_metrics[str(result.step)] = result.metric
        else:
            trial.state = "cancelled" if result.phase == "Cancelled" else "failed"
            trial.message = result.message
        self._update_best()

    async def _promote(self) -> None:
        state, spec = self._require_state(), self._input.spec
        if spec.asha is None or not state.waiting:
            return
        order = {t.name: t.index for t in state.status.trials}
        for name in promotions(
            state.rung_results, state.waiting, order, spec.asha.reduction_factor, spec.objective.maximize
        ):
            trial = self._trial(name)
            state.waiting.pop(name)
            trial.state, trial.message = "running", f"promoted at rung step {trial.step}"
            trial.resumes += 1
            await self._signal(trial, "resume", f"sweep: promoted at rung step {trial.step}")
            self._watch(trial)

    async def _prune_waiting(self) -> None:
        state = self._require_state()
        for name in list(state.waiting):
            trial = self._trial(name)
            state.waiting.pop(name)
            if await self._cancel(trial):
                trial.state, trial.message = "pruned", f"pruned at rung step {trial.step}"
            else:  # it trained to its end before its leg stopped at the rung: its final result counts
                trial.state, trial.message = "running", "finished before it stopped at the rung"
                self._watch(trial, to_the_end=True)
        self._update_best()

    async def _carry_out_suspend(self) -> None:
        state = self._require_state()
        self._suspend_changed = False
        signal = "pause" if state.paused else "resume"
        state.status.phase = "Paused" if state.paused else "Running"
        for trial in state.status.trials:
            if trial.state == "running":
                await self._signal(trial, signal, f"sweep {signal}d")

    async def _cancel_all(self) -> None:
        for trial in self._require_state().status.trials:
            if trial.state in ("running", "waiting"):
                await self._cancel(trial)
                trial.state = "cancelled"
        status = self._require_state().status
        status.phase, status.message, status.finished_at = "Cancelled", "sweep cancelled; trials cancelled", self._now()
        await self._publish()

    async def _signal(self, trial: TrialStatus, signal: str, reason: str) -> None:
        await workflow.execute_activity_method(
            SweepActivityInterface.signal_trial,
            TrialSignalRequest(workflow_id=self._trial_id(trial), signal=signal, reason=reason),  # type: ignore[arg-type]
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_QUICK,
        )

    async def _cancel(self, trial: TrialStatus) -> bool:
        return await workflow.execute_activity_method(
            SweepActivityInterface.cancel_trial,
            TrialRef(workflow_id=self._trial_id(trial)),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_QUICK,
        )

    # ------------------------------------------------------------ status

    def _update_best(self) -> None:
        """The best completed trial by the objective at its end; before any completes, the best at the highest rung."""
        status, objective = self._require_state().status, self._input.spec.objective
        order = {t.name: t.index for t in status.trials}
        scored = [t for t in status.trials if t.state == "completed" and finite(t.metric)]
        if not scored:
            reached = [t for t in status.trials if finite(t.metric)]
            top_step = max((t.step for t in reached), default=0)
            scored = [t for t in reached if t.step == top_step]
        if not scored:
            status.best = None
            return
        values = {t.name: float(t.metric) for t in scored if t.metric is not None}
        winner = self._trial(ranked(values, order, objective.maximize)[0])
        assert winner.metric is not None
        status.best = BestTrial(
            name=winner.name,
            index=winner.index,
            metric=objective.metric,
            value=winner.metric,
            step=winner.step,
            model_path=winner.model_path,
            params=winner.params,
        )

    def _refresh(self) -> None:
        self._require_state().status.recount()

    async def _publish(self) -> None:
        """Recount and hand the status to the sweep's .status when it changed; a failure never fails the sweep."""
        self._refresh()
        status = self._require_state().status
        if status == self._published:
            return
        self._published = status.model_copy(deep=True)
        try:
            await workflow.execute_activity_method(
                SweepActivityInterface.publish_status,
                PublishSweepStatusRequest(
                    namespace=self._input.namespace,
                    name=self._input.name,
                    status=status,
                    owner_uid=self._input.owner_uid,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as error:
            if is_cancelled_exception(error):
                raise
            workflow.logger.warning("publishing the sweep's status failed; it is published with the next change")

    def _trial(self, name: str) -> TrialStatus:
        return next(t for t in self._require_state().status.trials if t.name == name)

    def _trial_id(self, trial: TrialStatus) -> str:
        return workflow_id(self._input.namespace, trial.name)

    def _now(self) -> str:
        return rfc3339(workflow.now())

    def _require_state(self) -> SweepState:
        assert self._state is not None
        return self._state
