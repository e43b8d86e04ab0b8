"""What follows a leg, as a table: `controller.decisions.decide` called as a plain function, no Temporal."""

from __future__ import annotations

import pytest

from controller.decisions import Action, Decision, LegEnd, RunCounts, decide, failure_backoff_s, on_fallback_profile
from controller.leg_model import LegOutcomeKind
from controller.spec import RetrySpec, SchedulingProfile, SchedulingSpec

K = LegOutcomeKind
RETRIES = RetrySpec(max_preemptions=2, max_failures=2, backoff_seconds=10, max_backoff_seconds=25)
NO_FALLBACK = SchedulingSpec()
SPOT_THEN_ON_DEMAND = SchedulingSpec(
    node_selector={"pool": "spot"},
    fallback=SchedulingProfile(node_selector={"pool": "on-demand"}),
    fallback_after_preemptions=2,
)


def counts(preemptions: int = 0, failures: int = 0) -> RunCounts:
    return RunCounts(preemptions=preemptions, failures=failures)


def leg(outcome: LegOutcomeKind, *, paused: bool = False) -> LegEnd:
    return LegEnd(leg=3, outcome=outcome, detail="exit 1 (ERROR)", stopped_for_pause=paused)


CASES = [
    # (before, leg end, scheduling, expected decision)
    pytest.param(counts(1, 1), leg(K.COMPLETED), NO_FALLBACK,
                 Decision(Action.FINISH, "completed", counts(1, 1)), id="completed-finishes"),
    pytest.param(counts(), leg(K.COMPLETED, paused=True), NO_FALLBACK,
                 Decision(Action.FINISH, "completed", counts()), id="completed-while-pausing-still-finishes"),
    pytest.param(counts(), leg(K.PREEMPTED), NO_FALLBACK,
                 Decision(Action.RESUME, "preempted", counts(1, 0)), id="preempted-within-budget-resumes"),
    pytest.param(counts(1, 2), leg(K.PREEMPTED), NO_FALLBACK,
                 Decision(Action.RESUME, "preempted", counts(2, 2)), id="preempted-up-to-the-budget-resumes"),
    pytest.param(counts(2, 0), leg(K.PREEMPTED), NO_FALLBACK,
                 Decision(Action.STOP, "preempted", counts(3, 0), stop_reason="PreemptionBudgetExhausted",
                          stop_message="more than 2 preemptions (maxPreemptions)"),
                 id="preemption-budget-exhausted-stops"),
    pytest.param(counts(0, 0), leg(K.PREEMPTED), SPOT_THEN_ON_DEMAND,
                 Decision(Action.RESUME, "preempted", counts(1, 0)), id="fallback-not-before-n-preemptions"),
    pytest.param(counts(1, 0), leg(K.PREEMPTED), SPOT_THEN_ON_DEMAND,
                 Decision(Action.FALL_BACK, "preempted", counts(2, 0)), id="fallback-after-n-preemptions"),
    pytest.param(counts(2, 0), leg(K.PREEMPTED), SPOT_THEN_ON_DEMAND,
                 Decision(Action.STOP, "preempted", counts(3, 0), stop_reason="PreemptionBudgetExhausted",
                          stop_message="more than 2 preemptions (maxPreemptions)"),
                 id="fallback-does-not-extend-the-budget"),
    pytest.param(counts(2, 2), leg(K.SUPERSEDED), NO_FALLBACK,
                 Decision(Action.RESUME, "preempted", counts(2, 2)),
                 id="superseded-by-a-newer-leg-uses-no-budget-even-at-the-limit"),
    pytest.param(counts(5, 0), leg(K.FAILED), NO_FALLBACK,
                 Decision(Action.BACK_OFF, "failed", counts(5, 1), backoff_s=10.0),
                 id="failed-within-budget-backs-off-preemptions-not-counted"),
    pytest.param(counts(0, 1), leg(K.FAILED), NO_FALLBACK,
                 Decision(Action.BACK_OFF, "failed", counts(0, 2), backoff_s=20.0), id="second-failure-doubles"),
    pytest.param(counts(0, 2), leg(K.FAILED), NO_FALLBACK,
                 Decision(Action.STOP, "failed", counts(0, 3), stop_reason="FailureBudgetExhausted",
                          stop_message="leg 3 failed (exit 1 (ERROR)); maxFailures exhausted"),
                 id="failure-budget-exhausted-stops"),
    pytest.param(counts(0, 0), leg(K.STUCK), NO_FALLBACK,
                 Decision(Action.BACK_OFF, "stuck", counts(0, 1), backoff_s=10.0), id="stuck-counts-as-a-failure"),
    pytest.param(counts(1, 1), leg(K.INVALID), NO_FALLBACK,
                 Decision(Action.STOP, "invalid", counts(1, 1), stop_reason="InvalidInput",
                          stop_message="leg 3: the trainer rejected its input (exit 1 (ERROR))"),
                 id="invalid-stops-without-retry"),
    pytest.param(counts(), leg(K.INVALID, paused=True), NO_FALLBACK,
                 Decision(Action.STOP, "invalid", counts(), stop_reason="InvalidInput",
                          stop_message="leg 3: the trainer rejected its input (exit 1 (ERROR))"),
                 id="invalid-while-pausing-still-stops"),
    pytest.param(counts(2, 2), leg(K.PREEMPTED, paused=True), NO_FALLBACK,
                 Decision(Action.PAUSE, "paused", counts(2, 2)), id="pause-stop-uses-no-preemption"),
    pytest.param(counts(2, 2), leg(K.FAILED, paused=True), NO_FALLBACK,
                 Decision(Action.PAUSE, "paused", counts(2, 2)), id="pause-stop-that-failed-uses-no-failure"),
    pytest.param(counts(), leg(K.STUCK, paused=True), NO_FALLBACK,
                 Decision(Action.BACK_OFF, "stuck", counts(0, 1), backoff_s=10.0), id="stuck-while-pausing-is-stuck"),
]  # fmt: skip


