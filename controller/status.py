"""The run's observable state: what `get_status` returns and what the operator publishes as `.status` + Events.

One set of pydantic models (camelCase on the wire, like the spec) for the workflow query, the local
CLI's progress bar and the TrainingRun status subresource; the CRD's status schema is generated from
`RunStatus`. Everything is JSON-serialisable and bounded: `RunStatus.for_custom_resource()` keeps only
the newest legs and quarantine entries. Timestamps are RFC 3339 strings in UTC ("2026-01-02T03:04:05Z").
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Literal, TypeAlias

from pydantic import ConfigDict, Field

from trainer.config import CamelModel
from trainer.volume.records import LegRecord

# How many leg records and quarantine entries the TrainingRun .status keeps (the query keeps all of
# the current workflow run's; legs/<n>.json on the volume keeps every one).
MAX_LEGS_IN_CR_STATUS = 20
MAX_QUARANTINED_IN_CR_STATUS = 10


class StatusModel(CamelModel):
    """Like CamelModel, but mutable: the workflow updates its status in place."""

    model_config = ConfigDict(frozen=False)  # merged with CamelModel's config


class Phase(enum.StrEnum):
    PENDING = "Pending"
    SNAPSHOTTING = "Snapshotting"
    RUNNING = "Running"
    PAUSED = "Paused"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


def rfc3339(moment: datetime | float) -> str:
    """A UTC timestamp as Kubernetes writes it (seconds precision, 'Z')."""
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


LegStatus: TypeAlias = LegRecord
"""One leg: where it started, how far it got and how it ended (outcome None while it runs). The same model as
the volume's legs/<n>.json record (trainer.volume.records.LegRecord): one spelling on disk and in the status."""


class CheckpointStatus(StatusModel):
    step: int = Field(ge=0)
    path: str = Field(description="Folder of the checkpoint, relative to the volume root.")
    created_at: str | None = None
    loss: float | None = None


class QuarantinedStatus(StatusModel):
    step: int
    path: str
    reason: str


class SnapshotStatus(StatusModel):
    sha256: str
    path: str = Field(description="snapshots/<sha256>, relative to the volume root.")
    rows: dict[str, int] = Field(default_factory=dict, description="Rows per split (train, eval).")
    reused: bool = Field(False, description="An existing verified snapshot was reused.")


class Condition(StatusModel):
    """A Kubernetes-style condition."""

    type: Literal["Ready", "Succeeded", "Failed", "Suspended"]
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class RunEvent(StatusModel):
    """A Kubernetes Event to emit on the TrainingRun (and a log line locally)."""

    type: Literal["Normal", "Warning"] = "Normal"
    reason: str = Field(min_length=1, description="UpperCamelCase, e.g. LegStarted, Preempted, Resumed.")
    message: str = ""


class RunStatus(StatusModel):
    """The whole observable state of one TrainingRun."""

    phase: Phase = Phase.PENDING
    message: str = ""
    workflow_id: str = ""
    step: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=0)
    progress: float = Field(0.0, ge=0.0, le=1.0)
    epoch: int = Field(0, ge=0)
    loss: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    legs: list[LegStatus] = Field(default_factory=list)
    current_leg: int | None = None
    preemptions: int = Field(0, ge=0)
    failures: int = Field(0, ge=0)
    latest_checkpoint: CheckpointStatus | None = None
    quarantined: list[QuarantinedStatus] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    model_path: str | None = Field(None, description="Final model folder, relative to the volume root.")
    snapshot: SnapshotStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None

    def set_condition(
        self, type_: str, status: str, reason: str = "", message: str = "", now: str | None = None
    ) -> None:
        """Add or update a condition; lastTransitionTime changes only when the status flips."""
        for condition in self.conditions:
            if condition.type == type_:
                if condition.status != status:
                    condition.last_transition_time = now
                condition.status = status  # type: ignore[assignment]
                condition.reason, condition.message = reason, message
                return
        self.conditions.append(
            Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=now)  # type: ignore[arg-type]
        )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def for_custom_resource(
        self, max_legs: int = MAX_LEGS_IN_CR_STATUS, max_quarantined: int = MAX_QUARANTINED_IN_CR_STATUS
    ) -> RunStatus:
        """A copy small enough for the TrainingRun .status: only the newest legs and quarantine entries."""
        trimmed = self.model_copy(deep=True)
        trimmed.legs = trimmed.legs[-max_legs:] if max_legs > 0 else []
        trimmed.quarantined = trimmed.quarantined[-max_quarantined:] if max_quarantined > 0 else []
        return trimmed

    def to_json_dict(self) -> dict[str, object]:
        """camelCase JSON-ready dict (what kubectl and `temporal workflow query` show)."""
        return self.model_dump(mode="json", by_alias=True)
