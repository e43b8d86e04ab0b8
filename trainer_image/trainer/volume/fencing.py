"""Fencing: a leg of an older generation never commits to a run folder once a newer leg was launched (issue 13).

A node that the API server cannot reach may still reach the shared volume, so the leg on it can carry on after
the controller started the next leg. Every leg carries a generation, its leg number. Before it launches leg N
the controller writes `<run>/fence.json` {"generation": N, "resumeStep": ..., "writtenAt": ...} (write_fence,
never lowering it). The trainer started with `--generation N` re-reads that file just before every commit (a
checkpoint's rename, `final/`, progress.json and history lines, retention and quarantine moves) and raises
Fenced ("fenced: leg 7 superseded by leg 8") as soon as a newer generation is there; it exits with
ExitCode.FENCED. The check sits right before each rename, so a leg that passed it can only be overtaken by a
launch that has not started its trainer yet.

No fence file (runs from before this change), or a trainer run by hand without `--generation`: no fencing.
A fence file that is a symlink is refused (SymlinkRefused), never followed.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from trainer.volume.durable import atomic_write_json, read_json
from trainer.volume.layout import TMP_PREFIX, RunLayout

# `.tmp-g<generation>-...`: a temp folder made by a leg of that generation; any other `.tmp-*` is old-format.
_GENERATION_TEMP = re.compile(rf"^{re.escape(TMP_PREFIX)}g(\d+)-")


class FenceRecord(BaseModel):
    """fence.json: the run's current generation (the newest launched leg) and the checkpoint step it resumes from."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    generation: int = Field(ge=0)
    resume_step: int | None = Field(None, ge=0)  # retention never deletes it (the newer leg loads it)
    written_at: float = 0.0


class FenceUnreadable(ValueError):
    """fence.json exists but does not parse: a fenced leg cannot tell whether it may commit; names the file."""


class Fenced(Exception):
    """A newer generation owns the run folder; this leg must commit nothing more."""

    def __init__(self, generation: int, newer: int, what: str = "") -> None:
        self.generation, self.newer, self.what = generation, newer, what
        super().__init__(f"fenced: leg {generation} superseded by leg {newer}")


def read_fence(layout: RunLayout) -> FenceRecord | None:
    """The run's fence, or None when it has none; SymlinkRefused for a link, FenceUnreadable for a bad file."""
    try:
        document = read_json(layout.fence_path)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # json.JSONDecodeError
        raise FenceUnreadable(f"{layout.fence_path}: not JSON ({exc})") from None
    try:
        return FenceRecord.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(document)"
        raise FenceUnreadable(f"{layout.fence_path}: {where}: {first['msg']}") from None


def write_fence(layout: RunLayout, generation: int, resume_step: int | None) -> FenceRecord:
    """Make `generation` the run's current one before its leg launches (controller); never lowers it.

    Written atomically (temp file, fsync, rename, folder fsync); a symlink at fence.json is replaced, not followed.
    Returns the fence now in force (a higher one already there is kept).
    """
    try:
        current = read_fence(layout)
    except (OSError, FenceUnreadable):
        current = None  # a planted link or a torn file: replaced below
    if current is not None and current.generation > generation:
        return current
    if current is not None and current.generation == generation and current.resume_step == resume_step:
        return current  # the launch retried: the leg's trainer may already be running under it
    record = FenceRecord(generation=generation, resume_step=resume_step, written_at=round(time.time(), 3))
    atomic_write_json(layout.fence_path, record.model_dump(mode="json", by_alias=True))
    return record


def temp_generation(name: str) -> int | None:
    """The generation a `.tmp-g<N>-...` folder name was made by, or None for an old-format (or other) name."""
    match = _GENERATION_TEMP.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Fence:
    """One leg's view of the fence: its own generation (None: not fenced) and the run folder it writes."""

    layout: RunLayout | None = None
    generation: int | None = None

    @property
    def enabled(self) -> bool:
        return self.layout is not None and self.generation is not None

    def temp_prefix(self) -> str:
        """What the leg's temp folder names start with: `.tmp-g<N>-`, or `.tmp-` without a generation."""
        return f"{TMP_PREFIX}g{self.generation}-" if self.generation is not None else TMP_PREFIX

    def check(self, what: str = "") -> FenceRecord | None:
        """Raise Fenced when a newer generation exists; else the fence read (None without one or unfenced).

        Call right before a commit (rename, delete); `what` names it for the log.
        """
        if self.layout is None or self.generation is None:
            return None
        record = read_fence(self.layout)
        if record is not None and record.generation > self.generation:
            raise Fenced(self.generation, record.generation, what)
        return record

    def superseded(self) -> bool:
        """Whether a newer generation exists now (a failed leg then reports fenced, not failed)."""
        try:
            self.check()
        except Fenced:
            return True
        except (OSError, FenceUnreadable):
            return False
        return False

    def protected_steps(self) -> set[int]:
        """Checkpoint steps retention must keep: the one the current generation resumed from."""
        record = self.check("retention")
        return {record.resume_step} if record is not None and record.resume_step is not None else set()


NO_FENCE = Fence()
_active = NO_FENCE


def active() -> Fence:
    """The running leg's fence (NO_FENCE outside a fenced leg): for the writer thread and the record writers."""
    return _active


@contextlib.contextmanager
def guarding(fence: Fence) -> Iterator[Fence]:
    """Make `fence` the one `active()` returns for the duration of the block (one leg)."""
    global _active
    previous, _active = _active, fence
    try:
        yield fence
    finally:
        _active = previous


def check(what: str) -> FenceRecord | None:
    """active().check(what): raise Fenced before a commit when a newer generation exists."""
    return _active.check(what)