@pytest.mark.parametrize(("before", "end", "scheduling", "expected"), CASES)
def test_decide(before: RunCounts, end: LegEnd, scheduling: SchedulingSpec, expected: Decision):
    assert decide(before, end, RETRIES, scheduling) == expected


@pytest.mark.parametrize(
    ("failures", "backoff_s"),
    [(1, 10.0), (2, 20.0), (3, 25.0), (10, 25.0)],  # doubles from backoffSeconds, capped at maxBackoffSeconds
)
def test_failure_backoff_doubles_up_to_its_cap(failures: int, backoff_s: float):
    assert failure_backoff_s(failures, RETRIES) == backoff_s


def test_no_backoff_when_backoff_seconds_is_zero():
    retries = RetrySpec(backoff_seconds=0)
    assert decide(counts(), leg(K.FAILED), retries, NO_FALLBACK).backoff_s == 0.0


@pytest.mark.parametrize(
    ("preemptions", "scheduling", "on_fallback"),
    [
        (0, SPOT_THEN_ON_DEMAND, False),
        (1, SPOT_THEN_ON_DEMAND, False),
        (2, SPOT_THEN_ON_DEMAND, True),
        (7, SPOT_THEN_ON_DEMAND, True),  # every later leg stays on the fallback, after failures too
        (7, NO_FALLBACK, False),
        (7, SchedulingSpec(fallback_after_preemptions=1), False),  # a threshold without a profile
    ],
)
def test_which_profile_a_leg_runs_on(preemptions: int, scheduling: SchedulingSpec, on_fallback: bool):
    assert on_fallback_profile(preemptions, scheduling) is on_fallback


def test_a_fenced_exit_is_superseded_not_failed() -> None:
    from controller.leg_model import LegTermination, classify_termination
    from trainer.volume import ExitCode

    fenced = LegTermination(exit_code=ExitCode.FENCED, message="fenced: leg 7 superseded by leg 8")
    assert classify_termination(fenced) == K.SUPERSEDED
    assert classify_termination(fenced.model_copy(update={"disrupted": True})) == K.SUPERSEDED
