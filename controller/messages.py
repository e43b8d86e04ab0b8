"""What crosses Temporal: the workflows' inputs, state and signals, the activities' models and interface.

One pydantic model in and one out of every activity, and `RelayActivityInterface`, which declares every
activity with its registered name and types without implementing it. Workflows import this module, never
`controller.activities` (the implementation, with its backends, volume reads and processes), and call
`workflow.execute_activity_method(RelayActivityInterface.launch_leg, ...)`, so the request and result types
follow the call (mypy checks both) and results are decoded without a `result_type`.
`controller.activities.RelayActivities` implements the interface, so a renamed or retyped activity fails
mypy on both sides. The names are the ones recorded in workflow histories: never change them. Models only,
no I/O: the workflow module passes this module through the sandbox, so it loads once per process.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field
from temporalio import activity

from controller.leg_model import LegHandle, LegObservation, LegOutcomeKind, LegSpec, LegTermination, Prediction
from controller.spec import DatasetSpec, TrainingRunSpec
from controller.status import CheckpointStatus, LegStatus, QuarantinedStatus, RunEvent, RunStatus

# ApplicationError.type of a launch refused because the workflow's input is not the TrainingRun's
# (absent, another uid, a foreign path): non-retryable, and the training workflow fails at once with it.
RUN_IDENTITY_MISMATCH = "RunIdentityMismatch"

# ---------------------------------------------------------------- activity requests and results


class RunRef(BaseModel):
    namespace: str
    name: str


class SnapshotRequest(RunRef):
    dataset: DatasetSpec
    num_labels: int = Field(ge=2)
    owner_uid: str | None = None  # the TrainingRun's uid, checked where the backend has owners (Kubernetes)


class SnapshotResult(BaseModel):
    sha256: str
    path: str  # "snapshots/<sha256>", relative to the volume root
    rows: dict[str, int]
    fields: list[str]
    reused: bool


class PrepareRunRequest(RunRef):
    spec: TrainingRunSpec
    snapshot: SnapshotResult
    owner_uid: str | None = None  # the TrainingRun's uid: the run folder becomes its (None: local runs, no owner)


class PrepareRunResult(BaseModel):
    run_path: str  # "runs/<ns>/<name>"
    config_path: str
    total_steps: int | None
    latest_checkpoint: CheckpointStatus | None
    next_leg: int = 0  # legs of earlier workflows of this run keep their numbers (and records)
    previous_run_path: str | None = None  # where a same-named predecessor's folder was moved aside


class LaunchLegRequest(BaseModel):
    leg: LegSpec


class LaunchLegResult(BaseModel):
    handle: LegHandle
    start_step: int
    started_at: str


class LegProgress(BaseModel):
    """What the volume says about a running leg: the trainer's progress.json and the newest checkpoint."""

    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    loss: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    latest_checkpoint: CheckpointStatus | None = None
    quarantined: list[QuarantinedStatus] = Field(default_factory=list)


class AwaitLegRequest(BaseModel):
    leg: LegSpec
    # Send a real SIGTERM once the trainer reports reaching one of these steps (demo/test preemptions).
    preempt_at_steps: list[int] = Field(default_factory=list)
    # Return after this long even if the leg still runs, so the workflow can update its status.
    max_wait_s: float = Field(10.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)
    grace_s: float = Field(60.0, gt=0)


class AwaitLegResult(BaseModel):
    terminated: bool
    outcome: LegOutcomeKind | None = None
    termination: LegTermination | None = None
    detail: str = ""
    progress: LegProgress
    injected_preempt_at: int | None = None  # the preempt_at_steps entry used by this call, if any


class AwaitHeartbeat(BaseModel):
    """await_leg's heartbeat details: a retried attempt continues from them (an injected preemption is sent once)."""

    progress: LegProgress
    injected_preempt_at: int | None = None


class StopLegRequest(BaseModel):
    leg: LegSpec
    grace_s: float = Field(60.0, gt=0)


class RecordLegRequest(RunRef):
    record: LegStatus


class PublishStatusRequest(RunRef):
    status: RunStatus
    events: list[RunEvent] = Field(default_factory=list)
    owner_uid: str | None = None  # the TrainingRun's uid: a workflow that is not its object's publishes nothing


class EvaluateResult(BaseModel):
    metrics: dict[str, float]
    model_path: str  # "runs/<ns>/<name>/final"
    stop_reason: str = ""  # why training ended before its last step: "EarlyStopped" (final/metrics.json), else ""


class PredictRequest(RunRef):
    texts: list[str] = Field(min_length=1)
    model_path: str | None = None  # relative to the volume root; default: the run's final model
    timeout_s: float = 600.0  # for the trainer to finish, pod scheduling and start included


class PredictResult(BaseModel):
    model_path: str
    predictions: list[Prediction]


# ---------------------------------------------------------------- the training workflow's input, state and signals


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


# ---------------------------------------------------------------- the activities


class RelayActivityInterface(Protocol):
    """Every activity as the workflows call it: registered name, request type and result type; no implementation.

    A Protocol rather than the implementing class imported through the sandbox: importing `RelayActivities`
    would load `controller.activities` and with it the backends, the volume code and (for predictions) the
    trainer's modules into every workflow import, and `imports_passed_through` would only hide that from the
    sandbox. This module holds models and signatures alone, so the workflow module stays free of I/O imports.
    """

    @activity.defn(name="snapshot_dataset")
    async def snapshot_dataset(self, request: SnapshotRequest) -> SnapshotResult: ...

    @activity.defn(name="prepare_run")
    async def prepare_run(self, request: PrepareRunRequest) -> PrepareRunResult: ...

    @activity.defn(name="launch_leg")
    async def launch_leg(self, request: LaunchLegRequest) -> LaunchLegResult: ...

    @activity.defn(name="await_leg")
    async def await_leg(self, request: AwaitLegRequest) -> AwaitLegResult: ...

    @activity.defn(name="stop_leg")
    async def stop_leg(self, request: StopLegRequest) -> LegObservation: ...

    @activity.defn(name="record_leg")
    async def record_leg(self, request: RecordLegRequest) -> None: ...

    @activity.defn(name="publish_status")
    async def publish_status(self, request: PublishStatusRequest) -> None: ...

    @activity.defn(name="evaluate")
    async def evaluate(self, request: RunRef) -> EvaluateResult: ...

    @activity.defn(name="predict")
    async def predict(self, request: PredictRequest) -> PredictResult: ...

    @activity.defn(name="cleanup_run")
    async def cleanup_run(self, request: RunRef) -> None: ...
