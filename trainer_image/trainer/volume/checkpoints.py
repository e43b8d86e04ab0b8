"""Finding, quarantining and retiring checkpoints: the newest valid one by parsed step, bad ones moved aside
with their reason, retention (the last K and the best, never the newest, never a newer leg's resume point),
stale temp folders of older generations removed (volume.fencing)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from trainer.volume import fencing
from trainer.volume.durable import fsync_dir, open_file, opened_dir
from trainer.volume.errors import CheckpointInvalid
from trainer.volume.layout import TMP_PREFIX, parse_step
from trainer.volume.manifests import CheckpointInfo, VerifiedCheckpoint, open_verified_checkpoint, read_checkpoint


def list_checkpoint_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every step-N folder, oldest first, ordered by the parsed step number.

    A step-N that is a symlink is nobody's checkpoint: never listed, so never followed, loaded or counted.
    """
    if not checkpoints_dir.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in checkpoints_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    return sorted((step, p) for step, p in found if step is not None)


def quarantine(folder: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move a bad checkpoint aside (never delete evidence) with a reason.txt; return its new path."""
    target = quarantine_dir / f"{folder.name}.{int(time.time() * 1000)}"
    fencing.check(f"quarantine {folder.name}")  # a superseded leg moves nothing
    with opened_dir(quarantine_dir, create=True):  # made, or found, without following a symlink
        os.replace(folder, target)
    (target / "reason.txt").unlink(missing_ok=True)  # one the folder came with (a link is removed, not followed)
    fd = open_file(target / "reason.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(reason + "\n")
    fsync_dir(folder.parent)
    fsync_dir(quarantine_dir)
    return target


@dataclass(frozen=True)
class QuarantinedCheckpoint:
    step: int
    path: Path
    reason: str


def find_latest_checkpoint(
    checkpoints_dir: Path,
    *,
    verify_hashes: bool,
    quarantine_dir: Path | None = None,
    required_files: Collection[str] = (),
) -> tuple[CheckpointInfo | None, list[QuarantinedCheckpoint]]:
    """The newest checkpoint that passes verification, newest by parsed step number.

    Invalid ones newer than it are moved to `quarantine_dir` when one is given (the trainer), or
    only reported (the controller, whose mount is read-only). Returns (latest or None, rejected).
    """
    return _newest_valid(
        checkpoints_dir,
        quarantine_dir,
        lambda folder: read_checkpoint(folder, verify_hashes=verify_hashes, required_files=required_files),
    )


def find_latest_verified(
    checkpoints_dir: Path,
    *,
    quarantine_dir: Path | None,
    required_files: Collection[str] = (),
    accept: Callable[[VerifiedCheckpoint], None] | None = None,
) -> tuple[VerifiedCheckpoint | None, list[QuarantinedCheckpoint]]:
    """find_latest_checkpoint with hashes verified, keeping the verified bytes for loading (the trainer's resume).

    `accept` (the trainer's own checks of what the files say) raises CheckpointInvalid for a verified checkpoint
    that must not be used either: it is quarantined and the previous one tried, like one that failed its hashes.
    """

    def check(folder: Path) -> VerifiedCheckpoint:
        verified = open_verified_checkpoint(folder, required_files=required_files)
        if accept is not None:
            accept(verified)
        return verified

    return _newest_valid(checkpoints_dir, quarantine_dir, check)


_Checked = TypeVar("_Checked")


def _newest_valid(
    checkpoints_dir: Path, quarantine_dir: Path | None, check: Callable[[Path], _Checked]
) -> tuple[_Checked | None, list[QuarantinedCheckpoint]]:
    rejected: list[QuarantinedCheckpoint] = []
    for step, folder in reversed(list_checkpoint_dirs(checkpoints_dir)):
        try:
            return check(folder), rejected
        except CheckpointInvalid as exc:
            moved = quarantine(folder, quarantine_dir, str(exc)) if quarantine_dir is not None else folder
            rejected.append(QuarantinedCheckpoint(step, moved, str(exc)))
    return None, rejected


def list_quarantined(quarantine_dir: Path) -> list[QuarantinedCheckpoint]:
    """Every checkpoint moved to quarantine so far, with its recorded reason."""
    if not quarantine_dir.is_dir():
        return []
    result = []
    for folder in sorted(quarantine_dir.iterdir()):
        step = parse_step(folder.name.split(".")[0])
        reason_file = folder / "reason.txt"
        reason = reason_file.read_text(encoding="utf-8").strip() if reason_file.is_file() else "unknown"
        result.append(QuarantinedCheckpoint(step if step is not None else -1, folder, reason))
    return result


def select_for_deletion(
    checkpoints: Iterable[CheckpointInfo],
    *,
    keep_last: int,
    best_metric: str | None = None,
    higher_is_better: bool = True,
    protected: Collection[int] = (),
) -> list[CheckpointInfo]:
    """Retention: keep the newest `keep_last` and the best by `best_metric`; never the newest one, nor a step in
    `protected` (the checkpoint a newer leg resumed from: volume.fencing)."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if not ordered:
        return []
    keep = {c.step for c in ordered[-max(1, keep_last) :]}
    scored = [c for c in ordered if best_metric and best_metric in c.metrics]
    if scored:
        sign = 1.0 if higher_is_better else -1.0
        # Of equal values the earliest is the best, as for the trainer's EvalTracker (strict improvement only).
        keep.add(max(scored, key=lambda c: (sign * c.metrics[best_metric or ""], -c.step)).step)
    keep.add(ordered[-1].step)
    keep.update(protected)
    return [c for c in ordered if c.step not in keep]


def remove_stale_temp_dirs(checkpoints_dir: Path, generation: int | None = None) -> list[Path]:
    """Delete half-written `.tmp-*` checkpoint folders left by a killed writer (trainer start only).

    With a `generation` (a fenced leg), only those of older generations and old-format names go: a newer leg's
    (`.tmp-g<newer>-...`) may be in the middle of its write, and one of this generation is left for the next.
    """
    removed = []
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.iterdir():
            if not path.name.startswith(TMP_PREFIX):
                continue
            made_by = fencing.temp_generation(path.name)
            if generation is None or made_by is None or made_by < generation:
                fencing.check(f"remove {path.name}")
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed
