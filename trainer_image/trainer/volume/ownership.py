"""Which TrainingRun object a run folder belongs to: its uid in `owner.json`, and moving a predecessor's aside.

A name is reused when a TrainingRun is deleted and applied again, but the new object is another run: it
must not resume (or fail against) the old one's checkpoints and final model. `claim_run_dir` records the
owner's uid in a folder it finds empty or absent; a folder that records another uid, or none (written
before owners were recorded), is renamed to `runs/<ns>/.previous/<name>-<old uid prefix>-<UTC time>`, kept
for its owner to fetch or delete, and the new object starts from an empty folder. Only the controller
calls it (prepare_run, before the first leg); the trainer never reads the owner.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainer.volume.durable import atomic_write_json, fsync_dir, read_json

OWNER_FILE = "owner.json"
PREVIOUS_DIR = ".previous"


def read_owner_uid(run_dir: Path) -> str | None:
    """The uid recorded in `run_dir/owner.json`, or None when there is none (or it is unreadable)."""
    try:
        data = read_json(run_dir / OWNER_FILE)
    except (OSError, ValueError):
        return None
    uid = data.get("uid") if isinstance(data, dict) else None
    return uid if isinstance(uid, str) and uid else None


def claim_run_dir(run_dir: Path, uid: str, now: float | None = None) -> Path | None:
    """Make `run_dir` belong to `uid`; return where a predecessor's folder was moved, or None."""
    moved: Path | None = None
    if run_dir.is_symlink() or run_dir.exists():
        # A symlink or a file in the folder's place is nobody's folder: moved aside (the link itself), never followed.
        plain = run_dir.is_dir() and not run_dir.is_symlink()
        owner = read_owner_uid(run_dir) if plain else None
        if owner == uid:
            return None
        if not plain or owner is not None or any(run_dir.iterdir()):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
            previous = run_dir.parent / PREVIOUS_DIR
            previous.mkdir(parents=True, exist_ok=True)
            moved = previous / f"{run_dir.name}-{(owner or 'unowned')[:8]}-{stamp}"
            os.rename(run_dir, moved)  # same file system: atomic, nothing copied
            fsync_dir(run_dir.parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / OWNER_FILE, {"uid": uid})
    return moved
