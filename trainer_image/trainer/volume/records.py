"""The run's typed records on the volume: progress.json, history.jsonl lines and legs/<n>.json.

One model per record and one spelling per field. The trainer writes progress and history (reporting.py), the
controller writes leg records; the controller, `relay plot`, the drill and the benchmarks read all three through
the readers here. Readers accept every file written so far: unknown keys are ignored, and progress.json's older
spellings `samples_per_second` / `eta_seconds` are read as `samples_per_s` / `eta_s`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from trainer.config import CamelModel
from trainer.volume import fencing
from trainer.volume.durable import SymlinkRefused, atomic_write_json, open_file, read_json
from trainer.volume.layout import RunLayout

ProgressState = Literal[
    "starting", "running", "checkpointing", "evaluating", "completed", "preempted", "failed", "invalid"
]
PROGRESS_STATES: tuple[ProgressState, ...] = (
    "starting",
    "running",
    "checkpointing",
    "evaluating",
    "completed",
    "preempted",
    "failed",
    "invalid",
)


class Progress(BaseModel):
    """progress.json: the trainer's latest report, rewritten atomically on every log line and checkpoint."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    state: ProgressState = "starting"
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_s: float | None = Field(None, validation_alias=AliasChoices("samples_per_s", "samples_per_second"))
    eta_s: float | None = Field(None, validation_alias=AliasChoices("eta_s", "eta_seconds"))
    last_checkpoint_step: int | None = None
    resumed_from_step: int | None = None
    pid: int | None = None
    message: str = ""
    updated_at: float | None = None  # set by write_progress


class HistoryEntry(BaseModel):
    """One line of history.jsonl: a progress log line, a leg's start, a checkpoint saved, an evaluation during
    training (`"event": "eval"`, issue 15), or the final evaluation (eval fields, no event).

    A resumed leg appends the steps it redoes again; readers keep the newest line per step.
    """

    model_config = ConfigDict(extra="ignore")

    step: int
    time: float = 0.0
    pid: int | None = None
    event: Literal["start", "checkpoint", "eval"] | None = None
    resumed_from: int | None = None  # "start": the checkpoint step the leg resumed from (None: fresh start)
    total_steps: int | None = None  # "start"
    epoch: float | None = None
    loss: float | None = None  # mean training loss since the previous log line
    learning_rate: float | None = None
    samples_per_s: float | None = None
    eval_loss: float | None = None  # "eval" lines and the final evaluation's line
    eval_accuracy: float | None = None
    eval_f1_macro: float | None = None
    best_step: int | None = None  # "eval": the best evaluated step so far by metricForBest (None without one)


# legs/<n>.json (camelCase, written by the controller) and the leg entries of the run status are this one model;
# its docstring is the CRD's description of status.legs. Mutable: the workflow fills it in as the leg goes.
class LegRecord(CamelModel):
    """One leg: where it started, how far it got and how it ended (outcome None while it runs)."""

    model_config = ConfigDict(frozen=False)  # merged with CamelModel's config

    leg: int = Field(ge=0)
    start_step: int = Field(0, ge=0, description="Step of the checkpoint the leg resumed from (0: fresh start).")
    end_step: int | None = Field(None, ge=0, description="Newest checkpointed step when the leg ended.")
    outcome: Literal["completed", "preempted", "failed", "invalid", "stuck", "paused", "cancelled"] | None = None
    reason: str = Field("", description="Why it ended: exit code, signal, eviction reason, injected preemption.")
    started_at: str | None = None
    ended_at: str | None = None
    backend_id: str = Field("", description="Job name, or pid:<pid> for a local leg.")


# ---------------------------------------------------------------- progress.json


def write_progress(layout: RunLayout, progress: Progress | Mapping[str, Any]) -> Progress:
    """Validate and write progress.json atomically, stamped with `updated_at`; returns what was written.

    Not fsynced: the training thread writes it every `logEverySteps` steps and at each checkpoint, and its two
    fsyncs (file and folder: two journal commits, which may wait behind a checkpoint's writeback) took the tiny
    model's updates from 0.6-0.8 ms to 1.1-2.6 ms each (median), about 1.5% of its training time. It is a
    report, which the next update or the next leg rewrites; what resume needs is in the checkpoints.
    """
    record = progress if isinstance(progress, Progress) else Progress.model_validate(dict(progress))
    record = record.model_copy(update={"updated_at": time.time()})
    fencing.check("progress.json")  # a superseded leg reports nothing more (volume.fencing)
    atomic_write_json(layout.progress_path, record.model_dump(mode="json"), durable=False)
    return record


def load_progress(layout: RunLayout) -> Progress | None:
    """The trainer's last progress report, or None if there is none (or it is being replaced, or unreadable)."""
    try:
        return Progress.model_validate(read_json(layout.progress_path))
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def read_progress(layout: RunLayout) -> dict[str, Any] | None:
    """load_progress as a JSON dict (progress.json's keys, one spelling each), or None."""
    progress = load_progress(layout)
    return progress.model_dump(mode="json") if progress is not None else None


# ---------------------------------------------------------------- history.jsonl


def append_history(layout: RunLayout, entry: HistoryEntry) -> None:
    """Append one line to history.jsonl in one write call, so a reader never sees half a line (not fsynced: a
    SIGKILL may drop the last lines, which the next leg writes again)."""
    line = json.dumps(entry.model_dump(mode="json", exclude_none=True), sort_keys=True) + "\n"
    fencing.check("history.jsonl")
    fd = open_file(layout.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # no symlink followed
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_history(layout: RunLayout) -> list[HistoryEntry]:
    """Every readable line of history.jsonl in file order; a line cut short by a SIGKILL is skipped."""
    try:
        with os.fdopen(open_file(layout.history_path), encoding="utf-8") as handle:
            text = handle.read()
    except (FileNotFoundError, SymlinkRefused):  # a link in its place is not the run's history
        return []
    entries = []
    for line in text.splitlines():
        if line.strip():
            try:
                entries.append(HistoryEntry.model_validate_json(line))
            except ValidationError:
                continue
    return entries


# ---------------------------------------------------------------- legs/<n>.json


def write_leg_record(layout: RunLayout, record: LegRecord) -> None:
    atomic_write_json(layout.leg_record_path(record.leg), record.model_dump(mode="json", by_alias=True))


def read_leg_record(layout: RunLayout, leg: int) -> LegRecord | None:
    """legs/<n>.json, or None when it is missing or unreadable."""
    try:
        return LegRecord.model_validate(read_json(layout.leg_record_path(leg)))
    except (OSError, ValueError):
        return None


def read_leg_records(layout: RunLayout) -> list[LegRecord]:
    """Every readable leg record, by leg number."""
    records = (read_leg_record(layout, leg) for leg, _ in layout.leg_record_paths())
    return [record for record in records if record is not None]
