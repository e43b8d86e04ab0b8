"""The Events a TrainingSweep gets: one per change of its status, none when the same status is published again."""

from __future__ import annotations

from controller.sweep.events import sweep_events
from controller.sweep.spec import BestTrial, SweepStatus, TrialStatus


def status(phase: str = "Running", best: BestTrial | None = None, **states: tuple[str, int, int]) -> SweepStatus:
    """Trials by name: (state, step, resumes)."""
    trials = [
        TrialStatus(index=i, name=name, state=state, step=step, resumes=resumes)  # type: ignore[arg-type]
        for i, (name, (state, step, resumes)) in enumerate(sorted(states.items()))
    ]
    made = SweepStatus(phase=phase, trials=trials, best=best)  # type: ignore[arg-type]
    made.recount()
    return made


def reasons(old: SweepStatus | None, new: SweepStatus) -> list[str]:
    return [event.reason for event in sweep_events(old, new)]


def test_started_promoted_pruned_best_and_finished_are_told_once_each() -> None:
    first = status(t000=("running", 0, 0), t001=("running", 0, 0), t002=("pending", 0, 0))
    assert reasons(None, first) == ["TrialsStarted"]
    assert sweep_events(None, first)[0].message == "started t000, t001"
    best = BestTrial(name="t001", index=1, metric="eval_loss", value=0.5, step=4)
    at_rung = status(best=best, t000=("waiting", 4, 0), t001=("running", 8, 1), t002=("running", 0, 0))
    assert reasons(first, at_rung) == ["TrialsStarted", "TrialPromoted", "BestTrial"]
    assert reasons(at_rung, at_rung) == [], "the same status published again posts nothing"
    final_best = best.model_copy(update={"value": 0.4, "step": 8, "model_path": "runs/ns/t001/final"})
    done = status("Succeeded", final_best, t000=("pruned", 4, 0), t001=("completed", 8, 1), t002=("completed", 4, 0))
    events = sweep_events(at_rung, done)
    assert [e.reason for e in events] == ["TrialsPruned", "TrialCompleted", "TrialCompleted", "BestTrial", "Succeeded"]
    assert events[3].message == "best trial t001: eval_loss=0.4 at step 8, model runs/ns/t001/final"
    assert all(e.type == "Normal" for e in events)


def test_a_failed_trial_and_a_failed_sweep_are_warnings() -> None:
    running = status(t000=("running", 0, 0))
    failed = status("Failed", t000=("failed", 2, 0))
    failed.trials[0].message = "leg 0 exited 1"
    failed.message = "no trial scored: t000 failed: leg 0 exited 1"
    events = sweep_events(running, failed)
    assert [(e.type, e.reason) for e in events] == [("Warning", "TrialFailed"), ("Warning", "Failed")]
    assert events[0].message == "t000 failed: leg 0 exited 1" and events[1].message == failed.message
