"""What crosses Temporal for a sweep: the sweep workflow's input and state, the trial activities' models and their
interface (names, request and result types, no implementation). Models only, no I/O."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, Field
from temporalio import activity

from controller.messages import TrainingRunInput
from controller.sweep.spec import ObjectiveMetric, SweepStatus, TrainingSweepSpec

SWEEP_WORKFLOW = "TrainingSweepWorkflow"


class SweepState(BaseModel):
    """Everything the sweep workflow knows; handed on whole at continue-as-new."""

    status: SweepStatus
    rung_results: dict[int, dict[str, float]] = Field(default_factory=dict)  # rung index -> trial -> metric
    waiting: dict[str, int] = Field(default_factory=dict)  # trial name -> the rung index it waits at
    paused: bool = False


class SweepInput(BaseModel):
    """Start (or continue) the workflow of one TrainingSweep."""

    namespace: str
    name: str
    spec: TrainingSweepSpec
    owner_uid: str | None = None
    trial_task_queue: str = Field(description="The task queue the trials' training workflows run on.")
    # Handed to every trial's TrainingRunInput (how often it refreshes status and looks at its leg).
    trial_await_window_s: float = Field(10.0, gt=0)
    trial_poll_interval_s: float = Field(1.0, gt=0)
    trial_heartbeat_timeout_s: float = Field(30.0, gt=0)
    watch_poll_interval_s: float = Field(1.0, gt=0, description="How often a watch looks at a trial.")
    results_per_run: int = Field(500, ge=1, description="Continue-as-new after this many trial results.")
    # Demo/test preemptions: trial name -> steps at which its leg gets a real SIGTERM (TrainingRunInput's).
    trial_preempt_at_steps: dict[str, list[int]] = Field(default_factory=dict)
    state: SweepState | None = None


class StartTrialRequest(BaseModel):
    run_input: TrainingRunInput
    workflow_id: str
    task_queue: str
    sweep_name: str = ""  # Kubernetes: the TrainingSweep that owns the trial's TrainingRun
    sweep_uid: str | None = None


class WatchTrialRequest(BaseModel):
    namespace: str
    name: str  # the trial's run name
    workflow_id: str
    stop_at_step: int | None = Field(None, description="Return once the eval of this step is recorded; None: the end.")
    metric: ObjectiveMetric
    poll_interval_s: float = Field(1.0, gt=0)


class WatchTrialResult(BaseModel):
    kind: Literal["rung", "finished"]
    step: int = 0
    metric: float | None = None  # the objective at the rung, or at the end
    phase: str = ""  # "finished": the trial's final phase (Succeeded, Failed, Cancelled)
    model_path: str | None = None
    message: str = ""


class TrialSignalRequest(BaseModel):
    workflow_id: str
    signal: Literal["pause", "resume"]
    reason: str


class TrialRef(BaseModel):
    workflow_id: str


class PublishSweepStatusRequest(BaseModel):
    namespace: str
    name: str
    status: SweepStatus
    owner_uid: str | None = None  # Kubernetes: the TrainingSweep's uid; another object's status is not written


class SweepActivityInterface(Protocol):
    """The sweep's activities as the workflow calls them; controller.sweep.activities implements them."""

    @activity.defn(name="sweep_start_trial")
    async def start_trial(self, request: StartTrialRequest) -> None: ...

    @activity.defn(name="sweep_watch_trial")
    async def watch_trial(self, request: WatchTrialRequest) -> WatchTrialResult: ...

    @activity.defn(name="sweep_signal_trial")
    async def signal_trial(self, request: TrialSignalRequest) -> None: ...

    @activity.defn(name="sweep_cancel_trial")
    async def cancel_trial(self, request: TrialRef) -> bool: ...

    @activity.defn(name="sweep_publish_status")
    async def publish_status(self, request: PublishSweepStatusRequest) -> None: ...
