"""The trainer's configuration: one pydantic model, torch-free, shared with the controller.

`TrainingRun.spec.training` in the controller *is* `TrainingSettings` (camelCase in YAML and JSON),
so the CRD schema, `relay validate` and the trainer all check the same rules. The controller writes the
resolved config to `runs/<ns>/<name>/config.json`; every leg of the run reads it with `--config`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

# Fields that change what is computed; a checkpoint made under one identity cannot resume another.
# Everything else (logging, checkpoint cadence, retention, grace) may change between legs.
_OPERATIONAL_FIELDS = frozenset(
    {
        "log_every_steps",
        "checkpoint_every_steps",
        "checkpoint_every_seconds",
        "keep_last",
        "sigterm_grace_seconds",
        "checkpoint_direct_writes",
    }
)


# The evaluation fields (issue 15) count for identity only when set: a config written before them hashes as it did.
_EVAL_FIELD_DEFAULTS: dict[str, Any] = {
    "eval_every_steps": None,
    "metric_for_best": None,
    "greater_is_better": None,
    "load_best_at_end": False,
    "early_stopping_patience": None,
}

EvalMetric = Literal["eval_loss", "accuracy", "f1_macro"]
EVAL_METRICS: tuple[EvalMetric, ...] = ("eval_loss", "accuracy", "f1_macro")


class CamelModel(BaseModel):
    """Base for Relay's documents: camelCase on the wire, snake_case in Python, unknown keys refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class TrainingSettings(CamelModel):
    """Hyperparameters and checkpoint cadence: `TrainingRun.spec.training`."""

    num_labels: int = Field(2, ge=2, le=10_000, description="Number of classes; labels must be in [0, numLabels).")
    epochs: int = Field(1, ge=1, le=10_000, description="Passes over the training split (unless maxSteps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps; overrides epochs.")
    batch_size: int = Field(16, ge=1, le=65_536, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of steps with linear LR warmup.")
    max_seq_length: int = Field(128, ge=8, le=8192, description="Tokens per example after truncation.")
    eval_batch_size: int = Field(64, ge=1, le=65_536, description="Examples per evaluation batch.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds model init, dropout and the data order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, else fp32.")
    checkpoint_every_steps: int | None = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    checkpoint_every_seconds: float | None = Field(None, gt=0, description="Also checkpoint every N seconds.")
    keep_last: int = Field(3, ge=1, le=1000, description="Checkpoints kept besides the best and the newest.")
    checkpoint_direct_writes: bool = Field(
        True,
        description=(
            "Write checkpoint tensor files with O_DIRECT (buffered where the file system refuses it); false: "
            "through the page cache, for storage where direct writes are slower."
        ),
    )
    log_every_steps: int = Field(10, ge=1, description="A progress line in the log every N steps.")
    sigterm_grace_seconds: float = Field(
        25.0, gt=0, le=3600, description="Budget for finishing the step and saving after SIGTERM."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate the eval split every N optimizer steps (besides the final evaluation)."
    )
    metric_for_best: EvalMetric | None = Field(
        None, description="Eval metric that ranks checkpoints: retention keeps the best; needs evalEverySteps."
    )
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metricForBest is better; default: false for eval_loss, else true."
    )
    load_best_at_end: bool = Field(False, description="final/ gets the best checkpoint's model (needs metricForBest).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="End the run after this many evaluations without improvement (needs metricForBest)."
    )

    @model_validator(mode="after")
    def _checkpoint_cadence(self) -> TrainingSettings:
        if self.checkpoint_every_steps is None and self.checkpoint_every_seconds is None:
            raise ValueError("checkpointEverySteps or checkpointEverySeconds must be set")
        return self

    @field_validator("metric_for_best")
    @classmethod
    def _metric_needs_evaluations(cls, value: EvalMetric | None, info: ValidationInfo) -> EvalMetric | None:
        if value is not None and info.data.get("eval_every_steps") is None:
            raise ValueError("needs evalEverySteps (the metric comes from those evaluations)")
        return value

    @field_validator("greater_is_better", "load_best_at_end", "early_stopping_patience")
    @classmethod
    def _needs_a_metric(cls, value: object, info: ValidationInfo) -> object:
        if value not in (None, False) and info.data.get("metric_for_best") is None and "metric_for_best" in info.data:
            raise ValueError(f"needs metricForBest (one of {', '.join(EVAL_METRICS)})")
        return value

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger metricForBest is better: greaterIsBetter, else false for eval_loss only."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return self.metric_for_best != "eval_loss"


class TrainerConfig(TrainingSettings):
    """Everything one leg needs: the settings plus model, fields and the pinned thread count.

    The controller resolves it from a TrainingRun and writes it to the run's config.json.
    """

    model: str = Field(
        "tiny",
        min_length=1,
        description="'tiny' (built-in small random BERT for tests and CPU demos), a local path, or a hub id.",
    )
    text_field: str = Field("text", min_length=1, description="Dataset column holding the input text.")
    label_field: str = Field("label", min_length=1, description="Dataset column holding integer labels.")
    torch_threads: int = Field(
        1, ge=1, le=512, description="torch intra-op threads; pinned per run because it changes CPU results."
    )

    def identity_hash(self) -> str:
        """sha256 of the fields that determine the computation (not logging or checkpoint cadence)."""
        identity = {
            k: v
            for k, v in self.model_dump().items()
            if k not in _OPERATIONAL_FIELDS and not (k in _EVAL_FIELD_DEFAULTS and v == _EVAL_FIELD_DEFAULTS[k])
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def to_json_text(self) -> str:
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> TrainerConfig:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
