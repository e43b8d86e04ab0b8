"""Whether a checkpoint agrees with itself: what its manifest says (config_hash, step, epoch, `extra`) against
its own config.json and trainer_state.json, before the trainer believes the manifest.

Torch-free, so the input checks run before torch is imported. A checkpoint that disagrees with itself was
tampered with or mixed up (one changed character of config_hash stopped a run for good with exit 65 and
"(fields: )", issue 11): it is CheckpointInvalid, quarantined like a corrupt one, and the previous one is used.
Only a checkpoint that agrees with itself can tell that the run's own inputs changed (exit 65).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from trainer.config import TrainerConfig
from trainer.volume import MANIFEST_NAME, CheckpointInfo, CheckpointInvalid

CONFIG_FILE = "config.json"  # the TrainerConfig the run was made with
STATE_FILE = "trainer_state.json"  # data position, totals, scheduler, and the run's fixed facts


def check_self_consistent(info: CheckpointInfo, document: Callable[[str], Any]) -> None:
    """CheckpointInvalid naming the manifest and the field that its own files contradict.

    `document(name)` is a file of the checkpoint as parsed JSON (from disk, or from the verified bytes).
    Checkpoints written before config.json was kept in them are checked on trainer_state.json alone.
    """
    manifest = info.path / MANIFEST_NAME
    listed = {entry.path for entry in info.files}
    try:
        state = document(STATE_FILE)
        recorded = TrainerConfig.model_validate(document(CONFIG_FILE)) if CONFIG_FILE in listed else None
    except (OSError, KeyError, TypeError, ValueError, ValidationError) as exc:
        raise CheckpointInvalid(f"{manifest}: its own {STATE_FILE} or {CONFIG_FILE} is unreadable ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointInvalid(f"{manifest}: its own {STATE_FILE} is not an object")
    if recorded is not None and recorded.identity_hash() != info.config_hash:
        raise CheckpointInvalid(f"{manifest}: config_hash does not agree with its own {CONFIG_FILE} (tampered?)")
    said = {"step": info.step, "epoch": info.epoch, **info.extra}
    for key, value in said.items():
        if key in state and state[key] != value:
            raise CheckpointInvalid(
                f"{manifest}: {key} {value!r} does not agree with its own {STATE_FILE} ({state[key]!r}; tampered?)"
            )
