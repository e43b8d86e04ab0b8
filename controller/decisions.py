"""What comes after a leg: `decide(state, leg, retries, scheduling) -> Decision`, a pure function.

It reads the run's counts before the leg, how the leg ended (the classifier's verdict) and the budgets,
and returns what to do: finish, resume, fall back to the other scheduling profile, back off, hold for a
pause, or stop the run. No Temporal calls, no clock, no I/O: the training workflow carries a Decision
out (the leg record, Events, the backoff timer, the next leg or the run's failure) and
tests/unit/test_decisions.py checks it as a table. Preemptions never use up the failure budget.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Literal, NamedTuple

from temporalio import workflow

# Workflow code: the sandbox imports this module afresh for every run, so its types are NamedTuples (defining
# a frozen dataclass allocates ~10 KB, a NamedTuple ~5 KB, by tracemalloc). The enum's module is data only:
# passed through, loaded once per process.
with workflow.unsafe.imports_passed_through():
    from controller.leg_model import LegOutcomeKind

if TYPE_CHECKING:
    from controller.spec import RetrySpec, SchedulingSpec

RecordedOutcome = Literal["completed", "preempted", "failed", "invalid", "stuck", "paused"]


class Action(enum.StrEnum):
    FINISH = "finish"  # training completed: evaluate the final model
    RESUME = "resume"  # preempted within maxPreemptions: the next leg starts from the newest checkpoint
    FALL_BACK = "fall_back"  # as RESUME, with the next leg on spec.scheduling.fallback
    BACK_OFF = "back_off"  # failed or stuck within maxFailures: wait backoff_s, then the next leg
    PAUSE = "pause"  # the workflow stopped the leg for a pause: hold until resumed, no budget used
    STOP = "stop"  # fail the run without retrying: a budget is exhausted or the input is invalid


class RunCounts(NamedTuple):
    """The run's counts before the leg that just ended."""

    preemptions: int = 0
    failures: int = 0


class LegEnd(NamedTuple):
    """How a leg ended: the classifier's verdict (or FAILED when it could not even be launched)."""

    leg: int
    outcome: LegOutcomeKind
    detail: str = ""
    stopped_for_pause: bool = False  # the workflow itself sent the SIGTERM, to pause the run


class Decision(NamedTuple):
    action: Action
    recorded: RecordedOutcome  # the outcome written to the leg's record
    counts: RunCounts  # the run's counts after this leg
    backoff_s: float = 0.0  # BACK_OFF only
    stop_reason: str = ""  # STOP only: the Failed condition's reason
    stop_message: str = ""  # STOP only: the Failed condition's message


def on_fallback_profile(preemptions: int, scheduling: SchedulingSpec) -> bool:
    """Whether legs run on the fallback profile: one is set and the run has been preempted often enough."""
    after = scheduling.fallback_after_preemptions
    return scheduling.fallback is not None and after is not None and preemptions >= after


def failure_backoff_s(failures: int, retries: RetrySpec) -> float:
    """Seconds before the next leg after the n-th failure: backoffSeconds, doubled each time, capped."""
    return float(min(retries.backoff_seconds * 2 ** (failures - 1), retries.max_backoff_seconds))


def decide(state: RunCounts, leg: LegEnd, retries: RetrySpec, scheduling: SchedulingSpec) -> Decision:
    """The next step after `leg` ended. Order matters: a completed leg completes even when a pause stopped it."""
    if leg.outcome == LegOutcomeKind.COMPLETED:
        return Decision(Action.FINISH, "completed", state)
    if leg.stopped_for_pause and leg.outcome in (LegOutcomeKind.PREEMPTED, LegOutcomeKind.FAILED):
        return Decision(Action.PAUSE, "paused", state)
    if leg.outcome == LegOutcomeKind.SUPERSEDED:
        # A newer leg (launched by another controller for this run) owns the run folder. Resuming starts nothing
        # new: the next leg's launch adopts that leg (same Job / pid record); no budget is used.
        return Decision(Action.RESUME, "preempted", state)
    if leg.outcome == LegOutcomeKind.PREEMPTED:
        counts = RunCounts(state.preemptions + 1, state.failures)
        if counts.preemptions > retries.max_preemptions:
            message = f"more than {retries.max_preemptions} preemptions (maxPreemptions)"
            return Decision(Action.STOP, "preempted", counts, stop_reason="PreemptionBudgetExhausted",
                            stop_message=message)  # fmt: skip
        action = Action.FALL_BACK if on_fallback_profile(counts.preemptions, scheduling) else Action.RESUME
        return Decision(action, "preempted", counts)
    if leg.outcome == LegOutcomeKind.INVALID:
        message = f"leg {leg.leg}: the trainer rejected its input ({leg.detail})"
        return Decision(Action.STOP, "invalid", state, stop_reason="InvalidInput", stop_message=message)
    recorded: RecordedOutcome = "stuck" if leg.outcome == LegOutcomeKind.STUCK else "failed"
    counts = RunCounts(state.preemptions, state.failures + 1)
    if counts.failures > retries.max_failures:
        message = f"leg {leg.leg} failed ({leg.detail}); maxFailures exhausted"
        return Decision(Action.STOP, recorded, counts, stop_reason="FailureBudgetExhausted", stop_message=message)
    return Decision(Action.BACK_OFF, recorded, counts, backoff_s=failure_backoff_s(counts.failures, retries))
