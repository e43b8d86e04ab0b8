"""The TrainingSweep document: pydantic models of its spec and status, and each trial's TrainingRun spec.

A sweep is a base TrainingRun spec (`template`), a search space over its training fields, a search algorithm
(grid, or random with a seed), how many trials and how many at once, an objective (an eval metric the trainer
produces and a goal) and optionally ASHA. `relay validate`, `relay sweep`, the sweep workflow and the generated
CRD (`controller.sweep.crd`) derive from these models; every bad field is named. Pure: no I/O.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.spec import InvalidDocument, Metadata, TrainingRunSpec, parse_document, read_document
from controller.status import StatusModel
from controller.sweep.asha import Rungs
from controller.sweep.space import (
    ANY_VALUE,
    MAX_GRID_TRIALS,
    ChoiceValue,
    SearchParameter,
    grid_size,
    trial_assignments,
)
from trainer.config import CamelModel, TrainingSettings

SWEEP_KIND = "TrainingSweep"
SWEEP_PLURAL = "trainingsweeps"
SWEEP_WORKFLOW_ID_PREFIX = "trainingsweep-"
MAX_TRIALS = 1000
MAX_CONCURRENT_TRIALS = 100
TRIAL_SUFFIX = "-t{index:03d}"  # trial i of sweep s is the TrainingRun "s-t00i"
MAX_SWEEP_NAME = 40 - len(TRIAL_SUFFIX.format(index=0))  # a trial's name stays a valid TrainingRun name
ObjectiveMetric = Literal["eval_loss", "accuracy", "f1_macro"]  # what the trainer's evaluations produce
OBJECTIVE_METRICS: tuple[ObjectiveMetric, ...] = ("eval_loss", "accuracy", "f1_macro")
# Fields a trial's settings may not take from the search space: ASHA owns the step budget and the eval cadence.
_ASHA_OWNED = ("maxSteps", "epochs", "evalEverySteps")


def training_fields() -> dict[str, str]:
    """camelCase name -> snake_case name of every TrainingSettings field."""
    return {info.alias or name: name for name, info in TrainingSettings.model_fields.items()}


class Objective(CamelModel):
    """What ranks the trials."""

    metric: ObjectiveMetric = Field(description="eval_loss, accuracy or f1_macro (the trainer's eval metrics).")
    goal: Literal["minimize", "maximize"] = Field(description="minimize (eval_loss) or maximize (accuracy, f1).")

    @property
    def maximize(self) -> bool:
        return self.goal == "maximize"


class AshaSpec(CamelModel):
    """Asynchronous successive halving: trials stop at rungs minSteps * reductionFactor**k below maxSteps."""

    min_steps: int = Field(ge=1, le=10**9, description="The first rung: every trial trains at least this many steps.")
    max_steps: int = Field(ge=2, le=10**9, description="The most steps a trial trains (its maxSteps).")
    reduction_factor: int = Field(2, ge=2, le=100, description="1/reductionFactor of the trials at a rung go on.")

    @model_validator(mode="after")
    def _bounds(self) -> AshaSpec:
        if self.max_steps <= self.min_steps:
            raise ValueError(f"maxSteps: {self.max_steps} must be greater than minSteps {self.min_steps}")
        return self

    @property
    def rungs(self) -> Rungs:
        return Rungs(self.min_steps, self.max_steps, self.reduction_factor)


class TrainingSweepSpec(CamelModel):
    template: TrainingRunSpec = Field(description="The TrainingRun spec every trial starts from.")
    search_space: dict[str, SearchParameter] = Field(
        description="Training fields (camelCase, as in template.training) and their distributions.",
        json_schema_extra={"minProperties": 1},
    )
    algorithm: Literal["grid", "random"] = Field("random", description="grid: every combination; random: draws.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of random search: the same seed, the same trials.")
    max_trials: int | None = Field(
        None, ge=1, le=MAX_TRIALS, description="Trials to run (random: required; grid: at most this many)."
    )
    max_concurrent_trials: int = Field(1, ge=1, le=MAX_CONCURRENT_TRIALS, description="Trials training at once.")
    objective: Objective
    asha: AshaSpec | None = Field(None, description="Early stopping of trials by successive halving.")
    suspend: bool = Field(False, description="true pauses every running trial (each checkpoints and stops).")

    @field_validator("search_space")
    @classmethod
    def _training_fields_only(cls, space: dict[str, SearchParameter]) -> dict[str, SearchParameter]:
        if not space:
            raise ValueError("must name at least one training field to search over")
        known = training_fields()
        for name in space:
            if name not in known:
                raise ValueError(f"{name!r} is not a training field (one of: {', '.join(sorted(known))})")
        return space

    @model_validator(mode="after")
    def _trials_are_valid_runs(self) -> TrainingSweepSpec:
        if self.algorithm == "random" and self.max_trials is None:
            raise ValueError("maxTrials: random search needs it")
        if self.algorithm == "grid" and self.max_trials is None and grid_size(self.search_space) > MAX_GRID_TRIALS:
            raise ValueError(f"searchSpace: the grid has more than {MAX_GRID_TRIALS} points; set maxTrials")
        if self.asha is not None:
            for name in _ASHA_OWNED:
                if name in self.search_space:
                    raise ValueError(f"searchSpace.{name}: set by asha (maxSteps, minSteps), not searched")
            every = self.template.training.eval_every_steps
            if every is not None and self.asha.min_steps % every:
                raise ValueError(
                    f"asha.minSteps: {self.asha.min_steps} is not a multiple of template.training.evalEverySteps "
                    f"{every} (each rung needs an evaluation)"
                )
        for name, parameter in sorted(self.search_space.items()):
            for value in parameter.extremes():
                try:
                    self.trial_spec({name: value})
                except ValidationError as exc:
                    problem = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"searchSpace.{name}: value {value!r} is not a valid {name}: {problem}") from None
        return self

    def trial_spec(self, assignment: dict[str, ChoiceValue]) -> TrainingRunSpec:
        """The TrainingRun spec of the trial with these field values (camelCase names)."""
        training: dict[str, Any] = self.template.training.model_dump(by_alias=True)
        training.update(assignment)
        if self.asha is not None:
            training["maxSteps"] = self.asha.max_steps
            if training.get("evalEverySteps") is None:
                training["evalEverySteps"] = self.asha.min_steps
        settings = TrainingSettings.model_validate(training)
        return self.template.model_copy(update={"training": settings, "suspend": False})

    def assignments(self) -> list[dict[str, ChoiceValue]]:
        """Every trial's field values, in trial order."""
        return trial_assignments(self.search_space, self.algorithm, self.seed, self.max_trials)


