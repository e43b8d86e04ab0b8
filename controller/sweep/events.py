"""The Events a TrainingSweep gets, from the change between its stored `.status` and the new one.

Pure: `sweep_events(old, new)` compares two SweepStatus values and names what happened in between (trials
started, promoted, pruned, completed or failed; a new best trial; the sweep finished), so an Event is posted
once per change however often the same status is published again (a retried activity publishes the same one).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from controller.sweep.spec import SweepStatus, TrialStatus

FINISHED_PHASES = ("Succeeded", "Failed", "Cancelled")


class SweepEvent(BaseModel):
    type: Literal["Normal", "Warning"] = "Normal"
    reason: str
    message: str


def _names(trials: list[TrialStatus]) -> str:
    return ", ".join(trial.name for trial in trials)


def sweep_events(old: SweepStatus | None, new: SweepStatus) -> list[SweepEvent]:
    """What changed from `old` (None: nothing published yet) to `new`, as Events in a stable order."""
    before = {trial.name: trial for trial in (old.trials if old else [])}
    started: list[TrialStatus] = []
    promoted: list[TrialStatus] = []
    ended: dict[str, list[TrialStatus]] = {"pruned": [], "completed": [], "failed": []}
    for trial in new.trials:
        previous = before.get(trial.name)
        state = previous.state if previous else "pending"
        if trial.state == state and (previous is None or trial.resumes == previous.resumes):
            continue
        if trial.state != "pending" and state == "pending":
            started.append(trial)
        if previous is not None and trial.resumes > previous.resumes:
            promoted.append(trial)
        if trial.state != state:
            ended.get(trial.state, []).append(trial)
    events: list[SweepEvent] = []
    if started:
        events.append(SweepEvent(reason="TrialsStarted", message=f"started {_names(started)}"))
    for trial in promoted:
        message = f"{trial.name} promoted at step {trial.step}, resumes from its checkpoint"
        events.append(SweepEvent(reason="TrialPromoted", message=message))
    if ended["pruned"]:
        events.append(SweepEvent(reason="TrialsPruned", message=f"pruned {_names(ended['pruned'])}"))
    for trial in ended["completed"]:
        events.append(SweepEvent(reason="TrialCompleted", message=f"{trial.name} completed at step {trial.step}"))
    for trial in ended["failed"]:
        message = f"{trial.name} failed: {trial.message}" if trial.message else f"{trial.name} failed"
        events.append(SweepEvent(type="Warning", reason="TrialFailed", message=message))
    best, was = new.best, old.best if old else None
    if best is not None and (was is None or (was.name, was.value, was.step) != (best.name, best.value, best.step)):
        where = f", model {best.model_path}" if best.model_path else ""
        message = f"best trial {best.name}: {best.metric}={best.value:.4g} at step {best.step}{where}"
        events.append(SweepEvent(reason="BestTrial", message=message))
    if new.phase in FINISHED_PHASES and (old is None or old.phase != new.phase):
        kind: Literal["Normal", "Warning"] = "Normal" if new.phase == "Succeeded" else "Warning"
        message = new.message or f"sweep {new.phase.lower()}: {new.completed} completed, {new.pruned} pruned"
        events.append(SweepEvent(type=kind, reason=new.phase, message=message))
    return events