class SweepMetadata(Metadata):
    """A TrainingRun's metadata rules, and room in the name for the trials' suffix."""

    @field_validator("name")
    @classmethod
    def _room_for_trials(cls, value: str) -> str:
        if len(value) > MAX_SWEEP_NAME:
            raise ValueError(f"is too long: {len(value)} characters, at most {MAX_SWEEP_NAME} (trials add '-t000')")
        return value


class TrainingSweep(CamelModel):
    """A whole TrainingSweep document, as applied with kubectl or passed to `relay sweep`."""

    model_config = ConfigDict(extra="allow")  # status, kubectl annotations
    api_version: Literal["relay.dev/v1alpha1"]
    kind: Literal["TrainingSweep"]
    metadata: SweepMetadata
    spec: TrainingSweepSpec

    @property
    def workflow_id(self) -> str:
        return sweep_workflow_id(self.metadata.namespace, self.metadata.name)


def sweep_workflow_id(namespace: str, name: str) -> str:
    """The sweep workflow's id: "trainingsweep-<ns>.<name>" (DNS labels have no '.', so it splits back)."""
    return f"{SWEEP_WORKFLOW_ID_PREFIX}{namespace}.{name}"


def trial_name(sweep: str, index: int) -> str:
    return sweep + TRIAL_SUFFIX.format(index=index)


# ---------------------------------------------------------------- status


TrialState = Literal["pending", "running", "waiting", "pruned", "completed", "failed", "cancelled"]


def _any_value(schema: dict[str, Any]) -> None:
    schema["additionalProperties"] = {"type": "string", "description": ANY_VALUE}


class TrialStatus(StatusModel):
    """One trial: its field values, where it is and what it scored."""

    index: int = Field(ge=0)
    name: str = Field(description="The trial's TrainingRun name.")
    params: Annotated[dict[str, ChoiceValue], Field(json_schema_extra=_any_value)] = Field(default_factory=dict)
    state: TrialState = "pending"
    step: int = Field(0, ge=0, description="The newest step reported (a rung, or the end).")
    rung_metrics: dict[str, float] = Field(
        default_factory=dict, description="The objective at each rung reached, by step."
    )
    metric: float | None = Field(None, description="The objective at the newest rung, or at the end.")
    resumes: int = Field(0, ge=0, description="Times it was promoted and resumed from its checkpoint.")
    model_path: str | None = Field(None, description="The finished model, relative to the volume root.")
    message: str = ""


class BestTrial(StatusModel):
    name: str
    index: int = Field(ge=0)
    metric: str
    value: float
    step: int = Field(ge=0)
    model_path: str | None = None
    params: Annotated[dict[str, ChoiceValue], Field(json_schema_extra=_any_value)] = Field(default_factory=dict)


class SweepStatus(StatusModel):
    """What the sweep's `get_status` query returns and the operator publishes as `.status`."""

    phase: Literal["Pending", "Running", "Paused", "Succeeded", "Failed", "Cancelled"] = "Pending"
    message: str = ""
    workflow_id: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    trial_count: int = Field(0, ge=0, description="Trials planned.")
    running: int = Field(0, ge=0)
    waiting: int = Field(0, ge=0, description="Stopped at a rung, not yet promoted or pruned.")
    pruned: int = Field(0, ge=0)
    completed: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)
    best: BestTrial | None = None
    best_text: str = Field("", description="The best trial in a few words, for kubectl get.")
    trials: list[TrialStatus] = Field(default_factory=list)

    def recount(self) -> None:
        states = [trial.state for trial in self.trials]
        self.trial_count = len(states)
        self.running, self.waiting = states.count("running"), states.count("waiting")
        self.pruned, self.completed = states.count("pruned"), states.count("completed")
        self.failed = states.count("failed")
        best = self.best
        self.best_text = f"{best.name} {best.metric}={best.value:.4g}" if best else ""


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# ---------------------------------------------------------------- parsing


class InvalidTrainingSweep(InvalidDocument):
    """A TrainingSweep document that cannot run."""

    kind = "TrainingSweep"


def parse_training_sweep(document: Any, source: str = "<document>") -> TrainingSweep:
    """Validate a parsed document; raise InvalidTrainingSweep naming every bad field."""
    return parse_document(TrainingSweep, InvalidTrainingSweep, document, source)


def load_training_sweep(path: str) -> TrainingSweep:
    """Read and validate a TrainingSweep YAML/JSON file."""
    return parse_training_sweep(read_document(path, InvalidTrainingSweep), path)
